"""End-to-end fixtures: the tiny random-weight models, built once per session, for the real CPU engine.

Everything here needs the ``cpu`` extra (torch, transformers[serving], tokenizers); without it the e2e
tests are skipped, not failed. Building both models takes a few seconds and no network.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def _require_cpu_engine() -> None:
    pytest.importorskip("torch", reason="the e2e tests need the cpu extra (torch)")
    pytest.importorskip("transformers", reason="the e2e tests need the cpu extra (transformers)")
    pytest.importorskip("tokenizers", reason="the e2e tests need the cpu extra (tokenizers)")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_models_dir: Path) -> Path:
    """A Qwen2-shaped chat model with random weights (see ``gateway/commands/demo_model.py``)."""
    _require_cpu_engine()
    from gateway.commands.demo_model import make_chat_model

    path = tiny_models_dir / "tiny-chat"
    make_chat_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_vl_model(tiny_models_dir: Path) -> Path:
    """A LLaVA vision-language model with random weights; one 28 px image is 4 prompt tokens."""
    _require_cpu_engine()
    from gateway.commands.demo_model import make_vl_model

    path = tiny_models_dir / "tiny-vl"
    make_vl_model(path)
    return path


@pytest.fixture(scope="session")
def transformers_exe() -> str:
    """The ``transformers`` CLI of the interpreter running the tests (its venv need not be on PATH)."""
    _require_cpu_engine()
    here = Path(sys.executable).parent / "transformers"
    exe = str(here) if os.access(here, os.X_OK) else shutil.which("transformers")
    if exe is None:
        pytest.skip("no `transformers` executable next to the interpreter or on PATH")
    return exe


@pytest.fixture(scope="session")
def hf_hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An existing, empty hub cache: ``transformers serve`` reads it for ``/v1/models`` only."""
    return tmp_path_factory.mktemp("hf-hub-cache")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Call it for a loopback port that was free a moment ago (an engine binds it seconds later)."""
    return _free_port


# ---- real vLLM (tests/e2e/test_vllm_real.py) --------------------------------------------------------------------

VLLM_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    """Real vLLM's CPU build, installed once per machine by ``scripts/install-vllm.sh`` (skip with its reason)."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "scripts" / "install-vllm.sh"
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=1800)
    if done.returncode == 3:
        pytest.skip(f"real vLLM cannot be installed here: {done.stderr.strip()}")
    if done.returncode != 0:
        raise AssertionError(f"{script} exited {done.returncode}:\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])
