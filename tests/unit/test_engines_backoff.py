import pytest

from engines.replica.backoff import RestartBackoff
from engines.spec import RestartPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(**kw: float) -> RestartPolicy:
    values = {
        "initial_delay": 1.0,
        "max_delay": 10.0,
        "jitter": 0.0,
        "exp_base": 2.0,
        "max_restarts": 5,
        "window": 600.0,
        "stable_after": 120.0,
    }
    values.update(kw)
    return RestartPolicy(**values)  # type: ignore[arg-type]


def test_delays_grow_exponentially_up_to_the_cap() -> None:
    backoff = RestartBackoff(policy(max_restarts=100), clock=Clock())
    assert [backoff.crash() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_adds_at_most_jitter_and_never_passes_the_cap() -> None:
    backoff = RestartBackoff(policy(jitter=0.5, max_delay=3.0), clock=Clock())
    for attempt, base in ((1, 1.0), (2, 2.0)):
        for _ in range(50):
            assert base <= backoff.delay(attempt) <= base + 0.5
    assert all(backoff.delay(5) == 3.0 for _ in range(20))


def test_more_than_max_restarts_in_the_window_spends_the_budget() -> None:
    clock = Clock()
    backoff = RestartBackoff(policy(max_restarts=3, window=60), clock=clock)
    for _ in range(3):
        assert backoff.crash() is not None
        clock.now += 1
    assert backoff.crash() is None


def test_crashes_older_than_the_window_do_not_count() -> None:
    clock = Clock()
    backoff = RestartBackoff(policy(max_restarts=2, window=10), clock=clock)
    assert backoff.crash() is not None
    assert backoff.crash() is not None
    clock.now += 11
    assert backoff.crash() is not None  # the first two left the window


def test_a_stable_ready_period_resets_delay_and_budget() -> None:
    clock = Clock()
    backoff = RestartBackoff(policy(max_restarts=2, stable_after=30), clock=clock)
    assert backoff.crash() == 1.0
    assert backoff.crash() == 2.0
    backoff.ready()
    clock.now += 29
    assert backoff.crash() is None  # READY, but not long enough: the third crash spends the budget
    backoff.reset()
    assert backoff.crash() == 1.0
    backoff.ready()
    clock.now += 31
    assert backoff.crash() == 1.0 and backoff.attempt == 1


def test_zero_restarts_allowed_fails_at_the_first_crash() -> None:
    assert RestartBackoff(policy(max_restarts=0), clock=Clock()).crash() is None


@pytest.mark.parametrize("initial", [0.0, 0.05])
def test_small_initial_delays(initial: float) -> None:
    backoff = RestartBackoff(policy(initial_delay=initial, max_delay=0.4), clock=Clock())
    delays = [backoff.crash() for _ in range(4)]
    assert delays == [min(0.4, initial * 2**n) for n in range(4)]
