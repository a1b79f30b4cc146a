"""A worker's request keeps its claim: the priority and affinity a worker's ``RemotePool.admit`` is given reach
the owner's ``EnginePool.request`` unchanged, over the real control line (the real hub, the real remote pool,
the real wire code on a Unix socket; the bench of test_workers_hub), and the owner's queue honours them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engines.scheduling.contract import NO_CLAIM, Claim
from engines.scheduling.lease import Lease, Waiting
from gateway.workers.lease_client import RemoteLease, RemoteWaiting
from gateway.workers.messages import Acquire, from_wire, to_wire
from tests.integration.test_workers_hub import Bench, bench

pytestmark = pytest.mark.timeout(60)


def recording(b: Bench) -> list[Claim]:
    """The claims the owner's pool is asked with, in order (its ``request`` wrapped, nothing else changed)."""
    seen: list[Claim] = []
    request = b.pool.request

    def wrapped(entry: Any, claim: Claim = NO_CLAIM) -> Lease | Waiting:
        seen.append(claim)
        return request(entry, claim)

    b.pool.request = wrapped  # type: ignore[method-assign]
    return seen


def test_the_acquire_message_carries_the_claim() -> None:
    big = (1 << 63) - 1
    for message in (Acquire(1, "m"), Acquire(2, "m", -10, None), Acquire(3, "m", 7, big)):
        assert from_wire(to_wire(message)) == message
    assert to_wire(Acquire(3, "m", 7, big))[1:] == (3, "m", 7, big)  # plain values on the wire, not a Claim


def test_priority_and_affinity_reach_the_owner(tmp_path: Path) -> None:
    async def main() -> None:
        async with bench(tmp_path) as b:
            seen = recording(b)
            remote, _, _ = await b.worker()
            claims = [NO_CLAIM, Claim(5, None), Claim(-3, 12345), Claim(0, (1 << 63) - 1)]
            for claim in claims:
                lease = await remote.admit(b.entry, claim)
                assert isinstance(lease, RemoteLease)
                lease.release()
            await asyncio.sleep(0.05)  # the last release crosses the line
            assert seen == claims
            assert seen[0] is NO_CLAIM  # no claim: nothing new made on the owner's side either
            assert b.held() == (0, 0)

    asyncio.run(main())


def test_the_owners_queue_serves_a_workers_higher_priority_first(tmp_path: Path) -> None:
    """max_concurrency 1: one lease held, then a low and a high priority request queue (in that order, from
    two workers); the release goes to the high one."""

    async def main() -> None:
        async with bench(tmp_path) as b:
            seen = recording(b)
            one, _, _ = await b.worker(1)
            two, _, _ = await b.worker(2)
            holder = await one.admit(b.entry)
            assert isinstance(holder, RemoteLease)
            low = await one.admit(b.entry, Claim(-2, None))
            high = await two.admit(b.entry, Claim(4, None))
            assert isinstance(low, RemoteWaiting) and isinstance(high, RemoteWaiting)
            low_wait = asyncio.ensure_future(low.wait(10))
            high_wait = asyncio.ensure_future(high.wait(10))
            await asyncio.sleep(0.05)
            assert b.held() == (1, 2)
            holder.release()
            done, _ = await asyncio.wait({low_wait, high_wait}, return_when=asyncio.FIRST_COMPLETED)
            assert done == {high_wait}
            high_wait.result().release()
            (await low_wait).release()
            assert [c.priority for c in seen] == [0, -2, 4]

    asyncio.run(main())
