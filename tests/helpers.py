"""Test helpers shared by the integration and end-to-end suites: free ports, a gateway subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "standin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def standin_command(kind: str) -> list[str]:
    """How a config names a stand-in engine: run by this interpreter, whatever PATH says."""
    return [sys.executable, str(STANDIN / kind)]


def standin_model(**kw: Any) -> dict[str, Any]:
    """A ``models:`` entry for a vLLM stand-in probed often (``kw`` overrides or adds keys)."""
    return {
        "engine": "vllm",
        "model": "org/m",
        "command": standin_command("vllm"),
        "health": {"interval": 0.3, "startup_interval": 0.1},
        "stop_grace": 2,
        **kw,
    }


def chat(url: str, name: str, text: str = "hello there", *, timeout: float = 20, **kw: Any) -> httpx.Response:
    """One short non-stream chat request through the gateway at ``url`` (``kw``: more body fields)."""
    return httpx.post(
        url + "/v1/chat/completions",
        timeout=timeout,
        json={"model": name, "messages": [{"role": "user", "content": text}], "max_tokens": 2, **kw},
    )


def tagged_pids(tag_value: str, key: str = "GATEWAY_OWNER_PID") -> list[int]:
    """Processes whose environment carries ``key=tag_value`` (how the gateway tags its engines)."""
    needle = f"{key}={tag_value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def engine_pids(self) -> list[int]:
        return tagged_pids(str(self.proc.pid))


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def run_gateway(
    config: dict[str, Any],
    tmp_path: Path,
    *,
    wait_ready: bool = True,
    ready_timeout: float = 30,
    env: dict[str, str] | None = None,
) -> Iterator[Gateway]:
    """A real gateway process on a free port; stopped (and checked for leftovers) on exit."""
    port = free_port()
    config = {**config, "server": {"host": "127.0.0.1", "port": port, **config.get("server", {})}}
    config_path = tmp_path / f"gateway-{port}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / f"gateway-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    gateway = Gateway(proc, port, log_path)
    try:
        if wait_ready and not wait_until(lambda: _ready(gateway.url) or proc.poll() is not None, ready_timeout):
            raise AssertionError(f"gateway not ready in {ready_timeout}s:\n{gateway.log()[-4000:]}")
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}:\n{gateway.log()[-4000:]}")
        yield gateway
    finally:
        stop_gateway(gateway)


def stop_gateway(gateway: Gateway, timeout: float = 30) -> None:
    proc = gateway.proc
    owner = str(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    # Nothing the gateway launched may outlive it; clean up anyway so one failure does not leak into the next.
    leftovers = wait_until(lambda: not tagged_pids(owner), 10) or tagged_pids(owner)
    for pid in tagged_pids(owner):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if leftovers is not True:
        raise AssertionError(f"engine processes outlived the gateway: {leftovers}")
