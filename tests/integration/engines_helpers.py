"""Shared pieces of the engines/ integration tests: a tiny fake engine, fast specs, a process guard.

The fake engine is a stdlib HTTP server written to a temporary file, shaped like ``vllm serve`` on the
command line (it reads ``--host``/``--port``). Faults come from the environment:
FAKE_STARTUP_DELAY=s (connections refused until then), FAKE_EXIT_CODE=n (exit instead of serving),
FAKE_IGNORE_SIGTERM=1, FAKE_FORK=k workers (FAKE_SETSID=1: they setsid and double-fork, leaving the
group and their parent), FAKE_HEALTH=ok|fail|flap:N|fail-after:N (flap: N good answers, then
alternate), FAKE_LOG_FLOOD=bytes of output before serving, FAKE_LONG_LINE=bytes in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from engines.adapters import adapter_for
from engines.process import procfs
from engines.replica.state import StateChanged
from engines.replica.supervisor import Supervisor
from engines.spec import HealthPolicy, ModelSpec, RestartPolicy

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]

FAKE_ENGINE = r"""
import os, sys, time, signal, threading
env = os.environ.get
def arg(name, default=None):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default
host, port = arg("--host", "127.0.0.1"), int(arg("--port", "0"))
if env("FAKE_IGNORE_SIGTERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("fake engine", os.getpid(), "starting", flush=True)
for _ in range(int(env("FAKE_FORK", "0"))):
    if os.fork() == 0:
        if env("FAKE_SETSID"):
            os.setsid()
            if os.fork():
                os._exit(0)
        while True:
            time.sleep(3600)
flood = int(env("FAKE_LOG_FLOOD", "0"))
if flood:
    line = b"x" * 99 + b"\n"
    block = line * 1000
    for _ in range(max(1, flood // len(block))):
        sys.stdout.buffer.write(block)
    sys.stdout.buffer.flush()
if env("FAKE_LONG_LINE"):
    sys.stdout.buffer.write(b"L" * int(env("FAKE_LONG_LINE")) + b"\nafter the long line\n")
    sys.stdout.buffer.flush()
time.sleep(float(env("FAKE_STARTUP_DELAY", "0")))
if env("FAKE_EXIT_CODE"):
    print("fake engine giving up", flush=True)
    sys.exit(int(env("FAKE_EXIT_CODE")))
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
mode = env("FAKE_HEALTH", "ok")
lock = threading.Lock()
count = [0]
def healthy():
    with lock:
        count[0] += 1
        n = count[0]
    kind, _, arg_ = mode.partition(":")
    if kind == "fail":
        return False
    if kind == "flap":
        return n <= int(arg_) or (n - int(arg_)) % 2 == 0
    if kind == "fail-after":
        return n <= int(arg_)
    return True
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = healthy() if self.path == "/health" else True
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer((host, port), Handler)
print("fake engine serving on", port, flush=True)
server.serve_forever()
"""

FAST_HEALTH = HealthPolicy(
    interval=0.1, timeout=0.5, startup_interval=0.05, unhealthy_threshold=3, restart_grace=0, healthy_threshold=1
)
FAST_RESTART = RestartPolicy(
    initial_delay=0.05, max_delay=0.4, jitter=0, exp_base=2, max_restarts=3, window=60, stable_after=60
)


def write_fake_engine(directory: Path) -> Path:
    path = directory / "fake_engine.py"
    path.write_text(FAKE_ENGINE)
    return path


def fake_spec(name: str, fake: Path, env: dict[str, str] | None = None, **overrides: Any) -> ModelSpec:
    values: dict[str, Any] = {
        "name": name,
        "engine": "vllm",
        "model": "fake-model",
        "command": (sys.executable, str(fake)),
        "env": env or {},
        "health": FAST_HEALTH,
        "restart": FAST_RESTART,
        "stop_grace": 1.0,
        "startup_timeout": 15.0,
    }
    values.update(overrides)
    return ModelSpec(**values)


def run(coro: Coroutine[Any, Any, T], limit: float = 30.0) -> T:
    """Run a test coroutine on a fresh loop, bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await coro

    return asyncio.run(bounded())


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0, step: float = 0.02) -> None:
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110 (polls processes and /proc: nothing to wait on)
            await asyncio.sleep(step)


def tagged_pids(prefix: str) -> list[int]:
    return [t.pid for t in procfs.tagged_processes(owner_pid=os.getpid()) if t.engine_id.startswith(prefix)]


def pid_gone(pid: int) -> bool:
    return not procfs.is_alive(pid)


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def process_guard(prefix: str) -> Iterator[None]:
    """Whatever the test did, nothing tagged ``prefix…`` survives it; a survivor fails the test."""
    survivors: list[int] = []
    try:
        yield
    finally:
        deadline = time.monotonic() + 3.0
        while (left := tagged_pids(prefix)) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = left
        procfs.kill(survivors, signal.SIGKILL)
    assert not survivors, f"processes left behind by the test: {survivors}"


class Events:
    def __init__(self) -> None:
        self.items: list[StateChanged] = []

    def __call__(self, event: StateChanged) -> None:
        self.items.append(event)

    def states(self) -> list[str]:
        return [str(e.new) for e in self.items]


@contextlib.asynccontextmanager
async def supervised(
    spec: ModelSpec,
    *,
    start: bool = True,
    events: Events | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> AsyncIterator[Supervisor]:
    """A running supervisor for ``spec`` with its own probe session; stopped and closed on the way out."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        sup = Supervisor(spec, adapter_for(spec.engine), session=session, on_event=events, sleep=sleep)
        task = asyncio.create_task(sup.run())
        try:
            if start:
                await sup.start()
            yield sup
        finally:
            with contextlib.suppress(RuntimeError):
                await asyncio.wait_for(sup.stop(), 10)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# Test modules import these under the *_fixture names; tests ask for them as ``fake_engine`` / ``name``.
@pytest.fixture(scope="session", name="fake_engine")
def fake_engine_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_engine(tmp_path_factory.mktemp("fake-engine"))


@pytest.fixture(name="name")
def name_fixture() -> Iterator[str]:
    """A model name unique to this test; everything launched under it is killed and checked afterwards."""
    model = unique()
    with process_guard(model + "/"):
        yield model
