"""EnginePool: eager and on-demand models, lookups by name and alias, replica choice, parallel stop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from engines_helpers import (  # noqa: F401 (the *_fixture names are fixtures)
    Events,
    fake_engine_fixture,
    fake_spec,
    name_fixture,
    run,
    tagged_pids,
)

from engines import EnginePool, EngineState, StateChanged, Supervisor
from engines.adapters import adapter_for
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


def test_a_failing_state_subscriber_is_logged_and_counted_and_the_scheduler_still_follows(
    fake_engine: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: object) -> None:
        raise ValueError("metrics bug")

    async def main() -> None:
        async with EnginePool([fake_spec(name, fake_engine)], on_event=broken) as pool:
            entry = pool.entries()[0]
            assert await entry.replicas[0].wait_ready(10)
            assert pool.status(entry).phase == "ready"  # the scheduler was told before the subscriber failed
            assert pool.event_errors == 2  # STOPPED → STARTING → READY: both moves, both counted

    with caplog.at_level("ERROR", logger="engines.scheduling.pool"):
        run(main())
    failures = [r for r in caplog.records if "state-change subscriber failed" in r.getMessage()]
    assert len(failures) >= 2 and all(r.exc_info and r.exc_info[0] is ValueError for r in failures)


def test_a_supervisor_whose_owner_line_fails_ends_loudly_and_leaves_no_engine(fake_engine: Path, name: str) -> None:
    """The supervisor tells its pool (the scheduler) unguarded: a failure there is not swallowed."""

    async def main() -> None:
        def failing(event: StateChanged) -> None:
            if event.new is S.READY:
                raise RuntimeError("scheduler bug")

        async with aiohttp.ClientSession() as session:
            spec = fake_spec(name, fake_engine)
            sup = Supervisor(spec, adapter_for(spec.engine), session=session, on_event=failing)
            task = asyncio.create_task(sup.run())
            await sup.start()
            with pytest.raises(RuntimeError, match="scheduler bug"):
                await asyncio.wait_for(task, 15)
            assert sup.state is S.STOPPED  # its engine was ended on the way out
        assert tagged_pids(name) == []

    run(main())


def test_hurry_makes_every_stop_after_it_kill_after_the_hurried_grace(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        spec = fake_spec(name, fake_engine, {"FAKE_IGNORE_SIGTERM": "1"}, stop_grace=60.0)
        pool = EnginePool([spec])
        await pool.start()
        sup = pool.entries()[0].replicas[0]
        try:
            assert await sup.wait_ready(10)
            assert not sup.hurried
            pool.hurry()  # a command for the stops to come, applied by each supervisor when it takes one up
        finally:
            await pool.stop()
        assert sup.hurried and sup.state is S.STOPPED
        assert sup.snapshot().last_exit_code is not None  # SIGKILLed after HURRIED_GRACE, not stop_grace
        assert tagged_pids(name) == []

    run(main(), limit=25)
