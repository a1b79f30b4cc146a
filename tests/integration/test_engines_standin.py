"""The supervisor against the vLLM and LMDeploy stand-ins (tests/standin/), launched through their adapters.

The stand-ins reproduce the real process trees: vLLM's EngineCore survives a SIGKILLed API server, workers
may setsid, LMDeploy stays up with an unhealthy engine. Faults come from STANDIN_FAULTS, or from
STANDIN_FAULTS_FILE for a change while the engine runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from engines_helpers import (  # noqa: F401 (the *_fixture names are fixtures)
    FAST_HEALTH,
    FAST_RESTART,
    REPO,
    Events,
    name_fixture,
    pid_gone,
    run,
    supervised,
    tagged_pids,
    unique,
    wait_until,
)

from engines.process import procfs
from engines.replica.state import EngineState
from engines.spec import HealthPolicy, ModelSpec

S = EngineState
STANDIN = REPO / "tests" / "standin"
pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not (STANDIN / "vllm").exists(), reason="tests/standin/vllm is not there"),
]


def standin_spec(name: str, kind: str = "vllm", faults: str = "", **overrides: Any) -> ModelSpec:
    env = {"STANDIN_FAULTS": faults} if faults else {}
    env.update(overrides.pop("env", {}))
    values: dict[str, Any] = {
        "name": name,
        "engine": kind,
        "model": "/models/standin",
        "command": (sys.executable, str(STANDIN / kind)),
        "env": env,
        "health": FAST_HEALTH,
        "restart": FAST_RESTART,
        "stop_grace": 1.0,
        "startup_timeout": 15.0,
    }
    values.update(overrides)
    return ModelSpec(**values)


def test_vllm_ready_after_loading_and_its_orphaned_engine_core_is_ended_on_crash(name: str) -> None:
    async def main() -> None:
        events = Events()
        began = time.monotonic()
        async with supervised(standin_spec(name, faults="startup-delay=0.5"), events=events) as sup:
            assert await sup.wait_ready(10)
            assert time.monotonic() - began >= 0.5
            first = sup.snapshot()
            old = set(tagged_pids(name)) - {first.pid}
            assert first.engine_pid is not None and len(old) == 3  # API server, EngineCore, Worker
            os.kill(first.engine_pid, signal.SIGKILL)  # the real vLLM leaves EngineCore running here
            await wait_until(lambda: sup.snapshot().restarts == 1 and sup.state is S.READY, limit=10)
            assert all(pid_gone(pid) for pid in old)
            assert sup.snapshot().engine_pid not in old
        assert events.states()[:5] == ["starting", "ready", "backoff", "starting", "ready"]

    run(main())


def test_vllm_setsid_workers_that_ignore_sigterm_are_gone_after_stop(name: str) -> None:
    async def main() -> None:
        spec = standin_spec(name, faults="fork-workers=2,setsid,ignore-sigterm=all", stop_grace=0.5)
        async with supervised(spec) as sup:
            assert await sup.wait_ready(10)
            await wait_until(lambda: len(tagged_pids(name)) >= 5)  # reaper, API server, EngineCore, 2 workers
            launched = tagged_pids(name)
            began = time.monotonic()
            await sup.stop()
            assert time.monotonic() - began >= 0.5  # the grace was given before SIGKILL
            assert all(pid_gone(pid) for pid in launched) and tagged_pids(name) == []

    run(main())


def test_vllm_crash_loop_at_startup_ends_failed(name: str) -> None:
    async def main() -> None:
        async with supervised(standin_spec(name, faults="exit-at-startup=3")) as sup:
            assert not await sup.wait_ready(15)
            snap = sup.snapshot()
            assert snap.state is S.FAILED and snap.launches == 4 and snap.last_exit_code == 3
            assert any("exit-at-startup" in line for line in sup.log.tail())

    run(main())


def test_lmdeploy_alive_but_unhealthy_is_restarted(name: str) -> None:
    async def main() -> None:
        spec = standin_spec(name, "lmdeploy", "engine-dead-after=0.3")
        async with supervised(spec) as sup:
            assert await sup.wait_ready(10)
            first = sup.snapshot().engine_pid
            await wait_until(lambda: sup.snapshot().restarts >= 1, limit=10)
            assert "health check failed 3 times in a row (HTTP 503)" in (sup.snapshot().last_error or "")
            assert first is not None and pid_gone(first)

    run(main())


def test_lmdeploy_initializing_503_is_not_ready_yet(name: str) -> None:
    async def main() -> None:
        async with supervised(standin_spec(name, "lmdeploy", "initializing=0.6")) as sup:
            await wait_until(lambda: any("Uvicorn running" in line for line in sup.log.tail(20)), limit=10)
            assert sup.state is S.STARTING  # listening, but /health says 503 initializing
            assert await sup.wait_ready(10)
            assert sup.snapshot().restarts == 0

    run(main())


def test_vllm_flapping_health_after_ready_restarts_nothing(name: str, tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    health = HealthPolicy(interval=0.05, timeout=0.5, startup_interval=0.05, unhealthy_threshold=3, healthy_threshold=2)

    async def main() -> None:
        events = Events()
        spec = standin_spec(name, health=health, env={"STANDIN_FAULTS_FILE": str(faults)})
        async with supervised(spec, events=events) as sup:
            assert await sup.wait_ready(10)
            faults.write_text(json.dumps({"health": "flap:1"}))
            await asyncio.sleep(1.0)
            snap = sup.snapshot()
            assert snap.state is S.READY and snap.restarts == 0 and snap.launches == 1
            flaps = sum('"GET /health HTTP/1.1" 503' in line for line in sup.log.tail())
            assert flaps >= 5  # it did flap
            assert snap.probe_failures >= flaps - 1  # counted (gateway_engine_probe_failures_total), not acted on
        assert events.states() == ["starting", "ready", "stopping", "stopped"]

    run(main())


GATEWAY_SCRIPT = """
import asyncio, sys
sys.path.insert(0, {repo!r})
from engines import EnginePool
from engines.spec import ModelSpec, HealthPolicy

