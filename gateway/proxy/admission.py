"""From a ``model`` name to a replica lease, or the right error: 404 unknown, 429 queue full, 503 not ready.

Most requests get their replica at once (no await, no task). The others wait in the model's queue (the
pool's scheduler: a cold start, a swap, a model at max_concurrency; served by the request's priority, then
in arrival order, a long wait going first whatever its priority) for at most its queue timeout,
while a watcher reads the client's side of the connection: a client that leaves is taken out of the
queue and never reaches the engine (docs/RELIABILITY.md D4). The body has been read by then, so the next
ASGI message can only be ``http.disconnect``.

Written against the request path's contract (engines/scheduling/contract.py) only: the owner's
``EnginePool`` and a worker's ``RemotePool`` both meet it, and nothing here can tell them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from engines.scheduling.contract import Claim, LeaseSource, ReplicaLease, is_queued
from engines.scheduling.entry import ModelEntry
from engines.scheduling.lease import Abandoned
from engines.scheduling.tickets import Refused
from gateway.http.errors import EngineUnavailable, GatewayError, ModelNotFound, QueueFull, ShuttingDown
from gateway.observability.metrics import Metrics
from gateway.proxy.relay import STATUS_KEY

T = TypeVar("T")


def shown(name: str) -> str:
    """A client-sent name fit to echo in an error: short, printable."""
    clean = "".join(c if c.isprintable() else "?" for c in name[:80])
    return clean + ("…" if len(name) > 80 else "")


def resolve(pool: LeaseSource, name: str) -> ModelEntry:
    entry = pool.resolve(name)
    if entry is None:
        raise ModelNotFound(f"The model '{shown(name)}' does not exist.", param="model")
    return entry


async def acquire(
    pool: LeaseSource,
    entry: ModelEntry,
    request: Request,
    *,
    claim: Claim,
    queue_timeout: float,
    retry_after: float,
    metrics: Metrics,
) -> ReplicaLease:
    """A lease on a replica of ``entry``; the caller releases it (the relay does, when it is over).

    ``claim``: the request's priority and affinity (gateway/proxy/claim.py), which the lease source's
    scheduler orders its queue and picks the replica by. Required, so that no caller forgets its request's."""
    name = entry.spec.name
    try:
        got = await pool.admit(entry, claim)
        if not is_queued(got):
            return got
        timeout = entry.spec.queue_timeout if entry.spec.queue_timeout is not None else queue_timeout
        queued = metrics.queued_of(name)
        queued.inc()
        left = asyncio.ensure_future(_client_left(request))
        began = time.monotonic()
        try:
            lease = await got.wait(timeout, abandon=left)
            metrics.queue_wait_of(name).observe(time.monotonic() - began)
            return lease
        finally:
            queued.dec()
            left.cancel()
            if left.done() and not left.cancelled():
                left.exception()  # retrieved: a receive() that failed means the client is gone anyway
    except Refused as refused:
        raise refusal_error(refused, name, retry_after) from None
    except Abandoned:
        request.scope[STATUS_KEY] = 499  # logged as the client's leaving; nothing is sent to a closed socket
        raise EngineUnavailable("The client left while queued.", code="client_disconnected") from None


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """``work`` (an image fetch, before any engine is involved), cancelled the moment the client leaves: a
    slow image server then sees its connection closed at once, not at the fetch deadline (RELIABILITY D5).
    The body has been read, so the next ASGI message can only be ``http.disconnect``."""
    task = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({task, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left.cancel()
        if left.done() and not left.cancelled():
            left.exception()
    if task.cancelled():
        request.scope[STATUS_KEY] = 499
        raise EngineUnavailable("The client left while its images were fetched.", code="client_disconnected")
    return task.result()


async def _client_left(request: Request) -> None:
    receive = request.receive
    while (await receive())["type"] != "http.disconnect":
        pass


def refusal_error(refused: Refused, name: str, retry_after: float) -> GatewayError:
    """The error a refusal answers with; "unavailable" and "not_ready" (a replica that left READY before
    the request got it) are both a 503 to retry shortly."""
    reason = refused.reason
    if reason == "queue_full":
        return QueueFull(
            f"Too many requests are waiting for the model '{name}'; retry shortly.", retry_after=retry_after
        )
    if reason == "failed":
        return EngineUnavailable(
            f"The model '{name}' failed to start repeatedly and is stopped; an operator must restart it.",
            code="engine_failed",
            retry_after=retry_after * 6,
        )
    if reason == "stopped":
        return EngineUnavailable(f"The model '{name}' was stopped by an operator.", retry_after=retry_after * 6)
    if reason == "removed":
        return ModelNotFound(f"The model '{name}' was removed from the configuration.", param="model")
    if reason == "shutdown":
        return ShuttingDown("The gateway is shutting down; retry on another instance.", retry_after=retry_after)
    if reason == "timeout":
        return EngineUnavailable(
            f"The model '{name}' did not become available in time; retry shortly.", retry_after=retry_after
        )
    return EngineUnavailable(f"The model '{name}' is not ready yet; retry shortly.", retry_after=retry_after)
