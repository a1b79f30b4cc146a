"""What the request path may ask of whoever owns the engines: the lease source, a lease, a replica handle.

Two implementations meet these Protocols: ``EnginePool`` (the engines live in this process) and a
worker's ``RemotePool`` (gateway/workers: leases borrowed from the owner over a Unix socket). The
request path (gateway/proxy) is written against these types only, so it cannot tell them apart, and the
type checker holds both to the same contract.

The rules the types carry:

* A lease is the request's claim on a replica, from ``admit`` until ``release``; holding one *is* being in
  flight (the lease source counts leases: nobody else writes a replica's in-flight count).
* ``report(ok)`` is passive health (what real traffic said about the replica): it may act at once (the
  owner's pool) or travel with the release (a worker's); either way the request path only reports.
* A granted lease is on a replica that was READY when granted. A queued request resumed after its replica
  died is refused (``Refused("not_ready")``, a 503 with Retry-After), never handed a dead replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engines.scheduling.entry import ModelEntry

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typeshed's: for the checker only, nothing imported at run time


@dataclass(frozen=True, slots=True)
class Claim:
    """What a request says about itself when it asks for a replica.

    ``priority``: higher is served sooner, within a model's queue and when models compete for GPUs (the
    request's ``X-Priority``, at most its key's ``priority``); a request that waited ``swap.max_wait`` goes
    first whatever its priority, so nothing starves. ``affinity``: a stable 63-bit hash of the conversation
    (``X-Session-ID``, the body's ``user``, else the prompt's leading part): the same value goes to the same
    replica while that replica is not overloaded (consistent hashing with bounded load), so the engine's
    prefix cache holds it. None: the least busy replica.
    """

    priority: int = 0
    affinity: int | None = None


NO_CLAIM = Claim()


class ReplicaHandle(Protocol):
    """The replica a lease points at, as the request path sees it: which one, and where to send."""

    @property
    def replica(self) -> int: ...

    @property
    def base_url(self) -> str: ...


class ReplicaLease(Protocol):
    """One request's claim on a replica. ``release()`` when its answer is over (idempotent)."""

    @property
    def replica(self) -> ReplicaHandle: ...

    def report(self, ok: bool) -> None:
        """Passive health: a complete answer (True), or a connect error, 5xx, broken stream, timeout (False)."""

    def release(self) -> None: ...


class QueuePlace(Protocol):
    """A request waiting in a model's queue for its lease."""

    model: str

    async def wait(self, timeout: float, abandon: asyncio.Future[Any] | None = None) -> ReplicaLease:  # noqa: ASYNC109
        """The lease once granted; raises ``Refused`` (``"timeout"`` after ``timeout`` s) or ``Abandoned``."""
        ...


class LeaseSource(Protocol):
    """Where the request path gets its replicas: ``EnginePool`` or a worker's ``RemotePool``."""

    def resolve(self, name: str) -> ModelEntry | None:
        """The entry served under ``name`` (its name or an alias), or None."""

    def entries(self) -> Sequence[ModelEntry]: ...

    async def admit(self, entry: ModelEntry, claim: Claim = NO_CLAIM) -> ReplicaLease | QueuePlace:
        """A lease at once, or a place in the model's queue; raises ``Refused`` when neither."""
        ...

    async def reroute(self, entry: ModelEntry, failed: ReplicaLease) -> ReplicaLease | None:
        """A lease on another ready replica, for a request whose ``failed`` lease's replica refused the
        connection (nothing was sent). None when there is none; ``failed`` stays the caller's to report and release."""
        ...


def is_queued(got: ReplicaLease | QueuePlace) -> TypeIs[QueuePlace]:
    """Whether ``admit`` answered with a place in the queue rather than a lease. One attribute lookup: the
    request path asks it per request, where ``isinstance`` on a runtime Protocol would cost microseconds."""
    return hasattr(got, "wait")
