"""A request's side of the scheduler: a Lease on a replica, or a place in the queue to wait on.

The pool hands these out (``EnginePool.request``); they talk back to its scheduler: a release frees the
slot and stamps the model's last use, a waiter that leaves is withdrawn from the queue.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from engines.scheduling.scheduler import Refused, Ticket

if TYPE_CHECKING:
    from engines.replica.supervisor import Supervisor
    from engines.scheduling.pool import EnginePool


class Lease:
    """One request's claim on a replica. ``release()`` when its answer is over (idempotent)."""

    __slots__ = ("_index", "_key", "_pool", "_released", "replica")

    def __init__(self, pool: EnginePool, key: int, index: int, replica: Supervisor) -> None:
        self._pool, self._key, self._index, self.replica = pool, key, index, replica
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._scheduler.release(self._key, self._index, self._pool._clock())


class Abandoned(Exception):
    """The waiter's ``abandon`` future completed first (its client left): it is out of the queue."""


class Waiting:
    """A request in a model's queue: ``await wait(...)`` for its Lease."""

    def __init__(self, pool: EnginePool, ticket: Ticket, model: str) -> None:
        self._pool, self._ticket, self.model = pool, ticket, model

    async def wait(self, timeout: float, abandon: asyncio.Future[Any] | None = None) -> Lease:  # noqa: ASYNC109
        """The Lease once granted; raises Refused (incl. "timeout" after ``timeout`` s) or Abandoned."""
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
            return self._pool._lease(self._ticket.key, future.result())  # result() raises a Refused
        self.cancel()
        raise Refused("timeout", self.model)

    def cancel(self) -> None:
        """Leave the queue; a grant that arrived meanwhile is handed straight back."""
        future: asyncio.Future[int] = self._ticket.waiter
        pool = self._pool
        if future.done():
            if not future.cancelled() and future.exception() is None:
                pool._scheduler.release(self._ticket.key, future.result(), pool._clock())
            return
        future.cancel()
        pool._scheduler.withdraw(self._ticket, pool._clock())
