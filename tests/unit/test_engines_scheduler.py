"""The scheduler's decisions against a fake Effects: no processes, no event loop, time passed by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from engines.replica.state import EngineState
from engines.scheduling.placement import ModelPlan, SwapPolicy
from engines.scheduling.scheduler import Phase, Refused, Scheduler, Ticket
from engines.spec import OutlierPolicy

S = EngineState
# The mechanics of a swap, free of the anti-thrash policy (tests/unit/test_swap_policy.py has that).
ON_ARRIVAL = SwapPolicy.on_arrival()


@dataclass
class FakeEffects:
    calls: list[tuple[str, Any]] = field(default_factory=list)
    granted: dict[int, int] = field(default_factory=dict)  # id(ticket) → replica
    refused: dict[int, str] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)  # tickets whose waiter left before the grant
    # Every ticket seen, kept alive: the dicts above are keyed by id(), and a freed ticket's id may be reused.
    seen: list[Ticket] = field(default_factory=list)

    def start(self, key: int) -> None:
        self.calls.append(("start", key))

    def stop(self, key: int) -> None:
        self.calls.append(("stop", key))

    def sleep(self, key: int) -> None:
        self.calls.append(("sleep", key))

    def wake(self, key: int) -> None:
        self.calls.append(("wake", key))

    def grant(self, ticket: Ticket, replica: int) -> bool:
        self.seen.append(ticket)
        if id(ticket) in self.gone:
            return False
        self.granted[id(ticket)] = replica
        return True

    def refuse(self, ticket: Ticket, error: Refused) -> None:
        self.seen.append(ticket)
        self.refused[id(ticket)] = error.reason

    def retired(self, key: int) -> None:
        self.calls.append(("retired", key))

    def took(self, kind: str) -> list[Any]:
        return [key for k, key in self.calls if k == kind]


def plan(name: str, gpus: tuple[int, ...] = (0,), **kw: Any) -> ModelPlan:
    return ModelPlan(name=name, gpus=frozenset(gpus), on_demand=True, **kw)


def up(s: Scheduler, key: int, replicas: int = 1, now: float = 0.0) -> None:
    for i in range(replicas):
        s.replica_changed(key, i, S.STARTING, now)
        s.replica_changed(key, i, S.READY, now)


def down(s: Scheduler, key: int, replicas: int = 1, now: float = 0.0) -> None:
    for i in range(replicas):
        s.replica_changed(key, i, S.STOPPING, now)
        s.replica_changed(key, i, S.STOPPED, now)


def ask(s: Scheduler, key: int, now: float = 0.0) -> tuple[Ticket, int | None]:
    ticket = Ticket(key, now)
    return ticket, s.request(ticket, now)


def test_first_request_starts_the_model_and_waits_then_all_waiters_are_served_in_order() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a"), 0)
    t1, got1 = ask(s, 1, 1)
    t2, got2 = ask(s, 1, 2)
    assert got1 is got2 is None and fx.took("start") == [1]  # one start, however many wait
    assert s.status(1, 2).phase is Phase.STARTING and s.status(1, 2).queued == 2
    up(s, 1, now=3)
    assert fx.granted == {id(t1): 0, id(t2): 0} and s.status(1, 3).active == 2
    _, now = ask(s, 1, 4)
    assert now == 0  # ready and nobody waiting: straight through


def test_queue_full_and_crash_restart_refuse_at_once() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a", max_queue=2), 0)
    ask(s, 1)
    ask(s, 1)
    with pytest.raises(Refused) as full:
        ask(s, 1)
    assert full.value.reason == "queue_full"
    up(s, 1)
    s.replica_changed(1, 0, S.BACKOFF, 5)  # it crashed after being ready: 503 now, not a long wait
    with pytest.raises(Refused) as gap:
        ask(s, 1, 5)
    assert gap.value.reason == "unavailable"


def test_a_withdrawn_waiter_never_gets_a_replica() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a"), 0)
    left, _ = ask(s, 1)
    stays, _ = ask(s, 1)
    s.withdraw(left, 1)
    assert s.status(1, 1).queued == 1
    up(s, 1)
    assert id(left) not in fx.granted and fx.granted[id(stays)] == 0
    # A waiter that left between the grant decision and its wake-up is not counted as in flight.
    s.add(2, plan("b", gpus=(1,)), 0)
    late, _ = ask(s, 2)
    fx.gone.add(id(late))
    up(s, 2)
    assert s.status(2, 0).active == 0


def test_swap_drains_the_running_model_before_starting_the_other() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a"), 0)
    s.add(2, plan("b"), 0)
    ask(s, 1, 1)
    up(s, 1, now=1)
    b_waiter, _ = ask(s, 2, 2)
    assert s.status(1, 2).phase is Phase.DRAINING and fx.took("stop") == []  # a's request still in flight
    a_late, got = ask(s, 1, 2.5)
    assert got is None  # draining: new requests for it queue
    s.release(1, 0, 3)
    assert fx.took("stop") == [1] and fx.took("start") == [1]  # b not started while a's tree may live
    down(s, 1, now=4)
    assert fx.took("start") == [1, 2]
    up(s, 2, now=5)
    assert fx.granted[id(b_waiter)] == 0
    # a's late waiter is older than nothing b has queued: b is drained next, then a comes back.
    s.release(2, 0, 6)
    assert fx.took("stop") == [1, 2]
    down(s, 2, now=7)
    assert fx.took("start") == [1, 2, 1]
    up(s, 1, now=8)
    assert fx.granted[id(a_late)] == 0


def test_fifo_across_models_a_younger_demand_does_not_drain_a_model_with_older_waiters() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a", max_concurrency=1), 0)
    s.add(2, plan("b"), 0)
    ask(s, 1, 0)
    up(s, 1)
    older, _ = ask(s, 1, 1)  # waits for a's one slot
    ask(s, 2, 2)
    assert s.status(1, 2).phase is Phase.READY  # b must wait: a has a waiter from before b's
    s.release(1, 0, 3)
    assert fx.granted[id(older)] == 0 and s.status(1, 3).phase is Phase.DRAINING


def test_groups_share_gpus_exclusive_groups_clear_the_rest() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("chat", group="g"), 0)
    s.add(2, plan("embed", group="g"), 0)
    s.add(3, plan("other", gpus=(5,)), 0)
    s.add(4, plan("big", gpus=(7,), group="solo", exclusive=True), 0)
    for key in (1, 2, 3):
        ask(s, key)
        up(s, key)
    assert fx.took("start") == [1, 2, 3] and not fx.took("stop")  # same group on GPU 0; other GPU
    ask(s, 4, 1)
    assert sorted(k for k in (1, 2, 3) if s.status(k, 1).phase is Phase.DRAINING) == [1, 2, 3]


def test_max_loaded_stops_the_least_recently_used_idle_model() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, max_loaded=2, policy=ON_ARRIVAL)
    for key, gpu in ((1, 0), (2, 1), (3, 2)):
        s.add(key, plan(f"m{key}", gpus=(gpu,)), 0)
    for key, t in ((1, 1.0), (2, 2.0)):
        ask(s, key, t)
        up(s, key, now=t)
        s.release(key, 0, t)
    ask(s, 1, 3)  # m1 used again: m2 is now the least recently used
    ask(s, 3, 4)
    assert s.status(2, 4).phase is Phase.DRAINING and s.status(1, 4).phase is Phase.READY
    assert fx.took("stop") == [2] and 3 not in fx.took("start")
    down(s, 2, now=5)
    assert fx.took("start")[-1] == 3


def test_idle_model_is_drained_and_stopped_after_its_timeout() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a", idle_timeout=10), 0)
    ask(s, 1, 0)
    up(s, 1, now=1)
    s.tick(30)
    assert not fx.took("stop")  # a request is in flight: in use
    s.release(1, 0, 31)
    s.tick(40)
    assert not fx.took("stop")
    s.tick(41)
    assert fx.took("stop") == [1]
    down(s, 1, now=42)
    status = s.status(1, 42)
    assert status.phase is Phase.STOPPED and status.standby
    _, got = ask(s, 1, 50)
    assert got is None and fx.took("start") == [1, 1]  # the next request starts it again


def test_replicas_share_by_in_flight_count_and_take_turns() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a", replicas=2), 0)
    ask(s, 1)
    up(s, 1, replicas=2)
    picks = [ask(s, 1)[1] for _ in range(3)]
    assert sorted(picks[:2]) == [0, 1]  # the first waiter took one; the rest balance
    s.release(1, 0, 1)
    s.release(1, 1, 1)
    s.release(1, 0, 1)
    s.release(1, 1, 1)
    assert s.status(1, 1).active == 0
    turns = []
    for _ in range(4):
        _, index = ask(s, 1)
        assert index is not None
        turns.append(index)
        s.release(1, index, 1)
    assert turns in ([0, 1, 0, 1], [1, 0, 1, 0])  # equal load: in turn, not always replica 0


def test_a_first_launch_that_crashes_refuses_its_waiters_at_once() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a"), 0)
    waiter, got = ask(s, 1)  # on demand: the first request starts it and waits
    assert got is None and fx.took("start") == [1]
    s.replica_changed(1, 0, S.STARTING, 0)
    s.replica_changed(1, 0, S.BACKOFF, 1)  # crashed before it ever served
    assert fx.refused[id(waiter)] == "unavailable"  # a 503 now, not a wait through the backoff
    with pytest.raises(Refused):
        ask(s, 1)


def test_failover_admits_another_ready_replica_never_the_one_that_refused() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a", replicas=2), 0, start=True)
    up(s, 1, replicas=2)
    assert [s.admit_now(1, 1, exclude=0) for _ in range(3)] == [1, 1, 1]  # busier, but the only other one
    s.replica_changed(1, 1, S.BACKOFF, 2)
    assert s.admit_now(1, 2, exclude=0) is None  # nowhere else to go: the caller answers 503
    assert s.status(1, 2).active == 3


def test_ejection_grows_never_takes_the_last_healthy_replica_and_ends() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    policy = OutlierPolicy(consecutive_failures=2, base_ejection_time=10, max_ejection_time=25)
    s.add(1, plan("a", replicas=2, outlier=policy), 0)
    ask(s, 1)
    up(s, 1, replicas=2)
    assert s.report(1, 1, False, 1) is None
    assert s.report(1, 1, False, 1) == 10
    assert s.status(1, 1).ejected == (1,)
    assert all(ask(s, 1, 2)[1] == 0 for _ in range(5))  # no traffic to the ejected replica
    # The healthy one failing too: it is the last healthy replica, so it stays.
    assert [s.report(1, 0, False, 3) for _ in range(4)] == [None] * 4
    assert s.status(1, 3).ejected == (1,)
    assert 1 in {ask(s, 1, 12)[1] for _ in range(4)}  # cool-down over: back in rotation
    s.report(1, 1, False, 13)
    assert s.report(1, 1, False, 13) == 20  # second ejection: twice as long
    s.report(1, 1, True, 40)
    s.report(1, 1, False, 40)
    assert s.report(1, 1, False, 40) == 25  # capped


def test_single_replica_is_never_ejected() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a", outlier=OutlierPolicy(consecutive_failures=1)), 0)
    ask(s, 1)
    up(s, 1)
    assert s.report(1, 0, False, 1) is None and ask(s, 1, 1)[1] == 0


def test_failed_model_refuses_waiters_and_new_requests() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a"), 0)
    waiting, _ = ask(s, 1)
    s.replica_changed(1, 0, S.STARTING, 1)
    s.replica_changed(1, 0, S.FAILED, 2)
    assert fx.refused[id(waiting)] == "failed"
    with pytest.raises(Refused, match="failed"):
        ask(s, 1, 3)
    assert s.status(1, 3).phase is Phase.FAILED


def test_operator_stop_parks_and_start_unparks() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a"), 0, start=True)
    assert fx.took("start") == [1]
    up(s, 1)
    s.stop(1, 1)
    assert fx.took("stop") == [1]
    down(s, 1)
    with pytest.raises(Refused, match="stopped"):
        ask(s, 1, 2)
    assert not s.status(1, 2).standby
    s.start(1, 3)
    assert fx.took("start") == [1, 1]


def test_reload_replace_moves_waiters_and_starts_after_the_old_version_is_gone() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=ON_ARRIVAL)
    s.add(1, plan("a", gpus=()), 0)
    ask(s, 1)
    up(s, 1)
    s.replace(1, 2, plan("a", gpus=()), 1, start=False)
    waiter, got = ask(s, 2, 2)
    assert got is None and 2 not in fx.took("start")  # the old one still has a request in flight
    s.release(1, 0, 3)
    assert fx.took("stop") == [1]
    down(s, 1, now=4)
    assert fx.took("retired") == [1] and fx.took("start") == [1, 2]
    up(s, 2, now=5)
    assert fx.granted[id(waiter)] == 0
    s.retire(2, 6)
    assert fx.took("stop") == [1]  # removed, but its request in flight finishes first
    s.release(2, 0, 7)
    assert fx.took("stop") == [1, 2]
    with pytest.raises(Refused, match="removed"):
        ask(s, 2, 7)