async def main():
    spec = ModelSpec(name={model!r}, engine="vllm", model="/models/standin", command=(sys.executable, {vllm!r}),
                     env={{"STANDIN_FAULTS": "fork-workers=2,setsid,ignore-sigterm=all"}}, stop_grace=1,
                     health=HealthPolicy(startup_interval=0.05, interval=0.2))
    pool = EnginePool([spec], sweep=False)
    await pool.start()
    ready = await pool.resolve({model!r}).replicas[0].wait_ready(15)
    print("READY" if ready else "NOT READY", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_gateway_sigkilled_leaves_no_vllm_process(tmp_path: Path) -> None:
    model = unique()
    script = tmp_path / "gateway.py"
    script.write_text(GATEWAY_SCRIPT.format(repo=str(REPO), model=model, vllm=str(STANDIN / "vllm")))
    gateway = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )

    def engine_processes() -> list[int]:
        return [t.pid for t in procfs.tagged_processes(owner_pid=gateway.pid)]

    try:
        assert gateway.stdout is not None
        assert gateway.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 5
        while len(engine_processes()) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(engine_processes()) >= 5
        gateway.kill()
        gateway.wait(5)
        deadline = time.monotonic() + 5  # the workers ignore SIGTERM: the reaper's grace (1 s), then SIGKILL
        while engine_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine_processes() == []
    finally:
        gateway.kill()
        gateway.wait(5)
        if gateway.stdout is not None:
            gateway.stdout.close()
        procfs.kill(engine_processes())


def test_vllm_log_flood_keeps_serving_and_the_ring_bounded(name: str) -> None:
    async def main() -> None:
        async with supervised(standin_spec(name, faults="log-flood=50000")) as sup:
            assert await sup.wait_ready(10)
            await asyncio.sleep(1.0)
            snap = sup.snapshot()
            assert snap.state is S.READY and snap.restarts == 0 and snap.health_failures == 0
            assert sup.log.total_lines > 20_000
            assert len(sup.log) <= sup.log.max_lines and sup.log.nbytes <= sup.log.max_bytes

    run(main())
