"""From a ``model`` name to a ready replica, or the right error: 404 unknown, 503 not ready."""

from __future__ import annotations

import asyncio

from engines import EnginePool, EngineState, ModelEntry, Supervisor
from gateway.errors import EngineUnavailable, ModelNotFound
from gateway.metrics import Metrics


def shown(name: str) -> str:
    """A client-sent name fit to echo in an error: short, printable."""
    clean = "".join(c if c.isprintable() else "?" for c in name[:80])
    return clean + ("…" if len(name) > 80 else "")


def resolve(pool: EnginePool, name: str) -> ModelEntry:
    entry = pool.resolve(name)
    if entry is None:
        raise ModelNotFound(f"The model '{shown(name)}' does not exist.", param="model")
    return entry


async def choose_replica(pool: EnginePool, entry: ModelEntry, *, queue_timeout: float, retry_after: float,
                         metrics: Metrics) -> Supervisor:
    replica = pool.pick(entry)
    if replica is not None:
        return replica
    states = {r.snapshot().state for r in entry.replicas}
    if states == {EngineState.FAILED}:
        raise EngineUnavailable(
            f"The model '{entry.spec.name}' failed to start repeatedly and is stopped; an operator must restart it.",
            code="engine_failed", retry_after=retry_after * 6)
    if entry.spec.load == "on_demand" and queue_timeout > 0:
        # A model that loads on first use: wait for it (bounded) instead of failing the first requests.
        queued = metrics.queued.labels(entry.spec.name)
        queued.inc()
        waiters: list[asyncio.Task[bool]] = []
        try:
            await pool.ensure_started(entry)
            waiters = [asyncio.ensure_future(r.wait_ready(queue_timeout)) for r in entry.replicas]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            queued.dec()
            for waiter in waiters:
                waiter.cancel()
        replica = pool.pick(entry)
        if replica is not None:
            return replica
    raise EngineUnavailable(f"The model '{entry.spec.name}' is not ready yet; retry shortly.",
                            retry_after=retry_after)
