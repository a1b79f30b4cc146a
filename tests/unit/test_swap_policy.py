"""The anti-thrash swap policy, priorities, sleep instead of stop, and affinity: the scheduler's decisions
against a fake Effects, time passed by hand (engines/scheduling/scheduler.py)."""

from __future__ import annotations

from typing import Any

import pytest
from test_engines_scheduler import FakeEffects, ask, plan, up

from engines.replica.state import EngineState
from engines.scheduling.phases import ModelPhase
from engines.scheduling.placement import SwapPolicy
from engines.scheduling.scheduler import Phase, Scheduler, Ticket

S = EngineState
P = ModelPhase
POLICY = SwapPolicy(min_residency=20, max_wait=60, linger=2)


def two_on_one_gpu(policy: SwapPolicy = POLICY, **kw: Any) -> tuple[FakeEffects, Scheduler]:
    fx = FakeEffects()
    s = Scheduler(fx, policy=policy, **kw)
    s.add(1, plan("a", **kw.pop("a", {})), 0)
    s.add(2, plan("b"), 0)
    return fx, s


def served(s: Scheduler, key: int, now: float) -> None:
    """One request answered at once by a running model (granted and released)."""
    _, index = ask(s, key, now)
    assert index == 0, f"model {key} did not answer at once"
    s.release(key, 0, now + 0.1)


def asleep(s: Scheduler, key: int, now: float) -> None:
    s.replica_changed(key, 0, S.SLEEPING, now)


def test_a_resident_with_work_keeps_its_gpus_for_min_residency_then_yields() -> None:
    fx, s = two_on_one_gpu()
    ask(s, 1, 0)
    up(s, 1, now=1)  # resident since 1
    s.release(1, 0, 1.5)
    b, _ = ask(s, 2, 2)  # b wants the GPU while a is busy with its own client
    for now in range(3, 21):  # a's client goes on, a request a second, each answered at once
        served(s, 1, now)
        s.tick(now + 0.5)
    assert fx.took("stop") == [] and s.status(1, 20).phase is Phase.READY  # inside its residency, with work
    served(s, 1, 21)
    s.tick(21.2)  # 20 s resident: it yields
    assert s.status(1, 21).draining_for == "swap:b" and fx.took("stop") == [1]
    assert id(b) not in fx.granted


def test_an_idle_resident_yields_at_once_and_a_busy_one_after_its_client_pauses_for_linger() -> None:
    fx, s = two_on_one_gpu()
    ask(s, 1, 0)
    up(s, 1, now=1)
    s.release(1, 0, 1.2)
    ask(s, 2, 2)  # a was used 0.8 s ago: its client may come back
    assert fx.took("stop") == []
    s.tick(3.3)  # 2.1 s without a request: a's client has paused, b's waiter goes ahead
    assert fx.took("stop") == [1]


def test_max_wait_bounds_the_wait_for_a_resident_that_is_always_busy() -> None:
    fx, s = two_on_one_gpu(SwapPolicy(min_residency=300, max_wait=30, linger=2))
    ask(s, 1, 0)
    up(s, 1, now=0)  # a's request never ends: always busy, residency 300 s
    ask(s, 2, 1)
    s.tick(30.9)
    assert fx.took("stop") == []
    s.tick(31.0)  # b's waiter waited max_wait: a drains, however long its residency
    assert s.status(1, 31).draining_for == "swap:b"


