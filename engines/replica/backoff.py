"""How long to wait before the next launch, and when to stop trying (stamina's four terms + a crash budget).

The delay comes from tenacity's ``wait_exponential_jitter``: ``initial * exp_base**(n-1) + uniform(0, jitter)``,
capped at ``max_delay``. The supervisor is a long-running state machine, not a function call to retry, so
only the wait strategy is borrowed, never a ``Retrying`` loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import wait_exponential_jitter

from engines.spec import RestartPolicy


@dataclass(frozen=True)
class _Attempt:
    # The one field of tenacity's RetryCallState that the wait strategy reads.
    attempt_number: int


class RestartBackoff:
    """Counts crashes for one replica; ``crash()`` says how long to wait, or ``None`` once the budget is spent.

    More than ``max_restarts`` crashes inside ``window`` seconds spends the budget. Staying READY for
    ``stable_after`` seconds forgives the past: the next crash waits the initial delay again.
    """

    def __init__(self, policy: RestartPolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._wait = wait_exponential_jitter(
            multiplier=policy.initial_delay, max=policy.max_delay, exp_base=policy.exp_base, jitter=policy.jitter
        )
        self._crashes: deque[float] = deque()
        self._attempt = 0
        self._ready_at: float | None = None

    @property
    def attempt(self) -> int:
        """Crashes since the last reset: the exponent of the next delay."""
        return self._attempt

    def delay(self, attempt: int) -> float:
        return float(self._wait(_Attempt(max(1, attempt))))  # type: ignore[arg-type]

    def ready(self) -> None:
        """The replica became READY now."""
        self._ready_at = self._clock()

    def crash(self) -> float | None:
        """Record a crash now; the delay before the next launch, or ``None`` when the replica should be FAILED."""
        now = self._clock()
        if self._ready_at is not None and now - self._ready_at >= self.policy.stable_after:
            self.reset()
        self._ready_at = None
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.policy.window:
            self._crashes.popleft()
        if len(self._crashes) > self.policy.max_restarts:
            return None
        self._attempt += 1
        return self.delay(self._attempt)

    def reset(self) -> None:
        """Forget all crashes (after a stable period, or an explicit start of a FAILED replica)."""
        self._crashes.clear()
        self._attempt = 0
        self._ready_at = None
