"""Passive health of one replica (Envoy's outlier detection), with the time passed in.

Real traffic is the evidence: ``failure()`` for a connect error, a 5xx, a broken stream or a timeout,
``success()`` for a complete answer. Enough failures in a row ask for an ejection; each ejection lasts
``base_ejection_time`` times the times this replica was ejected, capped at ``max_ejection_time``, so a
repeat offender stays out longer. A replica that stayed in rotation for ``max_ejection_time`` after its
last ejection starts from one again. Whether an ejection is allowed (never the last healthy replica)
is the scheduler's call: it knows the siblings.
"""

from __future__ import annotations

from engines.spec import OutlierPolicy


class Outlier:
    __slots__ = ("consecutive", "ejected_until", "times_ejected")

    def __init__(self) -> None:
        self.consecutive = 0
        self.times_ejected = 0
        self.ejected_until = 0.0

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def success(self) -> None:
        self.consecutive = 0

    def failure(self, policy: OutlierPolicy) -> bool:
        """Count one; True when the run of failures is long enough to eject."""
        self.consecutive += 1
        return self.consecutive >= policy.consecutive_failures

    def eject(self, policy: OutlierPolicy, now: float) -> float:
        """Out of rotation from ``now``; returns for how long."""
        if self.times_ejected and now - self.ejected_until >= policy.max_ejection_time:
            self.times_ejected = 0  # behaved for a long while: forgiven
        self.times_ejected += 1
        duration = min(policy.base_ejection_time * self.times_ejected, policy.max_ejection_time)
        self.ejected_until = now + duration
        self.consecutive = 0
        return duration

    def reset(self) -> None:
        """A new launch: the old process's record does not count against it."""
        self.consecutive = 0
        self.times_ejected = 0
        self.ejected_until = 0.0
