"""What the real-vLLM benchmarks (vllm_serve.py, affinity_vllm.py) share: finding vLLM's install, free ports,
and vLLM's own processes on this host (which it retitles: ``VLLM::EngineCore``, ``VLLM::Worker``)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# docs/real-vllm/README.md: what vLLM's CPU build needs to serve (KV cache space in GiB).
VLLM_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install_vllm(bench: str) -> Path:
    """The cached vLLM venv (scripts/install-vllm.sh installs it once); exits with the reason when it cannot."""
    done = subprocess.run([str(REPO / "scripts" / "install-vllm.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{bench}: real vLLM is not available here: {done.stderr.strip()}")
    return Path(done.stdout.strip().splitlines()[-1])


def children(parent: int, prefix: str) -> list[int]:
    """Processes whose parent is ``parent`` and whose comm starts with ``prefix`` (vLLM retitles its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if int(rest[1]) == parent and comm.startswith(prefix):
            found.append(int(entry.name))
    return found
