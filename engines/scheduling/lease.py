"""A request's side of the scheduler: a Lease on a replica, or a place in the queue to wait on.

The pool hands these out (``EnginePool.request``). They talk back through ``Desk``, the narrow interface
the pool passes in (not the pool itself): a release frees the slot and stamps the model's last use, a
report is passive health for the replica, a waiter that leaves is withdrawn from the queue, and a grant
that arrives for a waiter becomes a Lease only if its replica is still READY.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from engines.scheduling.tickets import Refused, Ticket


@dataclass(frozen=True, slots=True)
class Granted:
    """The replica a lease points at, fixed when it was granted: which one, and the address it was READY at."""

    replica: int
    base_url: str


class Desk(Protocol):
    """What leases and waiters talk back to: the keeper of the lease count (one writer: the scheduler)."""

    def lease(self, key: int, index: int) -> Lease:
        """A Lease for a slot the scheduler granted; raises ``Refused("not_ready")`` (slot given back)
        when the replica left READY between the grant and now."""
        ...

    def release(self, key: int, index: int) -> None: ...

    def report(self, key: int, index: int, ok: bool) -> None: ...

    def withdraw(self, ticket: Ticket) -> None: ...


class Lease:
    """One request's claim on a replica. ``release()`` when its answer is over (idempotent)."""

    __slots__ = ("_desk", "_index", "_key", "_released", "replica")

    def __init__(self, desk: Desk, key: int, index: int, replica: Granted) -> None:
        self._desk, self._key, self._index, self.replica = desk, key, index, replica
        self._released = False

    def report(self, ok: bool) -> None:
        """Passive health, told to the replica at once (the scheduler may eject it from rotation)."""
        self._desk.report(self._key, self._index, ok)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._desk.release(self._key, self._index)


class Abandoned(Exception):
    """The waiter's ``abandon`` future completed first (its client left): it is out of the queue."""


class Waiting:
    """A request in a model's queue: ``await wait(...)`` for its Lease."""

    def __init__(self, desk: Desk, ticket: Ticket, model: str) -> None:
        self._desk, self._ticket, self.model = desk, ticket, model

    async def wait(self, timeout: float, abandon: asyncio.Future[Any] | None = None) -> Lease:  # noqa: ASYNC109
        """The Lease once granted; raises Refused (incl. "timeout" after ``timeout`` s, "not_ready" when
        its replica left READY before the waiter woke) or Abandoned."""
        future: asyncio.Future[int] = self._ticket.waiter
        try:
            await asyncio.wait(
                {future} if abandon is None else {future, abandon}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            self.cancel()
            raise
        if abandon is not None and abandon.done():
            self.cancel()
            raise Abandoned(self.model)
        if future.done():
            return self._desk.lease(self._ticket.key, future.result())  # result() raises a Refused
        self.cancel()
        raise Refused("timeout", self.model)

    def cancel(self) -> None:
        """Leave the queue; a grant that arrived meanwhile is handed straight back."""
        future: asyncio.Future[int] = self._ticket.waiter
        if future.done():
            if not future.cancelled() and future.exception() is None:
                self._desk.release(self._ticket.key, future.result())
            return
        future.cancel()
        self._desk.withdraw(self._ticket)
