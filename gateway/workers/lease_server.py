"""The owner's side of the control line: the one scheduler, lent to every worker a lease at a time.

Workers do not schedule. For each request a worker asks for a lease on a model (``Acquire``, with the
request's priority and affinity) and the hub answers from the owner's ``EnginePool`` exactly as a request in
the owner would be answered: a replica at once, a place in the model's queue, or a refusal. So
``max_concurrency``, queue limits and priorities, on-demand starts, the replica's choice (affinity, least
busy), idle stops and outlier ejection stay exact across workers. The hub holds the
owner's lease for the worker; the release carries the request's outcome (the passive health signal),
which the hub reports on that lease before releasing it. A worker that disconnects — it crashed, was
killed, or stopped answering pings — gives back every lease and queue place it held, at once.

Liveness: every ``ping_interval`` the hub pings each worker; one that has said nothing for
``ping_timeout`` (a stopped process, a blocked event loop) is reported to ``on_hung``, which ends it, and
its line is cut. The messages are in ``messages.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from engines import EnginePool, ModelEntry
from engines.scheduling.contract import NO_CLAIM, Claim
from engines.scheduling.lease import Abandoned, Lease, Waiting
from engines.scheduling.scheduler import Refused
from gateway.config.loader import Config
from gateway.workers.messages import (
    Acquire,
    Cancel,
    ConfigUpdate,
    Denied,
    Drain,
    Drained,
    Failover,
    Granted,
    Hello,
    Hurry,
    Message,
    MetricsText,
    Ping,
    Pong,
    Queued,
    Release,
    Scrape,
    Stop,
    ToWorker,
    Wait,
)
from gateway.workers.wire import Channel

log = logging.getLogger("gateway.workers")


@dataclass(frozen=True)
class Liveness:
    """How often the hub pings each worker, and how long a silent one is given before it counts as hung."""

    interval: float = 5.0
    timeout: float = 20.0


DEFAULT_LIVENESS = Liveness()  # as server.worker_ping_interval and worker_ping_timeout default


class _Link:
    """One worker's connection and what it holds."""

    def __init__(self, hub: LeaseHub) -> None:
        self.hub = hub
        self.channel: Channel[ToWorker] = Channel(self.on_message, self.on_close, same_user_only=True)
        self.worker = -1
        self.pid = 0
        self.drained = False  # its requests in flight are over; it still answers (503s) until told to stop
        self.heard = asyncio.get_running_loop().time()  # the last message from it (any message says it lives)
        self.leases: dict[int, tuple[ModelEntry, Lease]] = {}
        self.queued: dict[int, tuple[ModelEntry, Waiting]] = {}
        self.waits: dict[int, asyncio.Future[None]] = {}  # set: the worker gave up on that place in the queue
        self._tasks: set[asyncio.Task[None]] = set()

    def on_message(self, message: Message) -> None:
        self.heard = asyncio.get_running_loop().time()
        match message:
            case Acquire(lid, model, priority, affinity):
                self._acquire(lid, model, priority, affinity)
            case Release(lid, ok):
                self._release(lid, ok)
            case Wait(lid, timeout):
                self._wait(lid, timeout)
            case Cancel(lid):
                self._cancel(lid)
            case Failover(lid, new_lid):
                self._failover(lid, new_lid)
            case Pong():
                pass  # heard: that is all a pong is for
            case MetricsText(seq, text):
                self.hub.metrics_arrived(seq, text)
            case Drained():
                self.drained = True
                self.hub.changed()
            case Hello(worker, pid):
                self.worker, self.pid = worker, pid
                self.hub.joined(self)
            case _:
                log.warning("control line: unexpected %s from worker %d", type(message).__name__, self.worker)

    # -- leases ---------------------------------------------------------------------------------------

    def _acquire(self, lid: int, model: str, priority: int, affinity: int | None) -> None:
        entry = self.hub.pool.resolve(model)
        if entry is None:
            self.channel.send(Denied(lid, "removed"))
            return
        # The worker's request, as the owner's own would be: its priority in the queue, its affinity to a replica.
        claim = NO_CLAIM if priority == 0 and affinity is None else Claim(priority, affinity)
        try:
            got = self.hub.pool.request(entry, claim)
        except Refused as refused:
            self.channel.send(Denied(lid, refused.reason))
            return
        if isinstance(got, Lease):
            self._grant(lid, entry, got)
        else:
            self.queued[lid] = (entry, got)
            self.channel.send(Queued(lid))

    def _grant(self, lid: int, entry: ModelEntry, lease: Lease) -> None:
        self.leases[lid] = (entry, lease)  # on a replica that was READY when granted (the pool's rule)
        self.channel.send(Granted(lid, lease.replica.replica, lease.replica.base_url))

    def _release(self, lid: int, ok: bool | None) -> None:
        held = self.leases.pop(lid, None)
        if held is None:
            return
        lease = held[1]
        if ok is not None:
            lease.report(ok)
        lease.release()

    def _wait(self, lid: int, timeout: float) -> None:
        queued = self.queued.pop(lid, None)
        if queued is None:
            self.channel.send(Denied(lid, "timeout"))
            return
        gave_up = self.waits[lid] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(self._queued(lid, *queued, timeout, gave_up))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _queued(
        self, lid: int, entry: ModelEntry, waiting: Waiting, seconds: float, gave_up: asyncio.Future[None]
    ) -> None:
        try:
            lease = await waiting.wait(seconds, abandon=gave_up)
        except Refused as refused:
            self.channel.send(Denied(lid, refused.reason))
            return
        except Abandoned:
            return
        finally:
            self.waits.pop(lid, None)
        if self.channel.closed.done():  # the worker left meanwhile: nobody to send the answer to
            lease.release()
            return
        self._grant(lid, entry, lease)

    def _cancel(self, lid: int) -> None:
        gave_up = self.waits.get(lid)
        if gave_up is not None and not gave_up.done():
            gave_up.set_result(None)
        queued = self.queued.pop(lid, None)
        if queued is not None:
            queued[1].cancel()
        self._release(lid, None)  # granted before the cancel crossed it on the line

    def _failover(self, lid: int, new_lid: int) -> None:
        held = self.leases.get(lid)
        other = None if held is None else self.hub.pool.failover(held[0], held[1].replica)
        if held is None or other is None:
            self.channel.send(Denied(new_lid, "unavailable"))
        else:
            self._grant(new_lid, held[0], other)

    def on_close(self) -> None:
        held = len(self.leases) + len(self.queued) + len(self.waits)
        for gave_up in self.waits.values():
            if not gave_up.done():
                gave_up.set_result(None)
        for _, waiting in self.queued.values():
            waiting.cancel()
        self.queued.clear()
        for lid in list(self.leases):
            self._release(lid, None)
        self.hub.left(self, held)