def test_alternating_sequential_clients_swap_once_per_residency_not_once_per_request() -> None:
    """Two clients, one request at a time each, each to its own model on one GPU; a start takes 5 s. Swap on
    arrival starts a model for every request (a 5 s start, then one short answer); the policy holds the GPU
    for the swap's measured round trip (5 s there + 5 s back = 10 s, over the 2 s floor) and answers ~40
    requests in it. With both clients always busy the ratio is (residency + start) / (start + answer) =
    15 / 5.25, just under 3."""

    def run(policy: SwapPolicy) -> int:
        fx, s = two_on_one_gpu(policy)
        now, pending = 0.0, {1: None, 2: None}  # key → the waiting ticket
        launched: dict[int, float] = {}  # key → when its start was seen
        for step in range(400):  # 0.25 s steps, 100 s in all
            now = step * 0.25
            for key in (1, 2):
                ticket = pending[key]
                if ticket is not None and id(ticket) in fx.granted:
                    s.release(key, fx.granted.pop(id(ticket)), now)  # answered: the client asks again
                    pending[key] = None
                if pending[key] is None:
                    ticket, index = ask(s, key, now)
                    if index is not None:
                        s.release(key, index, now + 0.05)
                    else:
                        pending[key] = ticket
            for key in (1, 2):  # engines: a start is READY 5 s later, a stop is down at once
                if s.phase(key) is P.STARTING and now - launched.setdefault(key, now) >= 5:
                    up(s, key, now=now)
                    del launched[key]
                if s.phase(key) is P.STOPPING:
                    s.replica_changed(key, 0, S.STOPPING, now)
                    s.replica_changed(key, 0, S.STOPPED, now)
            s.tick(now)
        return len(fx.took("start"))

    on_arrival, policy = run(SwapPolicy.on_arrival()), run(SwapPolicy(min_residency=2, max_wait=30, linger=1))
    assert on_arrival >= 2.5 * policy, (on_arrival, policy)  # 19 starts against 7 when written
    assert run(SwapPolicy(min_residency=2, max_wait=30, linger=1, round_trip=False)) > policy  # the floor alone


def test_a_swap_whose_waiters_left_is_called_off_and_the_resident_serves_again() -> None:
    fx, s = two_on_one_gpu(SwapPolicy.on_arrival())
    ask(s, 1, 0)
    up(s, 1, now=0)  # a's request in flight
    b, _ = ask(s, 2, 1)
    assert s.status(1, 1).draining_for == "swap:b"
    a2, _ = ask(s, 1, 2)  # queued behind the drain
    s.withdraw(b, 3)  # b's client left: no reason to swap any more
    assert s.status(1, 3).draining_for is None and fx.granted[id(a2)] == 0
    s.release(1, 0, 4)
    assert fx.took("stop") == [] and fx.took("start") == [1]


def test_a_cold_start_whose_waiters_all_left_is_cancelled_but_not_one_an_operator_asked_for() -> None:
    fx, s = two_on_one_gpu()
    t1, _ = ask(s, 1, 0)
    t2, _ = ask(s, 1, 0.5)
    s.replica_changed(1, 0, S.STARTING, 1)
    s.withdraw(t1, 2)
    assert fx.took("stop") == []  # one waiter left
    s.withdraw(t2, 3)
    assert fx.took("stop") == [1] and s.status(1, 3).draining_for == "abandoned"
    s.replica_changed(1, 0, S.STOPPING, 3)
    s.replica_changed(1, 0, S.STOPPED, 4)
    assert s.phase(1) is P.STANDBY
    s.start(2, 5)  # an operator's start: nobody waits, and it goes on
    s.replica_changed(2, 0, S.STARTING, 5)
    t3, _ = ask(s, 2, 6)
    s.withdraw(t3, 7)
    assert fx.took("stop") == [1] and s.phase(2) is P.STARTING


def test_priority_orders_a_queue_and_every_waiter_is_served_once_overdue() -> None:
    fx, s = two_on_one_gpu(SwapPolicy(min_residency=0, max_wait=10, linger=0))
    low = Ticket(1, 0, priority=-5)
    s.request(low, 0)
    normal = Ticket(1, 1)
    s.request(normal, 1)
    high = Ticket(1, 2, priority=5)
    s.request(high, 2)
    up(s, 1, now=3)
    order = sorted(fx.granted, key=lambda t: list(fx.granted).index(t))
    assert order == [id(high), id(normal), id(low)]

    fx, s = two_on_one_gpu(SwapPolicy(min_residency=0, max_wait=10, linger=0))
    old_low = Ticket(1, 0, priority=-5)
    s.request(old_low, 0)
    young_high = Ticket(1, 11, priority=5)
    s.request(young_high, 11)
    up(s, 1, now=12)  # the low one waited 12 s > max_wait: it goes first, priority or not
    assert list(fx.granted) == [id(old_low), id(young_high)]


