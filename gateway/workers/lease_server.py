"""The owner's side of the control line: the one scheduler, lent to every worker a lease at a time.

Workers do not schedule. For each request a worker asks for a lease on a model (``acq``) and the hub
answers from the owner's ``EnginePool`` exactly as a request in the owner would be answered: a replica
at once, a place in the model's FIFO queue, or a refusal. So ``max_concurrency``, queue limits, on-demand
starts, least-busy choice, idle stops and outlier ejection stay exact across workers. The release
carries the request's outcome (the passive health signal). A worker that disconnects — it crashed, or
was killed — gives back every lease and queue place it held, at once.

Messages (tuples), worker → hub: ``hello(worker, pid)``, ``acq(lid, model)``, ``wait(lid, timeout)``,
``fo(lid, new_lid)`` (failover of a refused connection), ``rel(lid, outcome)``, ``cancel(lid)``,
``metrics(seq, text)``, ``drained()``. Hub → worker: ``config(config)``, ``ok(lid, replica, base_url)``,
``q(lid)``, ``no(lid, reason)``, ``metrics(seq)``, ``drain(grace)``, ``stop()``, ``hurry()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from engines import EnginePool, ModelEntry
from engines.scheduling.lease import Abandoned, Lease, Waiting
from engines.scheduling.scheduler import Refused
from gateway.config.loader import Config
from gateway.workers.wire import Channel

log = logging.getLogger("gateway.workers")


class _Link:
    """One worker's connection and what it holds."""

    def __init__(self, hub: LeaseHub) -> None:
        self.hub = hub
        self.channel = Channel(self.on_message, self.on_close, same_user_only=True)
        self.worker = -1
        self.pid = 0
        self.drained = False  # its requests in flight are over; it still answers (503s) until told to stop
        self.leases: dict[int, tuple[ModelEntry, Lease]] = {}
        self.queued: dict[int, tuple[ModelEntry, Waiting]] = {}
        self.waits: dict[int, asyncio.Future[None]] = {}  # set: the worker gave up on that place in the queue
        self._tasks: set[asyncio.Task[None]] = set()

    def on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "acq":
            self._acquire(message[1], message[2])
        elif kind == "rel":
            self._release(message[1], message[2])
        elif kind == "wait":
            self._wait(message[1], message[2])
        elif kind == "cancel":
            self._cancel(message[1])
        elif kind == "fo":
            self._failover(message[1], message[2])
        elif kind == "metrics":
            self.hub.metrics_arrived(message[1], message[2])
        elif kind == "drained":
            self.drained = True
            self.hub.changed()
        elif kind == "hello":
            self.worker, self.pid = message[1], message[2]
            self.hub.joined(self)
        else:
            log.warning("control line: unknown message %r from worker %d", kind, self.worker)

    # -- leases ---------------------------------------------------------------------------------------

    def _acquire(self, lid: int, model: str) -> None:
        entry = self.hub.pool.resolve(model)
        if entry is None:
            self.channel.send(("no", lid, "removed"))
            return
        try:
            got = self.hub.pool.request(entry)
        except Refused as refused:
            self.channel.send(("no", lid, refused.reason))
            return
        if isinstance(got, Lease):
            self._grant(lid, entry, got)
        else:
            self.queued[lid] = (entry, got)
            self.channel.send(("q", lid))

    def _grant(self, lid: int, entry: ModelEntry, lease: Lease) -> None:
        url = lease.replica.base_url
        if url is None:  # it left READY between the scheduler's choice and now: the queue's rules apply again
            lease.release()
            self.channel.send(("no", lid, "not_ready"))
            return
        lease.replica.inflight += 1
        self.leases[lid] = (entry, lease)
        self.channel.send(("ok", lid, lease.replica.replica, url))

    def _release(self, lid: int, outcome: bool | None) -> None:
        held = self.leases.pop(lid, None)
        if held is None:
            return
        lease = held[1]
        lease.replica.inflight -= 1
        if outcome is True:
            lease.replica.report_success()
        elif outcome is False:
            lease.replica.report_failure()
        lease.release()

    def _wait(self, lid: int, timeout: float) -> None:
        queued = self.queued.pop(lid, None)
        if queued is None:
            self.channel.send(("no", lid, "timeout"))
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
            self.channel.send(("no", lid, refused.reason))
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
            self.channel.send(("no", new_lid, "none"))
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
    """Serves the control line on ``path`` (a Unix socket in the gateway's private run directory)."""

    def __init__(self, pool: EnginePool, path: str, config: Callable[[], Config]) -> None:
        self.pool = pool
        self.path = path
        self._config = config
        self._links: set[_Link] = set()
        self._server: asyncio.AbstractServer | None = None
        self._seq = 0
        self._scrapes: dict[int, asyncio.Future[str]] = {}
        self._changed = asyncio.Event()  # replaced at each change: waiters hold the one they saw
        self._drain_grace: float | None = None  # set once the owner drains: late joiners drain at once

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(self._accept, self.path)

    def _accept(self) -> Channel:
        return _Link(self).channel

    def joined(self, link: _Link) -> None:
        self._links.add(link)
        link.channel.send(("config", self._config()))
        if self._drain_grace is not None:  # it started before the drain and connects only now
            link.channel.send(("drain", self._drain_grace))

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

    def publish(self, config: Config) -> None:
        """A reload applied: every worker routes by the new models from its next request on."""
        for link in self._links:
            link.channel.send(("config", config))

    def drain(self, grace: float) -> None:
        self._drain_grace = grace
        for link in self._links:
            link.channel.send(("drain", grace))

    async def wait_drained(self, seconds: float) -> bool:
        """Until every connected worker says its requests are over (True), or ``seconds`` pass."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not all(link.drained for link in self._links):
                    await self._changed.wait()
        return all(link.drained for link in self._links)

    def stop(self) -> None:
        """Drained everywhere: the workers close the port together, and exit."""
        for link in self._links:
            link.channel.send(("stop",))

    def hurry(self) -> None:
        for link in self._links:
            link.channel.send(("hurry",))

    async def scrape(self, seconds: float = 2.0) -> list[str]:
        """Every worker's metrics, as exposition text; a worker that does not answer in time is left out."""
        loop = asyncio.get_running_loop()
        asked: list[asyncio.Future[str]] = []
        for link in self._links:
            self._seq += 1
            future = self._scrapes[self._seq] = loop.create_future()
            link.channel.send(("metrics", self._seq))
            future.add_done_callback(lambda _, seq=self._seq: self._scrapes.pop(seq, None))
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

    def metrics_arrived(self, seq: int, text: str) -> None:
        future = self._scrapes.get(seq)
        if future is not None and not future.done():
            future.set_result(text)

    async def close(self) -> None:
        for link in list(self._links):
            link.channel.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
