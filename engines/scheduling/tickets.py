"""What passes between the request path, the scheduler and its effects: tickets, refusals, the Effects
interface and the status the scheduler reports. Plain data, no decisions (those are engines/scheduling/scheduler.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

# not_ready: a queued request's grant found its replica no longer READY when the request woke (it crashed
# meanwhile): a 503 to retry, never a dead replica's address.
Refusal = Literal["queue_full", "failed", "stopped", "unavailable", "removed", "shutdown", "timeout", "not_ready"]


class Refused(Exception):
    """A request that will not get a replica; ``reason`` says why (the gateway maps it to 429/503/404)."""

    def __init__(self, reason: Refusal, model: str) -> None:
        super().__init__(f"{model}: {reason}")
        self.reason: Refusal = reason
        self.model = model


@dataclass(eq=False)
class Ticket:
    """One waiting request. ``waiter`` is the effects' handle (the pool's future); the scheduler never touches it."""

    key: int
    arrived: float
    waiter: Any = None
    priority: int = 0  # higher first (engines/scheduling/contract.py ``Claim``)
    affinity: int | None = None  # the replica it prefers, as a hash (None: the least busy)


class Effects(Protocol):
    def start(self, key: int) -> None:
        """Start every replica of the model; returns at once, progress comes back as ``replica_changed``."""

    def stop(self, key: int) -> None:
        """Stop every replica (process trees verified gone); progress comes back as ``replica_changed``."""

    def sleep(self, key: int) -> None:
        """Put every replica to sleep (a replica that cannot is stopped instead); progress as ``replica_changed``."""

    def wake(self, key: int) -> None:
        """Wake every sleeping replica (one that fails to wake is restarted cold); progress as ``replica_changed``."""

    def grant(self, ticket: Ticket, replica: int) -> bool:
        """Wake a waiter with its replica; False when it has already left (nothing was granted)."""

    def refuse(self, ticket: Ticket, error: Refused) -> None:
        """Wake a waiter with a refusal."""

    def retired(self, key: int) -> None:
        """A model removed or replaced by a reload is stopped and forgotten: its supervisors may go."""


class Phase(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    SLEEPING = "sleeping"  # every replica asleep: back in seconds on its next request (a wake, not a start)


@dataclass(frozen=True)
class ModelStatus:
    phase: Phase
    queued: int
    active: int
    parked: bool  # stopped by an operator: refused until started again
    standby: bool  # stopped by the scheduler (idle, swap): starts again on its next request
    draining_for: str | None
    ejected: tuple[int, ...]
    sticky: int = 0  # grants with an affinity that went to the replica hashing gave them
    spilled: int = 0  # grants with an affinity that spilled over (that replica was over the load bound)