def test_priority_decides_which_model_gets_the_gpu_first() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=SwapPolicy(min_residency=0, max_wait=60, linger=0))
    for key, name in ((1, "a"), (2, "b"), (3, "c")):
        s.add(key, plan(name), 0)
    ask(s, 1, 0)
    up(s, 1, now=0)  # a holds the GPU with a request in flight
    s.request(Ticket(2, 1), 1)  # b: older, normal
    s.request(Ticket(3, 2, priority=3), 2)  # c: younger, higher
    s.release(1, 0, 3)
    s.replica_changed(1, 0, S.STOPPING, 3)
    s.replica_changed(1, 0, S.STOPPED, 4)
    assert fx.took("start") == [1, 3]  # the GPU goes to c first; b after c's residency


def sleepy(**extra: Any) -> dict[str, Any]:
    return {"sleeps": True, "sleep_ram_gb": 10.0, **extra}


def test_a_swap_puts_a_sleepable_model_to_sleep_and_its_next_request_wakes_it() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=SwapPolicy.on_arrival(), sleep_ram_gb=64)
    s.add(1, plan("a", **sleepy()), 0)
    s.add(2, plan("b", **sleepy()), 0)
    ask(s, 1, 0)
    up(s, 1, now=0)
    s.release(1, 0, 0.5)
    ask(s, 2, 1)
    assert fx.took("sleep") == [1] and fx.took("stop") == [] and fx.took("start") == [1]  # not b yet
    assert s.status(1, 1).phase is Phase.DRAINING  # falling asleep: its GPU is not free yet
    asleep(s, 1, 2)
    assert s.status(1, 2).phase is Phase.SLEEPING and fx.took("start") == [1, 2]
    up(s, 2, now=3)
    s.release(2, 0, 3.5)
    back, _ = ask(s, 1, 4)  # a's next request: b sleeps, a wakes (no cold start)
    assert fx.took("sleep") == [1, 2]
    asleep(s, 2, 5)
    assert fx.took("wake") == [1] and fx.took("start") == [1, 2] and s.phase(1) is P.WAKING
    s.replica_changed(1, 0, S.WAKING, 5)
    s.replica_changed(1, 0, S.READY, 6)
    assert fx.granted[id(back)] == 0 and s.phase(1) is P.RUNNING


def test_the_sleep_budget_stops_the_least_recently_used_sleeper() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=SwapPolicy.on_arrival(), sleep_ram_gb=25)  # room for two sleepers of 10 GB
    for key, name in ((1, "a"), (2, "b"), (3, "c")):
        s.add(key, plan(name, **sleepy()), 0)
    for now, (key, prev) in enumerate(((1, None), (2, 1), (3, 2), (1, 3)), start=1):
        ask(s, key, now * 10)
        if prev is not None:
            asleep(s, prev, now * 10)
        if key == 1 and prev == 3:
            break
        up(s, key, now=now * 10)
        s.release(key, 0, now * 10 + 1)
    # a, then b, slept; c slept for a's return: a (the oldest sleeper) was woken, not evicted: budget held
    assert fx.took("wake") == [1] and fx.took("stop") == []
    fx2 = FakeEffects()
    s2 = Scheduler(fx2, policy=SwapPolicy.on_arrival(), sleep_ram_gb=15)  # room for one
    for key, name in ((1, "a"), (2, "b"), (3, "c")):
        s2.add(key, plan(name, **sleepy()), 0)
    ask(s2, 1, 0)
    up(s2, 1, now=0)
    s2.release(1, 0, 1)
    ask(s2, 2, 2)
    asleep(s2, 1, 3)  # a sleeps (10 of 15 GB)
    up(s2, 2, now=4)
    s2.release(2, 0, 5)
    ask(s2, 3, 6)  # b must sleep too: a, the least recently used sleeper, is stopped to make room
    assert fx2.took("stop") == [1] and fx2.took("sleep") == [1, 2]
    assert s2.status(1, 6).draining_for == "evicted"


