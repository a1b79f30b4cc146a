"""EnginePool: eager and on-demand models, lookups by name and alias, replica choice, parallel stop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from engines_helpers import (  # noqa: F401 (the *_fixture names are fixtures)
    Events,
    fake_engine_fixture,
    fake_spec,
    name_fixture,
    run,
    tagged_pids,
)

from engines import EnginePool, EngineState
from engines.scheduling.lease import Lease
from engines.spec import ModelSpec

S = EngineState
pytestmark = pytest.mark.timeout(30)


def test_eager_models_start_on_demand_ones_wait_and_names_resolve(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        events = Events()
        eager = fake_spec(f"{name}/eager", fake_engine, aliases=("gpt-4o-mini",))
        lazy = fake_spec(f"{name}/lazy", fake_engine, load="on_demand")
        pool = EnginePool([eager, lazy], on_event=events)
        await pool.start()
        try:
            a, b = pool.resolve("gpt-4o-mini"), pool.resolve(f"{name}/lazy")
            assert a is not None and b is not None and a is pool.resolve(f"{name}/eager")
            assert pool.resolve("unknown") is None
            assert [e.name for e in pool.entries()] == [f"{name}/eager", f"{name}/lazy"]
            assert a.request_model == f"{name}/eager"
            assert await a.replicas[0].wait_ready(10)
            assert pool.pick(a) is a.replicas[0]
            assert b.replicas[0].state is S.STOPPED and pool.pick(b) is None
            await pool.ensure_started(b)
            assert await b.replicas[0].wait_ready(10)
            await pool.ensure_started(b)  # already running: nothing happens
            assert b.replicas[0].snapshot().launches == 1
        finally:
            await pool.stop()
        await pool.stop()  # idempotent
        assert tagged_pids(name) == []
        assert {e.model for e in events.items} == {f"{name}/eager", f"{name}/lazy"}
        assert all(entry.replicas[0].state is S.STOPPED for entry in pool.entries())

    run(main())


def test_stop_ends_all_engines_in_parallel(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        specs = [fake_spec(f"{name}/{i}", fake_engine, {"FAKE_IGNORE_SIGTERM": "1"}, stop_grace=0.6) for i in range(3)]
        events = Events()
        async with EnginePool(specs, on_event=events) as pool:
            for entry in pool.entries():
                assert await entry.replicas[0].wait_ready(10)
            began = time.monotonic()
        assert time.monotonic() - began >= 0.6  # each engine was given its grace
        # Side by side: every engine began stopping before any had finished its 0.6 s grace.
        stopping = [e.at for e in events.items if str(e.new) == "stopping"]
        stopped = [e.at for e in events.items if str(e.new) == "stopped"]
        assert len(stopping) == len(stopped) == 3 and max(stopping) < min(stopped)
        assert tagged_pids(name) == []

    run(main())


def test_a_name_served_twice_is_refused() -> None:
    first = ModelSpec(name="a", engine="vllm", model="m")
    second = ModelSpec(name="b", engine="vllm", model="m", aliases=("a",))
    with pytest.raises(ValueError, match="used twice"):
        EnginePool([first, second])


def test_pick_prefers_the_least_busy_ready_replica_by_its_lease_count(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        async with EnginePool([fake_spec(name, fake_engine, replicas=2)]) as pool:
            entry = pool.entries()[0]
            for sup in entry.replicas:
                assert await sup.wait_ready(10)
            first = pool.request(entry)
            assert isinstance(first, Lease)
            busy, idle = entry.replicas[first.replica.replica], entry.replicas[1 - first.replica.replica]
            assert (busy.inflight, idle.inflight) == (1, 0)  # a lease granted is one in flight, counted once
            assert busy.snapshot().inflight == 1 and pool.pick(entry) is idle
            second = pool.request(entry)
            assert isinstance(second, Lease) and second.replica.replica == idle.replica
            first.release()
            first.release()  # idempotent: counted back once
            assert (busy.inflight, idle.inflight) == (0, 1) and pool.pick(entry) is busy
            second.release()
            assert busy.inflight == idle.inflight == 0

    run(main())


def test_stop_before_start_is_harmless() -> None:
    run(EnginePool([ModelSpec(name="a", engine="vllm", model="m")]).stop())
