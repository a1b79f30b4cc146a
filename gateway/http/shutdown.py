"""Graceful shutdown: stop taking work, let what is in flight finish, then end the stragglers cleanly.

One ``Shutdown`` object owns the stages, in the owner and in a worker alike; the lifespan attaches the
parts it started (the engines' pool, the peer processes, the clients) and the server calls the stages:

1. **draining**: ``/ready`` answers 503 at once (an orchestrator stops sending traffic), new model
   requests get 503;
2. **close queues**: requests waiting for a model are refused (the owner's pool);
3. **wait in flight**: requests in flight, streams included, may finish until ``server.drain_timeout``;
4. **end stragglers**: streams still open end with one SSE error event (``server_shutting_down``), never
   a silent cut; then the peers: an owner's workers drain the same way and exit together, a worker tells
   its owner it is done and waits for the word that all are;
5. **stop workers**, 6. **stop the pool** (each engine: SIGTERM, its stop_grace, SIGKILL), 7. **close
   clients** — when uvicorn has stopped, from the lifespan's end.

The first SIGTERM/SIGINT runs 1-4 and then stops uvicorn, whose lifespan runs 5-7. A second signal hurries:
requests still open end at once with their error event and each engine gets a second between SIGTERM
and SIGKILL. A third exits without waiting for anything; the engines still go down, each by its reaper
when the gateway's lifeline closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Protocol

import uvicorn

log = logging.getLogger("gateway")

STAGES = (
    "draining",
    "close_queues",
    "wait_in_flight",
    "end_stragglers",
    "stop_workers",
    "stop_pool",
    "close_clients",
)
STRAGGLER_GRACE_S = 2.0  # for the ended requests to write their error event and unwind


class Abortable(Protocol):
    """A request in flight that can be ended now, with a clean error (a stream: its SSE error event)."""

    def abort_for_shutdown(self) -> None: ...


class EnginePoolStages(Protocol):
    """The owner's pool, as the shutdown drives it (``engines.EnginePool``)."""

    def close_queues(self) -> None: ...

    def hurry(self) -> None: ...

    async def stop(self) -> None: ...


class Peers(Protocol):
    """The other processes of this gateway: an owner's workers (``Fleet``), or a worker's owner."""

    async def drain(self, grace: float) -> None:
        """Stage 4's second half: the owner's workers finish and exit; a worker says it is done and waits."""

    def hurry(self) -> None: ...

    async def stop(self) -> None:
        """Stage 5: whatever still runs is ended (the owner), or the line is closed (a worker)."""


class InFlight:
    """The requests answering right now; each registers itself for the duration of its call."""

    def __init__(self) -> None:
        self.relays: set[Abortable] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, relay: Abortable) -> None:
        self.relays.add(relay)
        self._idle.clear()

    def discard(self, relay: Abortable) -> None:
        self.relays.discard(relay)
        if not self.relays:
            self._idle.set()

    def abort_all(self) -> None:
        """End every request in flight now, each with a clean error (a stream: its SSE error event)."""
        for relay in list(self.relays):
            relay.abort_for_shutdown()

    async def wait_idle(self, seconds: float) -> bool:
        """Until nothing is in flight (True), or ``seconds`` pass."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        return self._idle.is_set()


class Shutdown:
    """The stages from the first signal to the exit (``STAGES``), for the owner and for a worker."""

    def __init__(self, drain_timeout: float) -> None:
        self.drain_timeout = drain_timeout
        self.in_flight = InFlight()
        self.pool: EnginePoolStages | None = None
        self.peers: Peers | None = None
        self._clients: list[Callable[[], Awaitable[None]]] = []
        self._draining = False

    # -- what the lifespan started --------------------------------------------------------------------

    def close_with(self, close: Callable[[], Awaitable[None]]) -> None:
        """A client to close at the last stage (in the order given)."""
        self._clients.append(close)

    @property
    def draining(self) -> bool:
        return self._draining

    # -- the first signal: stages 1-4 ---------------------------------------------------------------

    async def drain(self) -> None:
        self.mark_draining()
        self.close_queues()
        if not await self.wait_in_flight():
            await self.end_stragglers()
        if self.peers is not None:
            await self.peers.drain(self.drain_timeout)

    def mark_draining(self) -> None:
        """Stage 1: not ready, and new model requests are refused (503), in this process from now on."""
        self._draining = True

    def close_queues(self) -> None:
        """Stage 2: waiting requests are refused now, not kept waiting for an engine that will be stopped."""
        if self.pool is not None:
            self.pool.close_queues()

    async def wait_in_flight(self) -> bool:
        """Stage 3: up to ``drain_timeout`` for the requests in flight to finish; False if some did not."""
        in_flight = self.in_flight
        if in_flight.relays:
            log.info(
                "draining: waiting up to %.0fs for %d request(s) in flight", self.drain_timeout, len(in_flight.relays)
            )
        return await in_flight.wait_idle(self.drain_timeout)

    async def end_stragglers(self) -> None:
        """Stage 4: each request still open ends with its error event."""
        log.warning("drain deadline passed: ending %d request(s) still in flight", len(self.in_flight.relays))
        self.in_flight.abort_all()
        await self.in_flight.wait_idle(STRAGGLER_GRACE_S)

    # -- the second signal --------------------------------------------------------------------------

    def hurry(self) -> None:
        """Requests still open end now, peers are told the same, the engines' stop skips their grace."""
        if self.peers is not None:
            self.peers.hurry()
        self.in_flight.abort_all()
        if self.pool is not None:
            self.pool.hurry()

    # -- the lifespan's end: stages 5-7 ---------------------------------------------------------------

    async def close(self) -> None:
        """What the lifespan started, stopped in order; a stage that fails is logged, the next still runs."""
        self.mark_draining()  # an end without a signal (a test's client, a failed start) is a drain too
        if self.peers is not None:
            await _stage("stop_workers", self.peers.stop)
        if self.pool is not None:
            await _stage("stop_pool", self.pool.stop)
        for close in self._clients:
            await _stage("close_clients", close)


async def _stage(name: str, step: Callable[[], Awaitable[None]]) -> None:
    try:
        await step()
    except Exception:
        log.exception("shutdown: %s failed; going on with the next stage", name)


class DrainingServer(uvicorn.Server):
    """uvicorn, with the shutdown's drain between the first signal and the stop."""

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown) -> None:
        super().__init__(config)
        self.stages = shutdown  # not ``shutdown``: uvicorn.Server has a method of that name
        self._drain_started = False
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.escalate(f"{signal.Signals(sig).name} received")

    def escalate(self, why: str) -> None:
        """The next step: drain, then hurry, then exit without waiting (a signal, or a worker's order)."""
        if self._drain_started and self.should_exit:
            log.warning("third signal: exiting without waiting for anything")
            self.force_exit = True
            return
        if self._drain_started:
            log.warning("second signal: stopping now")
            with contextlib.suppress(RuntimeError):
                # Requests still open end now, with their error event, and the engines get a second's grace;
                # then uvicorn stops as usual, lifespan included (a forced exit would skip it).
                asyncio.get_running_loop().call_soon_threadsafe(self.stages.hurry)
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
            await self.stages.drain()
        finally:
            self.should_exit = True