def test_a_model_bigger_than_the_budget_is_stopped_not_slept() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=SwapPolicy.on_arrival(), sleep_ram_gb=5)
    s.add(1, plan("a", **sleepy()), 0)
    s.add(2, plan("b"), 0)
    ask(s, 1, 0)
    up(s, 1, now=0)
    s.release(1, 0, 1)
    ask(s, 2, 2)
    assert fx.took("stop") == [1] and fx.took("sleep") == []


def test_a_sleeper_that_dies_or_could_not_sleep_is_standby_and_starts_cold_next_time() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=SwapPolicy.on_arrival(), sleep_ram_gb=64)
    s.add(1, plan("a", **sleepy()), 0)
    s.add(2, plan("b"), 0)
    ask(s, 1, 0)
    up(s, 1, now=0)
    s.release(1, 0, 1)
    ask(s, 2, 2)
    s.replica_changed(1, 0, S.STOPPING, 3)  # the engine could not sleep: its supervisor stopped it
    s.replica_changed(1, 0, S.STOPPED, 4)
    assert s.phase(1) is P.STANDBY and fx.took("start") == [1, 2]
    up(s, 2, now=5)
    s.release(2, 0, 6)
    ask(s, 1, 7)
    down_b = s.status(2, 7)
    assert down_b.draining_for == "swap:a"
    s.replica_changed(2, 0, S.STOPPING, 8)
    s.replica_changed(2, 0, S.STOPPED, 8)
    assert fx.took("start") == [1, 2, 1] and fx.took("wake") == []


def test_an_operator_sleeps_a_model_and_stops_a_sleeper() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=POLICY, sleep_ram_gb=64)
    s.add(1, plan("a", **sleepy()), 0)
    s.add(2, plan("b"), 0)
    with pytest.raises(ValueError, match="cannot sleep"):
        s.sleep(2, 0)
    ask(s, 1, 0)
    up(s, 1, now=0)
    s.sleep(1, 1)
    assert fx.took("sleep") == []  # its request is still in flight
    s.release(1, 0, 2)
    assert fx.took("sleep") == [1]
    asleep(s, 1, 3)
    s.stop(1, 4)
    assert fx.took("stop") == [1] and s.phase(1) is P.PARKING
    s.replica_changed(1, 0, S.STOPPING, 4)
    s.replica_changed(1, 0, S.STOPPED, 5)
    assert s.phase(1) is P.PARKED


def test_affinity_sticks_to_one_replica_spills_under_load_and_comes_back() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=POLICY)
    s.add(1, plan("a", replicas=2), 0)
    s.start(1, 0)
    up(s, 1, replicas=2, now=0)
    home = s.admit_now(1, 1, affinity=12345)
    assert home is not None
    s.release(1, home, 1.1)
    for now in range(2, 12):  # one conversation, turn after turn: always the same replica
        assert s.admit_now(1, now, affinity=12345) == home
        s.release(1, home, now + 0.5)
    homes = set()
    for conversation in range(40):  # many conversations spread over both
        index = s.admit_now(1, 20, affinity=conversation * 7919 + 1)
        assert index is not None
        homes.add(index)
        s.release(1, index, 20)
    assert homes == {0, 1}
    held = [s.admit_now(1, 30, affinity=12345) for _ in range(6)]  # one hot conversation, 6 at once
    # Bounded load: home while under 1.25 times the average or within 4 of the other; the fifth spills.
    assert held == [home] * 4 + [1 - home, home]
    for index in held:
        assert index is not None
        s.release(1, index, 31)
    assert s.admit_now(1, 32, affinity=12345) == home  # and comes back when the load is gone
    status = s.status(1, 32)
    assert status.sticky > 0 and status.spilled == 1


