"""A model's lifecycle as the scheduler drives it: the phases and the moves between them, checked on every move.

The replica's own states (engines/replica/state.py) are what its supervisor sees; these are what the
scheduler decided for the model as a whole. Two more facts travel beside the phase, as data: ``drain``
(a stop asked for once the model's requests are over, and why: idle, swap:<model>, reload, operator)
and ``want`` (a start asked for without a waiter, and when).

    DOWN, STANDBY ──launch──▶ STARTING ──a replica READY (or it crashed before it served)──▶ RUNNING
    STARTING, RUNNING ──every replica down, nobody asked──▶ DOWN (──▶ STANDBY if a drain was asked for)
    STARTING, RUNNING ──drain over: stop sent──▶ STOPPING ──every replica down──▶ STANDBY
    STARTING, RUNNING, STOPPING ──operator stop──▶ PARKING ──every replica down──▶ PARKED
    DOWN, STANDBY ──operator stop (nothing runs)──▶ PARKED ──operator start──▶ DOWN
    PARKING ──operator start──▶ STOPPING
    DOWN, STANDBY, PARKED, STOPPING, PARKING ──a retiring version, once down──▶ RETIRED (forgotten)
    RUNNING ──drained for a swap, it can sleep: sleep sent──▶ SLEEPING ──a request──▶ WAKING ──READY──▶ RUNNING
    SLEEPING ──evicted (sleep RAM budget), idle, reload──▶ STOPPING;  ──operator stop──▶ PARKING
    SLEEPING ──every replica down (died asleep, or stopped because it could not sleep)──▶ STANDBY (RETIRED)
"""

from __future__ import annotations

from enum import StrEnum


class ModelPhase(StrEnum):
    DOWN = "down"  # not running; a request or a start asked for launches it
    STANDBY = "standby"  # DOWN after the scheduler stopped it (idle, swapped out): back on its next request
    PARKED = "parked"  # stopped by an operator: refused until started again
    STARTING = "starting"  # launched, not READY since ("cold"): requests wait for it
    RUNNING = "running"  # READY since its launch (a crash-restart now answers 503 at once, no waiting)
    STOPPING = "stopping"  # a drain is over, the stop is sent: STANDBY (or RETIRED) once every replica is down
    PARKING = "parking"  # an operator's stop is sent: PARKED (or RETIRED) once every replica is down
    RETIRED = "retired"  # removed or replaced by a reload, and stopped: forgotten
    # Put to sleep for a swap: its process stays, its GPUs are free once every replica is SLEEPING, and its
    # next request wakes it (seconds) instead of starting it cold (minutes).
    SLEEPING = "sleeping"
    WAKING = "waking"  # wake sent: requests wait for it as for a start


_P = ModelPhase
UP = frozenset({_P.STARTING, _P.RUNNING, _P.WAKING})  # started (or woken) by the scheduler, not asked to stop
COLD = frozenset({_P.STARTING, _P.WAKING})  # asked to come up and not READY since: requests wait for it
STOP_SENT = frozenset({_P.STOPPING, _P.PARKING})
PARKED_BY_OPERATOR = frozenset({_P.PARKED, _P.PARKING})

# Written out rather than derived so that a new move is a visible, reviewed change (and a test failure).
TRANSITIONS: dict[ModelPhase, frozenset[ModelPhase]] = {
    # DOWN → STANDBY: it went down behind our back while a drain was asked for; the drain is then over.
    _P.DOWN: frozenset({_P.STARTING, _P.STANDBY, _P.PARKED, _P.RETIRED}),
    _P.STANDBY: frozenset({_P.STARTING, _P.PARKED, _P.RETIRED}),
    _P.PARKED: frozenset({_P.DOWN, _P.RETIRED}),
    # STARTING → RUNNING also when it crashed before it ever served: its waiters got their 503.
    _P.STARTING: frozenset({_P.RUNNING, _P.DOWN, _P.STOPPING, _P.PARKING}),
    _P.RUNNING: frozenset({_P.DOWN, _P.STOPPING, _P.PARKING, _P.SLEEPING}),
    # SLEEPING → RETIRED: a retiring version that died asleep (nothing left to stop).
    _P.SLEEPING: frozenset({_P.WAKING, _P.STOPPING, _P.PARKING, _P.STANDBY, _P.RETIRED}),
    # WAKING → RUNNING also when the wake failed and its cold restart crashed: its waiters got their 503.
    _P.WAKING: frozenset({_P.RUNNING, _P.DOWN, _P.STOPPING, _P.PARKING}),
    # STOPPING ↔ PARKING: an operator's stop, or start, while the replicas are on their way down.
    _P.STOPPING: frozenset({_P.STANDBY, _P.PARKING, _P.RETIRED}),
    _P.PARKING: frozenset({_P.PARKED, _P.STOPPING, _P.RETIRED}),
    _P.RETIRED: frozenset(),
}


def can_move(old: ModelPhase, new: ModelPhase) -> bool:
    return new in TRANSITIONS[old]


class BadMove(RuntimeError):
    """A move the table does not allow: a scheduler bug, never a state to carry on from."""


def checked(model: str, old: ModelPhase, new: ModelPhase) -> ModelPhase:
    """``new``, if the table allows ``old`` → ``new`` (staying put is no move); raises BadMove otherwise."""
    if new is not old and not can_move(old, new):
        raise BadMove(f"{model}: no move {old} → {new}")
    return new
