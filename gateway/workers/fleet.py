"""The owner's worker processes: started once its pool runs, replaced when one dies, drained before the engines.

Each worker is ``python -m gateway.workers.worker`` with the listening socket passed as a file
descriptor, in a session of its own (a terminal's Ctrl-C reaches the owner only, which then drains
everyone in order). Its lifeline is the control line: when the owner dies, even by SIGKILL, the kernel
closes that socket and the worker exits. A worker that dies while the gateway serves is started again,
after a pause that doubles while they keep dying young (1 s up to 30 s), so a crash loop costs little.
One that stops answering the hub's pings (a stopped process, a blocked event loop) is killed, and so
replaced the same way. For the shutdown the fleet is the owner's ``Peers`` (gateway/http/shutdown.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.core import Metric

from engines import EnginePool
from gateway.config.loader import Config
from gateway.observability.metrics import worker_families
from gateway.workers.lease_server import DEFAULT_LIVENESS, LeaseHub, Liveness

log = logging.getLogger("gateway.workers")

CONTROL_SOCKET = "control.sock"
OWNER_SOCKET = "owner.sock"
CONFIG_FILE = "config.pickle"
_BACKOFF_FIRST, _BACKOFF_MAX, _HEALTHY_AFTER = 1.0, 30.0, 60.0


class Fleet:
    def __init__(
        self, count: int, listener: socket.socket, run_dir: Path, liveness: Liveness = DEFAULT_LIVENESS
    ) -> None:
        self.count = count
        self.listener = listener
        self.run_dir = run_dir
        self.liveness = liveness
        self.hub: LeaseHub | None = None
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._ordered = False  # the workers were told to drain or hurry (and will exit by themselves)
        self.restarts = 0

    @property
    def owner_socket(self) -> str:
        return str(self.run_dir / OWNER_SOCKET)

    @property
    def connected(self) -> int:
        return self.hub.workers if self.hub is not None else 0

    def summary(self) -> dict[str, int]:
        """For /health (admin detail): how many should run, how many answer, how many died."""
        return {"configured": self.count, "connected": self.connected, "restarts": self.restarts}

    def families(self) -> list[Metric]:
        return worker_families(self.connected, self.restarts)

    async def start(self, pool: EnginePool, config: Callable[[], Config]) -> None:
        """Serve ``pool``'s leases to the workers, and start them; ``config``: the running config, read anew
        for each worker that connects (it may have been reloaded since)."""
        self.hub = LeaseHub(
            pool, str(self.run_dir / CONTROL_SOCKET), config, liveness=self.liveness, on_hung=self._hung
        )
        await self.hub.start()
        self._write_config(config())
        for worker in range(1, self.count + 1):
            await self._spawn(worker)
            task = asyncio.ensure_future(self._watch(worker))
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)
        log.info("%d workers serving on %s", self.count, _address(self.listener))

    def publish(self, config: Config) -> None:
        """A reload was applied: workers started from now on, and those running, route by it."""
        self._write_config(config)
        if self.hub is not None:
            self.hub.publish(config)

    async def scrape(self) -> list[str]:
        return [] if self.hub is None else await self.hub.scrape()

    async def drain(self, grace: float) -> None:
        """Workers stop taking model requests and finish theirs (each within ``grace``), then exit."""
        self._stopping = self._ordered = True
        if self.hub is not None:
            self.hub.drain(grace)
            # Each keeps answering (not ready, 503s) until all are done, as one process would: a worker that
            # closed the port early would leave its share of new connections to the others, or to a reset.
            # A worker ends its stragglers at ``grace`` itself; the margin is for that.
            await self.hub.wait_drained(grace + 5)
            self.hub.stop()
        await self._wait_exited(10)

    def hurry(self) -> None:
        """A second signal: workers end what they have in flight now, each with its error event."""
        self._ordered = True
        if self.hub is not None:
            self.hub.hurry()

    async def stop(self) -> None:
        """Whatever runs still is ended: SIGTERM (a worker drains on it), SIGKILL after 5 s. Idempotent.
        Workers already told to stop or hurry get 3 s to exit on their own first: a SIGTERM on top of that
        order would be their third signal, an exit that skips their clean-up."""
        self._stopping = True
        if self._ordered:
            await self._wait_exited(3, kill=False)
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        await self._wait_exited(5)
        watchers = list(self._watchers)
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        if self.hub is not None:
            await self.hub.close()

    # -- plumbing -----------------------------------------------------------------------------------

    def _hung(self, worker: int, pid: int) -> None:
        # Killed, not asked: a stopped process keeps a SIGTERM pending until it is continued. Its watcher sees
        # the exit and starts another, as for a crash.
        proc = self._procs.get(worker)
        if proc is not None and proc.pid == pid and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _write_config(self, config: Config) -> None:
        # What a new worker builds its app from (keys, limits, models) before its line to the owner is up. It
        # holds the API keys: the directory is the owner's user's alone (0700), as is the process memory.
        path = self.run_dir / CONFIG_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))
        tmp.replace(path)

    async def _spawn(self, worker: int) -> None:
        fd = self.listener.fileno()
        self._procs[worker] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.workers.worker",
            "--worker",
            str(worker),
            "--fd",
            str(fd),
            "--run-dir",
            str(self.run_dir),
            pass_fds=(fd,),
            start_new_session=True,
        )

    async def _watch(self, worker: int) -> None:
        pause = _BACKOFF_FIRST
        while True:
            proc = self._procs[worker]
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                break
            if time.monotonic() - started >= _HEALTHY_AFTER:
                pause = _BACKOFF_FIRST
            log.error(
                "worker %d (pid %d) exited with %s; starting a new one in %.0f s",
                worker,
                proc.pid,
                _exit_reason(code),
                pause,
            )
            await asyncio.sleep(pause)
            if self._stopping:
                break
            pause = min(pause * 2, _BACKOFF_MAX)
            self.restarts += 1
            await self._spawn(worker)

    async def _wait_exited(self, seconds: float, *, kill: bool = True) -> None:
        running = [proc for proc in self._procs.values() if proc.returncode is None]
        if not running:
            return
        _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=seconds)
        for waiter in pending:
            waiter.cancel()
        late = [proc for proc in running if proc.returncode is None]
        if late and kill:
            log.warning("%d worker(s) still running after %.0f s: killing them", len(late), seconds)
            for proc in late:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in late))


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"status {code}"


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The public listening socket, bound once by the owner; workers inherit it and accept on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.set_inheritable(True)
    return sock


def make_run_dir() -> Path:
    """A private directory (0700) for the sockets and the config, named for this process; the ones of owners
    that died without cleaning up (SIGKILL) are removed first."""
    base = Path(tempfile.gettempdir())
    for stale in base.glob("gateway-run-*"):
        pid = stale.name.split("-")[2]
        with contextlib.suppress(OSError):
            if pid.isdigit() and stale.stat().st_uid == os.getuid() and not Path(f"/proc/{pid}").exists():
                remove_run_dir(stale)
    return Path(tempfile.mkdtemp(prefix=f"gateway-run-{os.getpid()}-"))


def remove_run_dir(run_dir: Path) -> None:
    for name in (CONTROL_SOCKET, OWNER_SOCKET, CONFIG_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(run_dir / name)
    with contextlib.suppress(OSError):
        run_dir.rmdir()
