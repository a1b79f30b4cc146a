"""A worker's side of the control line: the owner's models to route by, and leases taken from its hub.

``RemotePool`` is a ``LeaseSource`` (engines/scheduling/contract.py) as ``EnginePool`` is, so the routes
and the relay do not know which process owns the engines. Each lease is one round trip on a Unix
socket; its release is one message, carrying the outcome the request path reported on the lease.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from engines.adapters import adapter_for
from engines.scheduling.contract import NO_CLAIM, Claim, ReplicaLease
from engines.scheduling.lease import Abandoned
from engines.scheduling.pool import ModelEntry
from engines.scheduling.scheduler import Refused
from engines.spec import ModelSpec
from gateway.workers.messages import (
    Acquire,
    Answer,
    Cancel,
    ConfigUpdate,
    Denied,
    Drain,
    Failover,
    Granted,
    Hello,
    Hurry,
    Message,
    Ping,
    Pong,
    Queued,
    Release,
    Scrape,
    Stop,
    ToOwner,
    Wait,
)
from gateway.workers.wire import Channel

log = logging.getLogger("gateway.workers")
Order = ConfigUpdate | Scrape | Drain | Hurry | Stop  # what the owner tells a worker besides answers and pings


class RemoteReplica:
    """The replica a lease points at, as the request path sees it: which one, and where to send."""

    __slots__ = ("base_url", "replica")

    def __init__(self, replica: int, base_url: str) -> None:
        self.replica = replica
        self.base_url = base_url


class RemoteLease:
    """A lease the owner's hub granted: the hub holds the owner's lease until this one's release arrives."""

    __slots__ = ("_link", "_outcome", "_released", "lid", "replica")

    def __init__(self, link: OwnerLink, lid: int, replica: RemoteReplica) -> None:
        self._link, self.lid, self.replica = link, lid, replica
        self._outcome: bool | None = None
        self._released = False

    def report(self, ok: bool) -> None:
        """Kept until the release, which carries the last report to the hub (one message, not two)."""
        self._outcome = ok

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._link.channel.send(Release(self.lid, self._outcome))