class LeaseHub:
    """Serves the control line on ``path`` (a Unix socket in the gateway's private run directory).

    ``on_hung(worker, pid)``: a worker stopped answering; the caller ends its process (the hub cuts its line
    and gives back what it held)."""

    def __init__(
        self,
        pool: EnginePool,
        path: str,
        config: Callable[[], Config],
        *,
        liveness: Liveness = DEFAULT_LIVENESS,
        on_hung: Callable[[int, int], None] = lambda worker, pid: None,
    ) -> None:
        self.pool = pool
        self.path = path
        self._config = config
        self._liveness = liveness
        self._on_hung = on_hung
        self._links: set[_Link] = set()
        self._server: asyncio.AbstractServer | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._seq = itertools.count(1)
        self._scrapes: dict[int, asyncio.Future[str]] = {}
        self._changed = asyncio.Event()  # replaced at each change: waiters hold the one they saw
        self._drain_grace: float | None = None  # set once the owner drains: late joiners drain at once

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(self._accept, self.path)
        self._pinger = asyncio.create_task(self._ping(), name="worker pings")

    def _accept(self) -> Channel[ToWorker]:
        return _Link(self).channel

    def joined(self, link: _Link) -> None:
        self._links.add(link)
        link.channel.send(ConfigUpdate(self._config()))
        if self._drain_grace is not None:  # it started before the drain and connects only now
            link.channel.send(Drain(self._drain_grace))

    def left(self, link: _Link, held: int) -> None:
        if link in self._links:
            self._links.discard(link)
            if held:
                log.info(
                    "worker %d (pid %d) left holding %d lease(s) or queue place(s): given back",
                    link.worker,
                    link.pid,
                    held,
                )
        self.changed()

    def changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def workers(self) -> int:
        return len(self._links)

    def _send_all(self, message: ToWorker) -> None:
        for link in self._links:
            link.channel.send(message)

    def publish(self, config: Config) -> None:
        """A reload applied: every worker routes by the new models from its next request on."""
        self._send_all(ConfigUpdate(config))

    def drain(self, grace: float) -> None:
        self._drain_grace = grace
        self._send_all(Drain(grace))

    async def wait_drained(self, seconds: float) -> bool:
        """Until every connected worker says its requests are over (True), or ``seconds`` pass."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not all(link.drained for link in self._links):
                    await self._changed.wait()
        return all(link.drained for link in self._links)

    def stop(self) -> None:
        """Drained everywhere: the workers close the port together, and exit."""
        self._send_all(Stop())

    def hurry(self) -> None:
        self._send_all(Hurry())

    async def scrape(self, seconds: float = 2.0) -> list[str]:
        """Every worker's metrics, as exposition text; a worker that does not answer in time is left out."""
        loop = asyncio.get_running_loop()
        asked: list[asyncio.Future[str]] = []
        for link in self._links:
            seq = next(self._seq)
            future = self._scrapes[seq] = loop.create_future()
            link.channel.send(Scrape(seq))
            future.add_done_callback(functools.partial(self._forget_scrape, seq))
            asked.append(future)
        if not asked:
            return []
        done, pending = await asyncio.wait(asked, timeout=seconds)
        for future in pending:
            future.cancel()
        if pending:
            log.warning(
                "metrics: %d worker(s) did not answer in %.0fs; their series are missing from this scrape",
                len(pending),
                seconds,
            )
        return [f.result() for f in done]

    def _forget_scrape(self, seq: int, _: asyncio.Future[str]) -> None:
        self._scrapes.pop(seq, None)

    def metrics_arrived(self, seq: int, text: str) -> None:
        future = self._scrapes.get(seq)
        if future is not None and not future.done():
            future.set_result(text)

    async def _ping(self) -> None:
        # Judged after a sleep: what the workers sent meanwhile was read first (I/O callbacks run before the
        # task that a timer wakes), so an owner that was itself busy for a while does not blame its workers.
        loop = asyncio.get_running_loop()
        every, silent_for = self._liveness.interval, self._liveness.timeout
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for link in list(self._links):
                if now - link.heard > silent_for:
                    self._hung(link, now - link.heard)
                else:
                    link.channel.send(Ping(next(self._seq)))

    def _hung(self, link: _Link, silent: float) -> None:
        log.error(
            "worker %d (pid %d) has not answered for %.0f s (hung or stopped): ending it", link.worker, link.pid, silent
        )
        self._on_hung(link.worker, link.pid)
        link.channel.abort()  # its leases and queue places are given back now, not when the kernel says so

    async def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        for link in list(self._links):
            link.channel.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
