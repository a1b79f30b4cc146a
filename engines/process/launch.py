"""One launch of one engine: the reaper and the engine under it, their output, and how they are ended.

The gateway starts ``reaper.py`` (in a new session, so the whole launch is one process group) and the
reaper starts the engine. The gateway holds the write end of a lifeline pipe: when the gateway dies, even
by SIGKILL, the reaper reads EOF and ends the engine's tree. The reaper says on a status pipe when the
engine's main process exits, before it ends the rest of the tree (``ended``): a replica whose API server
died leaves rotation at once, not when its orphans are gone. Every process of the launch carries the
environment tag from procfs.py, which is how a stop is verified and how leftovers are swept.

Spawning uses ``loop.subprocess_exec`` with a small protocol rather than ``create_subprocess_exec``:
Python 3.11's ``Process.wait()`` returns only once every pipe is closed, so a grandchild that escaped
and kept stdout open would hide the exit, and the protocol hands over output as it arrives (no
``readline`` limit, no reader task that could fall behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from engines.process import procfs
from engines.process.log_ring import LineSplitter, LogRing
from engines.process.redact import scrub

REAPER_PATH = Path(__file__).with_name("reaper.py")
STOP_MARGIN = 2.0  # beyond the grace: the reaper's own SIGKILL round and reaping
KILL_WAIT = 5.0
_log = logging.getLogger(__name__)


def exit_code(returncode: int) -> int:
    """Shell convention: a death by signal n is 128+n."""
    return 128 - returncode if returncode < 0 else returncode


def engine_environ(extra: Mapping[str, str], engine_id: str) -> dict[str, str]:
    """The gateway's environment without its own GATEWAY_* settings (keys among them), the adapter's
    variables, and the launch tag."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    env[procfs.TAG_VAR] = engine_id
    env[procfs.OWNER_VAR] = str(os.getpid())
    env[procfs.OWNER_START_VAR] = procfs.start_time(os.getpid()) or ""
    return env