class RemoteWaiting:
    """A place in the owner's queue for a model (a ``QueuePlace``)."""

    def __init__(self, link: OwnerLink, lid: int, model: str) -> None:
        self._link, self._lid, self.model = link, lid, model

    async def wait(self, timeout: float, abandon: asyncio.Future[Any] | None = None) -> RemoteLease:  # noqa: ASYNC109
        """The lease once granted; raises ``Refused`` (``"timeout"`` after ``timeout`` s) or ``Abandoned``."""
        answer = self._link.ask(Wait(self._lid, timeout))
        try:
            await asyncio.wait({answer} if abandon is None else {answer, abandon}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._give_up(answer)
            raise
        if not answer.done():
            self._give_up(answer)
            raise Abandoned(self.model)
        return self._link.lease(answer.result(), self.model)

    def _give_up(self, answer: asyncio.Future[Answer]) -> None:
        answer.cancel()
        self._link.forget(self._lid)
        self._link.channel.send(Cancel(self._lid))  # a grant already on its way is given back by the hub


class OwnerLink:
    """The connection to the owner's hub: requests and their answers, matched by lease id. Pings are
    answered here; every other message from the owner goes to ``on_order``, and ``on_lost`` runs once
    if the line drops."""

    def __init__(self, on_order: Callable[[Order], None], on_lost: Callable[[], None] = lambda: None) -> None:
        self.channel: Channel[ToOwner] = Channel(self._arrived, self._lost)
        self._on_order = on_order
        self._on_lost = on_lost
        self._answers: dict[int, asyncio.Future[Answer]] = {}
        self._ids = itertools.count(1)
        self.lost = False

    @classmethod
    async def connect(
        cls, path: str, worker: int, on_order: Callable[[Order], None], on_lost: Callable[[], None] = lambda: None
    ) -> OwnerLink:
        link = cls(on_order, on_lost)
        await asyncio.get_running_loop().create_unix_connection(lambda: link.channel, path)
        link.channel.send(Hello(worker, os.getpid()))
        return link

    def next_id(self) -> int:
        return next(self._ids)

    def ask(self, message: Acquire | Wait | Failover) -> asyncio.Future[Answer]:
        """Send a request for a lease; its answer comes under the message's lease id."""
        lid = message.new_lid if isinstance(message, Failover) else message.lid
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        if self.lost:
            future.set_exception(Refused("shutdown", "?"))
            return future
        self._answers[lid] = future
        self.channel.send(message)
        return future

    def forget(self, lid: int) -> None:
        self._answers.pop(lid, None)

    def lease(self, answer: Answer, model: str) -> RemoteLease:
        """The lease a ``Granted`` answer grants; a ``Denied`` raises its Refused."""
        match answer:
            case Granted(lid, replica, base_url):
                return RemoteLease(self, lid, RemoteReplica(replica, base_url))
            case Denied(_, reason):
                raise Refused(reason, model)
            case Queued():
                raise RuntimeError("a queue place where a lease was expected")

    def _arrived(self, message: Message) -> None:
        match message:
            case Granted(lid) | Queued(lid) | Denied(lid):
                # No asker: it gave up and said so, and the hub gives back what it granted when the cancel arrives.
                future = self._answers.pop(lid, None)
                if future is not None and not future.done():
                    future.set_result(message)
            case Ping(seq):
                self.channel.send(Pong(seq))
            case ConfigUpdate() | Scrape() | Drain() | Hurry() | Stop():
                self._on_order(message)
            case _:
                log.warning("control line: unexpected %s from the owner", type(message).__name__)

    def _lost(self) -> None:
        self.lost = True
        answers, self._answers = self._answers, {}
        for future in answers.values():
            if not future.done():
                future.set_exception(Refused("shutdown", "?"))
        self._on_lost()


class RemotePool:
    """The owner's models, as this worker routes by them; leases come from the owner."""

    def __init__(self, link: OwnerLink, specs: Sequence[ModelSpec]) -> None:
        self._link = link
        self._entries: dict[str, ModelEntry] = {}
        self._by_name: dict[str, ModelEntry] = {}
        self.update(specs)

    def update(self, specs: Sequence[ModelSpec]) -> None:
        """The owner's models after a reload (validated there: names are unique)."""
        entries: dict[str, ModelEntry] = {}
        by_name: dict[str, ModelEntry] = {}
        for spec in specs:
            old = self._entries.get(spec.name)
            if old is not None and old.spec == spec:
                entry = old
            else:
                adapter = adapter_for(spec.engine)
                entry = ModelEntry(spec, adapter, request_model=adapter.request_model(spec))
            entries[spec.name] = entry
            for name in spec.served_names:
                by_name[name] = entry
        self._entries, self._by_name = entries, by_name

    def resolve(self, name: str) -> ModelEntry | None:
        return self._by_name.get(name)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    async def admit(self, entry: ModelEntry, claim: Claim = NO_CLAIM) -> RemoteLease | RemoteWaiting:
        """A lease from the owner's scheduler, which reads ``claim`` as it would a request of its own."""
        link = self._link
        lid = link.next_id()
        answer = await link.ask(Acquire(lid, entry.name, claim.priority, claim.affinity))
        if isinstance(answer, Queued):
            return RemoteWaiting(link, lid, entry.name)
        return link.lease(answer, entry.name)

    async def reroute(self, entry: ModelEntry, failed: ReplicaLease) -> RemoteLease | None:
        """A lease on another ready replica for a request whose ``failed`` lease's replica refused the connection."""
        if not isinstance(failed, RemoteLease):
            raise TypeError("a worker fails over only from a lease its owner granted")
        link = self._link
        answer = await link.ask(Failover(failed.lid, link.next_id()))
        return link.lease(answer, entry.name) if isinstance(answer, Granted) else None
