"""The states of one engine replica and the moves between them (docs/DESIGN.md, "The supervision loop")."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EngineState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"  # failing its probes: out of rotation, its requests in flight left to finish
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"
    # Asleep (vLLM /sleep, SGLang release_memory_occupation, LMDeploy /sleep): the process lives, its GPU
    # memory is given back (weights in host RAM at level 1), out of rotation. Never restarted while asleep.
    SLEEPING = "sleeping"
    WAKING = "waking"  # the wake call is sent: READY once it answered and the health check passes


_S = EngineState

# Written out rather than derived so that a new move is a visible, reviewed change (and a test failure).
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    _S.STOPPED: frozenset({_S.STARTING}),
    # FAILED straight from STARTING/READY: a crash that spends the budget skips BACKOFF.
    _S.STARTING: frozenset({_S.READY, _S.BACKOFF, _S.FAILED, _S.STOPPING}),
    # READY → STARTING only for remote engines: they cannot be restarted, only waited for again.
    _S.READY: frozenset({_S.BACKOFF, _S.FAILED, _S.STOPPING, _S.STARTING, _S.UNHEALTHY, _S.SLEEPING}),
    # Back in rotation when its probes pass again, restarted when they fail for health.restart_grace.
    _S.UNHEALTHY: frozenset({_S.READY, _S.BACKOFF, _S.FAILED, _S.STOPPING}),
    _S.BACKOFF: frozenset({_S.STARTING, _S.STOPPING}),
    _S.FAILED: frozenset({_S.STARTING, _S.STOPPING}),
    # STOPPING → STARTING is a restart command: the old launch is gone, the new one begins.
    _S.STOPPING: frozenset({_S.STOPPED, _S.STARTING}),
    # SLEEPING → STOPPED: it died asleep. It is not restarted: a restart would take GPU memory nobody asked for.
    _S.SLEEPING: frozenset({_S.WAKING, _S.STOPPING, _S.STOPPED}),
    # WAKING → BACKOFF: the wake failed or it died waking; the restart is a cold start.
    _S.WAKING: frozenset({_S.READY, _S.BACKOFF, _S.FAILED, _S.STOPPING}),
}


def can_transition(old: EngineState, new: EngineState) -> bool:
    return new in TRANSITIONS[old]


@dataclass(frozen=True)
class StateChanged:
    """Published by a supervisor on every move; metrics and logging subscribe instead of being called inline."""

    model: str
    replica: int
    old: EngineState
    new: EngineState
    at: float  # wall-clock time (time.time())
    reason: str