def test_a_reload_of_a_sleeping_model_stops_the_old_version_before_the_new_one_starts() -> None:
    fx = FakeEffects()
    s = Scheduler(fx, policy=SwapPolicy.on_arrival(), sleep_ram_gb=64)
    s.add(1, plan("a", **sleepy()), 0)
    s.add(2, plan("b"), 0)
    ask(s, 1, 0)
    up(s, 1, now=0)
    s.release(1, 0, 1)
    ask(s, 2, 2)
    asleep(s, 1, 3)  # a sleeps (its port and name still taken), b runs
    s.replace(1, 3, plan("a", **sleepy()), 4, start=True)
    # The old a is stopped, even asleep (b too: the new version's start wants GPU 0), before the new one starts.
    assert fx.took("stop") == [1, 2] and 3 not in fx.took("start")
    s.replica_changed(1, 0, S.STOPPING, 5)
    s.replica_changed(1, 0, S.STOPPED, 6)
    assert fx.took("retired") == [1]


def test_without_max_wait_priorities_alone_order_a_queue() -> None:
    fx, s = two_on_one_gpu(SwapPolicy(min_residency=0, max_wait=0, linger=0))
    old_low = Ticket(1, 0, priority=-5)
    s.request(old_low, 0)
    young_high = Ticket(1, 100, priority=5)
    s.request(young_high, 100)
    up(s, 1, now=101)
    assert list(fx.granted) == [id(young_high), id(old_low)]


def test_the_residency_is_the_swaps_measured_round_trip_a_wake_short_a_cold_start_long() -> None:
    for sleeps in (False, True):
        fx = FakeEffects()
        s = Scheduler(fx, policy=SwapPolicy(min_residency=1, max_wait=1000, linger=5), sleep_ram_gb=64)
        extra = sleepy() if sleeps else {}
        s.add(1, plan("a", **extra), 0)
        s.add(2, plan("b", **extra), 0)
        ask(s, 1, 0)
        s.replica_changed(1, 0, S.STARTING, 0)
        s.replica_changed(1, 0, S.READY, 30)  # a's cold start, measured: 30 s
        s.release(1, 0, 30.5)
        ask(s, 2, 31)
        s.tick(36)  # a idle past its linger: it goes (asleep or stopped), b starts cold
        if sleeps:
            asleep(s, 1, 36)
        else:
            s.replica_changed(1, 0, S.STOPPING, 36)
            s.replica_changed(1, 0, S.STOPPED, 36)
        s.replica_changed(2, 0, S.STARTING, 36)
        s.replica_changed(2, 0, S.READY, 66)  # b's cold start, measured: 30 s
        if sleeps:  # one round of wakes, to measure them: a wakes in 1 s
            s.release(2, 0, 66.5)
            ask(s, 1, 67)
            s.tick(72)
            asleep(s, 2, 72)
            s.replica_changed(1, 0, S.WAKING, 72)
            s.replica_changed(1, 0, S.READY, 73)
            s.release(1, 0, 73.5)
            ask(s, 2, 74)
            s.tick(79)
            asleep(s, 1, 79)
            s.replica_changed(2, 0, S.WAKING, 79)
            s.replica_changed(2, 0, S.READY, 80)  # b wakes in 1 s
        resident_since = 80 if sleeps else 66
        ask(s, 2, resident_since + 1)  # b has work from now on (a request that never ends)
        ask(s, 1, resident_since + 2)  # a's request waits for the GPU
        s.tick(resident_since + 2.5)
        drained = s.status(2, resident_since + 2.5).draining_for == "swap:a"
        if sleeps:
            assert drained  # the round trip is two wakes: 2 s of holding, not a cold start's minute
        else:
            assert not drained
            s.tick(resident_since + 59.5)
            assert s.status(2, resident_since + 59.5).draining_for is None
            s.tick(resident_since + 60)  # two cold starts of 30 s: held for 60 s
            assert s.status(2, resident_since + 60).draining_for == "swap:a"
