#!/usr/bin/env bash
# LMDeploy's command-line parser in its own environment, cached outside the clone, keyed by version.
#
#   scripts/install-lmdeploy.sh        prints the venv's path on success (installs it the first time)
#
# Not an engine that runs here: LMDeploy serves on CUDA (or Ascend) only. What this environment gives is its
# real argument parser (`lmdeploy.cli`), so tests/e2e/test_engine_cli.py can parse every command line the
# gateway builds for it. The wheel goes in with --no-deps (its requirements pin a CUDA torch<=2.12.1, triton,
# nvidia-* libraries: gigabytes), then only what `import lmdeploy.cli.serve` needs: the CPU torch 2.13.0 that
# this machine kind keeps in pip's find-links directory (named with its exact version, so PyPI's CUDA build
# is never chosen), transformers and a few small packages. Exit 3 (and a reason on stderr) when it cannot be
# installed here: the test then skips with that reason.
set -euo pipefail
VERSION="${LMDEPLOY_VERSION:-0.18.0}"
TORCH="${LMDEPLOY_TORCH:-2.13.0}"
CACHE="${GATEWAY_LMDEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-gateway}"
VENV="$CACHE/lmdeploy-$VERSION"
PY="${PYTHON311:-python3.11}"
# What lmdeploy/__init__.py and lmdeploy.cli.serve import (found by importing it until nothing was missing).
PARSER_DEPS=(transformers pydantic pyyaml mmengine-lite pillow psutil requests tqdm shortuuid pybase64)

if [[ -x "$VENV/bin/python" && -f "$VENV/.ok" ]]; then
    echo "$VENV"
    exit 0
fi
if ! command -v "$PY" >/dev/null; then
    echo "install-lmdeploy: $PY not found (lmdeploy $VERSION wheels are for CPython 3.8-3.13; the script uses 3.11)" >&2
    exit 3
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lmdeploy-install.lock"
flock 9 # two test runs on one machine install once
if [[ -x "$VENV/bin/python" && -f "$VENV/.ok" ]]; then
    echo "$VENV"
    exit 0
fi
rm -rf "$VENV"
{
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q -U pip
    "$VENV/bin/pip" install -q --no-deps "lmdeploy==$VERSION"
    "$VENV/bin/pip" install -q "torch==$TORCH" "${PARSER_DEPS[@]}"
} >"$CACHE/lmdeploy-install.log" 2>&1 || {
    echo "install-lmdeploy: the install failed; see $CACHE/lmdeploy-install.log" >&2
    tail -5 "$CACHE/lmdeploy-install.log" >&2
    exit 3
}
if "$VENV/bin/pip" list 2>/dev/null | grep -qiE '^(nvidia-|triton )'; then
    echo "install-lmdeploy: a CUDA package came in with the parser's dependencies; see $CACHE/lmdeploy-install.log" >&2
    exit 3
fi
if ! "$VENV/bin/lmdeploy" serve api_server --help >>"$CACHE/lmdeploy-install.log" 2>&1; then
    echo "install-lmdeploy: \`lmdeploy serve api_server --help\` fails after the install; see $CACHE/lmdeploy-install.log" >&2
    exit 3
fi
touch "$VENV/.ok"
echo "$VENV"