def sweep_leftovers() -> list[int]:
    """Kill tagged processes whose gateway is gone (and whose reaper died with it): run at gateway start."""
    doomed = [t for t in procfs.tagged_processes() if not procfs.owner_alive(t)]
    if doomed:
        _log.warning(
            "killing %d leftover engine process(es) of a gateway that is gone: %s",
            len(doomed),
            ", ".join(f"{t.pid} ({t.engine_id})" for t in doomed),
        )
        procfs.kill(t.pid for t in doomed)
    return [t.pid for t in doomed]


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self, splitter: LineSplitter, exited: asyncio.Future[None], drained: asyncio.Future[None]) -> None:
        self._splitter = splitter
        self._exited = exited
        self._drained = drained

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        self._splitter.feed(data.encode() if isinstance(data, str) else data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._splitter.flush()
        if not self._drained.done():
            self._drained.set_result(None)

    def process_exited(self) -> None:
        if not self._exited.done():
            self._exited.set_result(None)


class EngineProcess:
    """One launch. ``start()`` once, then ``wait()`` for its end or ``stop()`` it; ``stop()`` is also the
    cleanup after an exit (it verifies that nothing with the tag is left and closes the pipes)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        engine_id: str,
        env: Mapping[str, str] | None = None,
        log: LogRing | None = None,
        logger: logging.Logger | None = None,
        grace: float = 20.0,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.argv = list(argv)
        self.secrets = secrets
        self.engine_id = engine_id
        self.grace = grace
        self.log = log if log is not None else LogRing()
        self._env = dict(env or {})
        self._logger = logger or logging.getLogger(f"engines.{engine_id.split('/', 1)[0]}")
        self._transport: asyncio.SubprocessTransport | None = None
        self._exited: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._lifeline: int | None = None
        self._pidfd: int | None = None
        self._status: int | None = None  # read end of the reaper's status pipe
        self._main_exit: asyncio.Future[int] | None = None  # the code the reaper reported for the main process
        self._engine: tuple[int, str | None] | None = None
        self._closed = False
        self.leftovers: list[int] = []  # tagged pids that outlived the reaper (found and killed by stop)

    # -- start ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._transport is not None:
            raise RuntimeError("an EngineProcess is started once")
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        self._drained = loop.create_future()
        self._main_exit = loop.create_future()
        splitter = LineSplitter(self._line, max_line=self.log.max_line)
        read_end, write_end = os.pipe()
        status_read, status_write = os.pipe()
        reaper = [
            sys.executable,
            "-I",
            str(REAPER_PATH),
            "--lifeline-fd",
            str(read_end),
            "--grace",
            f"{self.grace:g}",
            "--status-fd",
            str(status_write),
            "--",
            *self.argv,
        ]
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: _Protocol(splitter, self._exited, self._drained),  # type: ignore[arg-type]
                *reaper,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=engine_environ(self._env, self.engine_id),
                start_new_session=True,
                pass_fds=(read_end, status_write),
            )
        except BaseException:
            os.close(write_end)
            os.close(status_read)
            raise
        finally:
            os.close(read_end)
            os.close(status_write)
        self._transport = transport
        self._lifeline = write_end
        self._status = status_read
        os.set_blocking(status_read, False)
        loop.add_reader(status_read, self._status_readable)
        with contextlib.suppress(OSError, AttributeError):
            # A pidfd names this process and no other, even after its pid is reused.
            self._pidfd = os.pidfd_open(transport.get_pid())

    def _status_readable(self) -> None:
        """The reaper's status pipe: ``exited CODE`` when the engine's main process exits; EOF when it exits."""
        assert self._status is not None and self._main_exit is not None
        try:
            data = os.read(self._status, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        for line in data.splitlines():
            word, _, code = line.partition(b" ")
            if word == b"exited" and code.strip().lstrip(b"-").isdigit() and not self._main_exit.done():
                self._main_exit.set_result(int(code))
        if not data:
            self._close_status()

    def _close_status(self) -> None:
        if self._status is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already: nothing is watching it
                asyncio.get_running_loop().remove_reader(self._status)
            with contextlib.suppress(OSError):
                os.close(self._status)
            self._status = None

    def _line(self, line: str) -> None:
        if self.secrets:
            line = scrub(line, self.secrets)
        self.log.append(line)
        # The engine's access line for our own health probe, every few seconds per engine, would bury
        # everything else in the gateway's log; it stays in the ring and at debug level.
        level = logging.DEBUG if '"GET /health HTTP/1.1" 200' in line else logging.INFO
        if self._logger.isEnabledFor(level):
            self._logger.log(level, "[%s] %s", self.engine_id, line)

    # -- what it is -----------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The reaper's pid, which is also the process group id of the launch."""
        return self._transport.get_pid() if self._transport is not None else None

    @property
    def returncode(self) -> int | None:
        if self._transport is None:
            return None
        code = self._transport.get_returncode()
        return None if code is None else exit_code(code)

    @property
    def running(self) -> bool:
        return self._transport is not None and self._exited is not None and not self._exited.done()

    @property
    def engine_pid(self) -> int | None:
        """The engine's main process (the reaper's child); ``None`` before it exists and after it exited."""
        if not self.running or self.pid is None:
            return None
        if self._engine is None:
            child = procfs.oldest_child(self.pid)
            if child is None:
                return None
            self._engine = (child, procfs.start_time(child))
        pid, started = self._engine
        return pid if procfs.is_alive(pid) and procfs.start_time(pid) == started else None

    def members(self) -> list[int]:
        """Live processes with this launch's tag (the reaper included)."""
        return [t.pid for t in procfs.tagged_processes(engine_id=self.engine_id, owner_pid=os.getpid())]

    # -- end ------------------------------------------------------------------------------------------

    async def wait(self) -> int:
        """Until the reaper exits (its tree is gone by then); the exit code, 128+n for signal n."""
        if self._exited is None:
            raise RuntimeError("not started")
        await asyncio.shield(self._exited)
        code = self.returncode
        assert code is not None
        return code

    async def ended(self) -> int:
        """Until the engine's main process exits, as the reaper reports it at once (the rest of the tree is then
        being ended: ``wait`` or ``stop`` for that), or until the reaper exits; the exit code as ``wait``'s."""
        if self._exited is None or self._main_exit is None:
            raise RuntimeError("not started")
        await asyncio.wait((self._exited, self._main_exit), return_when=asyncio.FIRST_COMPLETED)
        if self._main_exit.done():
            return self._main_exit.result()
        return await self.wait()

    async def _wait_exited(self, seconds: float) -> bool:
        assert self._exited is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), seconds)
        return self._exited.done()

    def _signal_reaper(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            elif self.pid is not None:
                os.kill(self.pid, sig)

    def kill_now(self) -> None:
        """SIGKILL the launch's group and everything with its tag, without waiting (last resort)."""
        if self.pid is not None and self.running:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
        procfs.kill(self.members())

    async def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM to the tree, ``grace`` seconds, SIGKILL; then make sure nothing with the tag is left.

        Safe to call again, and after the process exited by itself. Returns the exit code.
        """
        if self._transport is None or self._exited is None:
            return None
        grace = self.grace if grace is None else grace
        if not self._exited.done():
            began = time.monotonic()
            self._signal_reaper(signal.SIGTERM)
            if not await self._wait_exited(grace + STOP_MARGIN):
                _log.warning(
                    "%s: reaper %s still alive %.1fs after SIGTERM; killing its process group",
                    self.engine_id,
                    self.pid,
                    time.monotonic() - began,
                )
                await asyncio.to_thread(self.kill_now)
                if not await self._wait_exited(KILL_WAIT):
                    _log.error("%s: reaper %s survived SIGKILL", self.engine_id, self.pid)
        await self._kill_leftovers()
        await self._close()
        return self.returncode

    async def _kill_leftovers(self) -> None:
        left = await asyncio.to_thread(self.members)
        if not left:
            return
        _log.warning("%s: %d process(es) outlived the reaper, killing: %s", self.engine_id, len(left), left)
        self.leftovers.extend(left)
        deadline = time.monotonic() + KILL_WAIT
        while left and time.monotonic() < deadline:
            procfs.kill(left)
            await asyncio.sleep(0.05)
            left = await asyncio.to_thread(self.members)
        if left:
            _log.error("%s: processes %s survive SIGKILL", self.engine_id, left)

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._drained is not None and not self._drained.done():
            # Everything is dead, so the pipe closes at once unless something we cannot see holds it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), 1.0)
        if self._transport is not None and self.returncode is not None:
            self._transport.close()
        self._close_status()
        for fd in (self._lifeline, self._pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lifeline = self._pidfd = None
