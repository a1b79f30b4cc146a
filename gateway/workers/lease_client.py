"""A worker's side of the control line: the owner's models to route by, and leases taken from its hub.

``RemotePool`` offers the request path what ``EnginePool`` offers it (``resolve``, ``entries``, ``admit``,
``reroute``), so the routes and the relay do not know which process owns the engines. Each lease is one
round trip on a Unix socket; its release is one message, carrying the outcome the relay reported.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from engines.adapters import adapter_for
from engines.scheduling.lease import Abandoned
from engines.scheduling.pool import ModelEntry
from engines.scheduling.scheduler import Refused
from engines.spec import ModelSpec
from gateway.workers.wire import Channel

log = logging.getLogger("gateway.workers")


class RemoteReplica:
    """The replica a lease points at, as the relay sees it: where to send, and what to report."""

    __slots__ = ("base_url", "inflight", "outcome", "replica")

    def __init__(self, replica: int, base_url: str) -> None:
        self.replica = replica
        self.base_url = base_url
        self.inflight = 0
        self.outcome: bool | None = None  # the last report; travels with the release

    def report_failure(self) -> None:
        self.outcome = False

    def report_success(self) -> None:
        self.outcome = True


class RemoteLease:
    __slots__ = ("_link", "_released", "lid", "replica")

    def __init__(self, link: OwnerLink, lid: int, replica: RemoteReplica) -> None:
        self._link, self.lid, self.replica = link, lid, replica
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._link.channel.send(("rel", self.lid, self.replica.outcome))


class RemoteWaiting:
    """A place in the owner's queue for a model; ``wait`` as ``engines.scheduling.lease.Waiting.wait``."""

    def __init__(self, link: OwnerLink, lid: int, model: str) -> None:
        self._link, self._lid, self.model = link, lid, model

    async def wait(self, timeout: float, abandon: asyncio.Future[Any] | None = None) -> RemoteLease:  # noqa: ASYNC109
        answer = self._link.ask(self._lid, ("wait", self._lid, timeout))
        try:
            await asyncio.wait({answer} if abandon is None else {answer, abandon}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._give_up(answer)
            raise
        if not answer.done():
            self._give_up(answer)
            raise Abandoned(self.model)
        return self._link.lease(self._lid, answer.result(), self.model)

    def _give_up(self, answer: asyncio.Future[Any]) -> None:
        answer.cancel()
        self._link.forget(self._lid)
        self._link.channel.send(("cancel", self._lid))  # a grant already on its way is given back by the hub


class OwnerLink:
    """The connection to the owner's hub: requests and their answers, matched by lease id."""

    def __init__(self, on_message: Callable[[tuple[Any, ...]], None]) -> None:
        self.channel = Channel(self._arrived, self._lost)
        self._unhandled = on_message
        self._answers: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self._ids = itertools.count(1)
        self.lost = False

    @classmethod
    async def connect(cls, path: str, worker: int, on_message: Callable[[tuple[Any, ...]], None]) -> OwnerLink:
        link = cls(on_message)
        await asyncio.get_running_loop().create_unix_connection(lambda: link.channel, path)
        link.channel.send(("hello", worker, os.getpid()))
        return link

    def next_id(self) -> int:
        return next(self._ids)

    def ask(self, lid: int, message: tuple[Any, ...]) -> asyncio.Future[tuple[Any, ...]]:
        future: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        if self.lost:
            future.set_exception(Refused("shutdown", "?"))
            return future
        self._answers[lid] = future
        self.channel.send(message)
        return future

    def forget(self, lid: int) -> None:
        self._answers.pop(lid, None)

    def lease(self, lid: int, answer: tuple[Any, ...], model: str) -> RemoteLease:
        """The lease an ``ok`` answer grants; a ``no`` raises its Refused."""
        if answer[0] == "ok":
            return RemoteLease(self, lid, RemoteReplica(answer[2], answer[3]))
        raise Refused(answer[2], model)

    def _arrived(self, message: tuple[Any, ...]) -> None:
        if message[0] in ("ok", "q", "no"):
            # No asker: it gave up and said so, and the hub gives back what it granted when the cancel arrives.
            future = self._answers.pop(message[1], None)
            if future is not None and not future.done():
                future.set_result(message)
            return
        self._unhandled(message)

    def _lost(self) -> None:
        self.lost = True
        answers, self._answers = self._answers, {}
        for future in answers.values():
            if not future.done():
                future.set_exception(Refused("shutdown", "?"))
        self._unhandled(("lost",))


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

    async def admit(self, entry: ModelEntry) -> RemoteLease | RemoteWaiting:
        link = self._link
        lid = link.next_id()
        answer = await link.ask(lid, ("acq", lid, entry.name))
        if answer[0] == "q":
            return RemoteWaiting(link, lid, entry.name)
        return link.lease(lid, answer, entry.name)

    async def reroute(self, entry: ModelEntry, failed: RemoteLease) -> RemoteLease | None:
        """A lease on another ready replica for a request whose ``failed`` lease's replica refused the connection."""
        link = self._link
        lid = link.next_id()
        answer = await link.ask(lid, ("fo", failed.lid, lid))
        return link.lease(lid, answer, entry.name) if answer[0] == "ok" else None
