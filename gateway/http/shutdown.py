"""Graceful shutdown: stop taking work, let what is in flight finish, then end the stragglers cleanly.

On the first SIGTERM/SIGINT the gateway starts draining: ``/ready`` answers 503 at once (an orchestrator
stops sending traffic), new model requests get 503, and in-flight requests — streams included — may
finish until ``server.drain_timeout``. Streams still open then end with one SSE error event
(``server_shutting_down``), never a silent cut. Only then does uvicorn stop and the lifespan stop the
engines. A second signal skips the wait: requests still open end at once with their error event and each
engine gets a second between SIGTERM and SIGKILL. A third exits without waiting for anything; the engines
still go down, each by its reaper when the gateway's lifeline closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("gateway")


class InFlight:
    """The relays answering right now; each registers itself for the duration of its call."""

    def __init__(self) -> None:
        self.relays: set[Any] = set()  # gateway.proxy.relay.Relay (not imported: relay imports this module)
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, relay: Any) -> None:
        self.relays.add(relay)
        self._idle.clear()

    def discard(self, relay: Any) -> None:
        self.relays.discard(relay)
        if not self.relays:
            self._idle.set()

    async def drain(self, grace: float) -> None:
        self.draining = True
        if self.relays:
            log.info("draining: waiting up to %.0fs for %d request(s) in flight", grace, len(self.relays))
        if await self._wait_idle(grace):
            return
        log.warning("drain deadline passed: ending %d request(s) still in flight", len(self.relays))
        self.abort_all()
        await self._wait_idle(2.0)

    def abort_all(self) -> None:
        """End every request in flight now, each with a clean error (a stream: its SSE error event)."""
        for relay in list(self.relays):
            relay.abort_for_shutdown()

    async def _wait_idle(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        return self._idle.is_set()


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain between the first signal and the stop."""

    def __init__(
        self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]], abort: Callable[[], None] = lambda: None
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._abort = abort
        self._drain_started = False
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.escalate(f"{signal.Signals(sig).name} received")

    def escalate(self, why: str) -> None:
        """The next stage: drain, then stop now, then exit without waiting (a signal, or a worker's order)."""
        if self._drain_started and self.should_exit:
            log.warning("third signal: exiting without waiting for anything")
            self.force_exit = True
            return
        if self._drain_started:
            log.warning("second signal: stopping now")
            with contextlib.suppress(RuntimeError):
                # Requests still open end now, with their error event, and the engines get a second's grace;
                # then uvicorn stops as usual, lifespan included (a forced exit would skip it).
                asyncio.get_running_loop().call_soon_threadsafe(self._abort)
            self.should_exit = True
            return
        self._drain_started = True
        log.info("%s: draining", why)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the loop is not running yet (a signal during start-up): just stop
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        self._drain_task = asyncio.ensure_future(self._run_drain())

    async def _run_drain(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True
