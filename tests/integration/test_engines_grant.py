"""A queued request resumed after its replica crashed: refused ``not_ready`` (a 503 with Retry-After),
never handed the dead replica (issue 14: the single-process path answered 500 with a TypeError).

The window is real but narrow: the scheduler grants a waiter's slot while the replica is READY, and the
waiter wakes a loop turn later. The test opens it wide and deterministically: the grant is made (the
holder releases), the engine is killed and seen to leave READY, and only then does the waiter wake.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from engines_helpers import FAST_HEALTH, FAST_RESTART, name_fixture, run, wait_until  # noqa: F401 (fixture)

from engines import EnginePool, EngineState
from engines.scheduling.lease import Lease, Waiting
from engines.scheduling.tickets import Refused
from engines.spec import ModelSpec
from gateway.proxy.admission import refusal_error
from tests.helpers import standin_command

pytestmark = pytest.mark.timeout(60)


def standin_spec(name: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        engine="vllm",
        model="org/m",
        command=tuple(standin_command("vllm")),
        health=FAST_HEALTH,
        restart=FAST_RESTART,
        stop_grace=1.0,
        max_concurrency=1,  # the second request queues behind the first
    )


def test_a_waiter_granted_a_replica_that_crashed_before_it_woke_gets_a_503_with_retry_after(
    name: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with EnginePool([standin_spec(name)]) as pool:
            entry = pool.entries()[0]
            sup = entry.replicas[0]
            assert await sup.wait_ready(20)
            holder = pool.request(entry)
            waiter = pool.request(entry)
            assert isinstance(holder, Lease) and isinstance(waiter, Waiting)
            engine_pid = sup.snapshot().engine_pid
            assert engine_pid is not None
            holder.release()  # the slot is granted to the waiter now; it has not woken yet
            os.kill(engine_pid, signal.SIGKILL)
            await wait_until(lambda: sup.state is not EngineState.READY, 10)
            with pytest.raises(Refused) as refused:
                await waiter.wait(5)
            assert refused.value.reason == "not_ready"
            assert pool.inflight(entry, 0) == 0  # the refused grant's slot was given back
            error = refusal_error(refused.value, entry.name, retry_after=2.0)
            assert error.status == 503 and error.retry_after == 2.0
            assert "not ready" in error.message
            # Once the replica is back, the next request gets it at once.
            assert await sup.wait_ready(20)
            again = pool.request(entry)
            assert isinstance(again, Lease) and again.replica.base_url == sup.base_url
            again.release()

    run(main(), limit=50)
