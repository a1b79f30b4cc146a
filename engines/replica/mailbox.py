"""The owner task's inbox: commands from other tasks, and "wait for whichever comes first".

A supervisor waits on several things at once (a command, its engine's exit, a probe, a timer). The
pending command read and the exit watch outlive each wait, so nothing that arrives between two waits
is lost, and the probe or timer of a wait that something else ended is cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")
CommandKind = Literal["start", "stop", "restart", "sleep", "wake", "broken", "probe"]
WaitKind = Literal["cmd", "exit", "work", "timeout"]


@dataclass
class Command:
    kind: CommandKind
    done: asyncio.Future[None]
    hurried: bool = False  # a stop in a hurry (a second signal): the owner shortens the grace from then on

    def finish(self, error: BaseException | None = None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error if isinstance(error, Exception) else RuntimeError("cancelled"))


class Mailbox:
    def __init__(self, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self._sleep = sleep
        self._queue: asyncio.Queue[Command] = asyncio.Queue()
        self._get: asyncio.Task[Command] | None = None
        self.closed = False

    async def send(self, kind: CommandKind, owner: str, *, hurried: bool = False) -> None:
        """Queue a command and wait until the owner has carried it out (or taken it up)."""
        if self.closed:
            raise RuntimeError(f"{owner} has shut down")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Command(kind, done, hurried))
        # The command goes on if the sender gives up waiting: a half-done stop helps nobody.
        await asyncio.shield(done)

    def post(self, kind: CommandKind) -> None:
        """Queue a command without waiting for it (from code that cannot await: the request path)."""
        if self.closed:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it: retrieved here
        self._queue.put_nowait(Command(kind, done))

    async def wait(
        self, *, exited: asyncio.Future[int] | None = None, after: float | None = None, work: Awaitable[T] | None = None
    ) -> tuple[WaitKind, Any]:
        """Until a command arrives, ``exited`` completes, ``work`` finishes, or ``after`` seconds pass.

        Returns ("exit", code), ("cmd", Command), ("work", result) or ("timeout", None), in that order of
        precedence when several happened at once: an exit is the strongest news.
        """
        if self._get is None:
            self._get = asyncio.ensure_future(self._queue.get())
        work_task = asyncio.ensure_future(work) if work is not None else None
        sleeper = asyncio.ensure_future(self._sleep(after)) if after is not None else None
        extra: list[asyncio.Future[Any]] = [t for t in (work_task, sleeper) if t is not None]
        waits: set[asyncio.Future[Any]] = {self._get, *extra}
        if exited is not None:
            waits.add(exited)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in extra:
                task.cancel()
            for task in extra:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if exited is not None and exited.done():
            return "exit", exited.result()
        if self._get.done():
            cmd, self._get = self._get.result(), None
            return "cmd", cmd
        if work_task is not None and work_task.done() and not work_task.cancelled():
            return "work", work_task.result()
        return "timeout", None

    def close(self) -> list[Command]:
        """Refuse new commands; the ones not taken up yet, for the owner to fail."""
        self.closed = True
        pending: list[Command] = []
        if self._get is not None:
            if self._get.done() and not self._get.cancelled():
                pending.append(self._get.result())
            else:
                self._get.cancel()
            self._get = None
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        return pending
