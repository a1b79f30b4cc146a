"""The scheduler's model phases: the table of moves, and the scheduler walking it."""

from __future__ import annotations

import pytest
from test_engines_scheduler import ON_ARRIVAL, FakeEffects, ask, down, plan, up

from engines.replica.state import EngineState
from engines.scheduling.phases import TRANSITIONS, BadMove, ModelPhase, can_move, checked
from engines.scheduling.scheduler import Refused, Scheduler

P = ModelPhase
S = EngineState


def test_every_phase_has_a_row_no_self_loops_and_retired_is_terminal() -> None:
    assert set(TRANSITIONS) == set(P)
    for phase, targets in TRANSITIONS.items():
        assert phase not in targets
    assert TRANSITIONS[P.RETIRED] == frozenset()


def test_the_moves_of_the_table() -> None:
    allowed = {
        (P.DOWN, P.STARTING),
        (P.DOWN, P.STANDBY),
        (P.DOWN, P.PARKED),
        (P.DOWN, P.RETIRED),
        (P.STANDBY, P.STARTING),
        (P.STANDBY, P.PARKED),
        (P.STANDBY, P.RETIRED),
        (P.PARKED, P.DOWN),
        (P.PARKED, P.RETIRED),
        (P.STARTING, P.RUNNING),
        (P.STARTING, P.DOWN),
        (P.STARTING, P.STOPPING),
        (P.STARTING, P.PARKING),
        (P.RUNNING, P.DOWN),
        (P.RUNNING, P.STOPPING),
        (P.RUNNING, P.PARKING),
        (P.STOPPING, P.STANDBY),
        (P.STOPPING, P.PARKING),
        (P.STOPPING, P.RETIRED),
        (P.PARKING, P.PARKED),
        (P.PARKING, P.STOPPING),
        (P.PARKING, P.RETIRED),
        (P.RUNNING, P.SLEEPING),
        (P.SLEEPING, P.WAKING),
        (P.SLEEPING, P.STOPPING),
        (P.SLEEPING, P.PARKING),
        (P.SLEEPING, P.STANDBY),
        (P.SLEEPING, P.RETIRED),
        (P.WAKING, P.RUNNING),
        (P.WAKING, P.DOWN),
        (P.WAKING, P.STOPPING),
        (P.WAKING, P.PARKING),
    }
    for old in P:
        for new in P:
            assert can_move(old, new) == ((old, new) in allowed), (old, new)


def test_only_a_launch_starts_a_model_and_only_a_stop_sent_or_nothing_running_retires_it() -> None:
    assert {p for p in P if can_move(p, P.STARTING)} == {P.DOWN, P.STANDBY}
    assert {p for p in P if can_move(p, P.RETIRED)} == {P.DOWN, P.STANDBY, P.PARKED, P.STOPPING, P.PARKING, P.SLEEPING}
    assert {p for p in P if can_move(p, P.WAKING)} == {P.SLEEPING}  # only a sleeper wakes


def test_a_move_outside_the_table_raises_and_staying_put_is_no_move() -> None:
    assert checked("a", P.RUNNING, P.RUNNING) is P.RUNNING
    assert checked("a", P.RUNNING, P.STOPPING) is P.STOPPING
    with pytest.raises(BadMove, match="a: no move standby → running"):
        checked("a", P.STANDBY, P.RUNNING)
    with pytest.raises(BadMove):
        checked("a", P.RETIRED, P.DOWN)


def test_the_scheduler_walks_a_model_through_its_phases() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a", idle_timeout=10), 0)
    assert s.phase(1) is P.DOWN
    ask(s, 1, 1)
    assert s.phase(1) is P.STARTING  # launched for its waiter
    up(s, 1, now=2)
    assert s.phase(1) is P.RUNNING
    s.release(1, 0, 3)  # the waiter's answer is over
    s.tick(20)
    assert s.phase(1) is P.STOPPING  # idle: drained (nothing in flight) and the stop sent
    down(s, 1, now=21)
    assert s.phase(1) is P.STANDBY
    s.stop(1, 22)
    assert s.phase(1) is P.PARKED  # nothing ran: parked at once
    s.start(1, 23)
    assert s.phase(1) is P.STARTING  # un-parked (DOWN) and launched in one call
    up(s, 1, now=24)
    s.stop(1, 25)
    assert s.phase(1) is P.PARKING
    down(s, 1, now=26)
    assert s.phase(1) is P.PARKED
    with pytest.raises(Refused, match="stopped"):
        ask(s, 1, 27)
    s.start(1, 28)
    up(s, 1, now=29)
    s.replica_changed(1, 0, S.BACKOFF, 30)
    s.replica_changed(1, 0, S.FAILED, 31)
    assert s.phase(1) is P.DOWN  # crash-looped behind our back
    s.retire(1, 32)
    assert s.phase(1) is P.RETIRED and fx.took("retired") == [1]


def test_a_cold_start_that_crashes_before_serving_is_running_and_refuses_its_waiters() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a"), 0)
    ticket, _ = ask(s, 1, 1)
    s.replica_changed(1, 0, S.STARTING, 2)
    s.replica_changed(1, 0, S.BACKOFF, 3)
    assert s.phase(1) is P.RUNNING and fx.refused == {id(ticket): "unavailable"}
