#!/usr/bin/env bash
# What `make test` (and so CI) runs: lint, format, types, the fast suite, then the real-vLLM suite.
#
# Real vLLM's environment and LMDeploy's CLI install (the first time on a machine, ~2-4 minutes, cached outside
# the clone by scripts/install-vllm.sh and install-lmdeploy.sh) in the background while the checks and the fast
# suite run; their tests wait for them (each script holds a lock) and skip, saying why, where they cannot be
# installed.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"
mkdir -p .cache
start=$SECONDS
{ scripts/install-vllm.sh || true; scripts/install-lmdeploy.sh || true; } >.cache/engine-install.out 2>&1 &
install_pid=$!
trap 'kill $install_pid 2>/dev/null || true' EXIT

step() {  # step NAME COMMAND...: run it, say how long it took
    local t0=$SECONDS
    "${@:2}"
    echo "== $1: $((SECONDS - t0)) s"
}
step "ruff check" "$BIN/ruff" check .
step "ruff format --check" "$BIN/ruff" format --check .
step "mypy --strict" "$BIN/mypy"
step "fast suite" "$BIN/pytest" -m "not vllm and not lmdeploy"
t0=$SECONDS
wait "$install_pid" || true  # a failed install is reported by the tests' skip reason
trap - EXIT
echo "== engine installs (waited after the fast suite): $((SECONDS - t0)) s; $(tail -2 .cache/engine-install.out | tr '\n' ' ')"
step "real-vLLM suite" "$BIN/pytest" -m "vllm or lmdeploy"  # lmdeploy: its CLI parser (install-lmdeploy.sh)
echo "== make test: $((SECONDS - start)) s"
