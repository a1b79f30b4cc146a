"""EngineProcess and the reaper under it, with real processes: every process of a launch ends with it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engines_helpers import (  # noqa: F401 (the *_fixture names are fixtures)
    REPO,
    fake_engine_fixture,
    name_fixture,
    pid_gone,
    run,
    tagged_pids,
    unique,
    wait_until,
)

from engines.process import procfs
from engines.process.launch import EngineProcess, sweep_leftovers
from engines.process.log_ring import TRUNCATED, LogRing
from engines.process.ports import pick_free_port

pytestmark = pytest.mark.timeout(30)


def launch(
    fake: Path,
    model: str,
    env: dict[str, str],
    *,
    grace: float = 1.0,
    log: LogRing | None = None,
    port: int | None = None,
) -> EngineProcess:
    argv = [sys.executable, str(fake), "--port", str(port or pick_free_port())]
    return EngineProcess(argv, engine_id=f"{model}/0/1", env=env, grace=grace, log=log)


@pytest.mark.parametrize("setsid", [False, True], ids=["in-group", "setsid"])
def test_stop_ends_forked_workers_also_those_that_left_the_group(fake_engine: Path, name: str, setsid: bool) -> None:
    async def main() -> None:
        # A grace far longer than the test may run: SIGKILL would mean a worker was never sent SIGTERM.
        proc = launch(fake_engine, name, {"FAKE_FORK": "2", **({"FAKE_SETSID": "1"} if setsid else {})}, grace=60)
        await proc.start()
        # reaper + engine + two workers. A setsid worker double-forks: its first fork counts for a moment and
        # exits at once, so the count must hold after a pause (a lower bound, never an upper one).
        await wait_until(lambda: len(tagged_pids(name)) == 4)
        await asyncio.sleep(0.3)
        await wait_until(lambda: len(tagged_pids(name)) == 4 and proc.engine_pid is not None)
        workers = set(tagged_pids(name)) - {proc.pid, proc.engine_pid}
        assert len(workers) == 2
        if setsid:
            assert all(os.getsid(w) != proc.pid for w in workers)
        code = await proc.stop()
        assert code == 128 + signal.SIGTERM
        assert not any("SIGKILL" in line for line in proc.log.tail())
        assert tagged_pids(name) == [] and proc.leftovers == []
        assert all(pid_gone(w) for w in workers)

    run(main())


def test_sigterm_ignored_means_sigkill_after_the_grace(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        proc = launch(fake_engine, name, {"FAKE_IGNORE_SIGTERM": "1", "FAKE_FORK": "1"}, grace=0.5)
        await proc.start()
        await wait_until(lambda: len(tagged_pids(name)) == 3)
        began = time.monotonic()
        code = await proc.stop(0.5)
        assert time.monotonic() - began >= 0.5  # the grace was given
        assert code == 128 + signal.SIGKILL
        assert tagged_pids(name) == []
        assert any("SIGKILL" in line for line in proc.log.tail())

    run(main())


def test_engine_killed_by_sigkill_takes_its_workers_with_it(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        proc = launch(fake_engine, name, {"FAKE_FORK": "2", "FAKE_SETSID": "1"})
        await proc.start()
        await wait_until(lambda: len(tagged_pids(name)) == 4)
        engine = proc.engine_pid
        assert engine is not None
        os.kill(engine, signal.SIGKILL)  # like vLLM's API server dying: EngineCore and workers stay behind
        assert await proc.wait() == 128 + signal.SIGKILL
        assert tagged_pids(name) == []  # the reaper ended them before it exited
        await proc.stop()

    run(main())


def test_a_missing_executable_exits_127_and_says_why(name: str) -> None:
    async def main() -> None:
        proc = EngineProcess(["/nonexistent/engine", "serve"], engine_id=f"{name}/0/1", grace=1)
        await proc.start()
        assert await proc.wait() == 127
        await proc.stop()
        assert any("cannot start '/nonexistent/engine'" in line for line in proc.log.tail())

    run(main())


def test_log_flood_does_not_block_and_the_ring_stays_bounded(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        ring = LogRing(max_lines=500, max_bytes=64 * 1024, max_line=4096)
        env = {"FAKE_LOG_FLOOD": str(20 * 1024 * 1024), "FAKE_LONG_LINE": str(1024 * 1024)}
        proc = launch(fake_engine, name, env, log=ring)
        await proc.start()
        await wait_until(lambda: any("serving on" in line for line in ring.tail(5)), limit=20)
        assert ring.total_lines > 200_000
        assert len(ring) <= 500 and ring.nbytes <= 64 * 1024
        long_lines = [line for line in ring.tail() if line.startswith("LLLL")]
        assert long_lines == ["L" * 4096 + TRUNCATED]
        assert "after the long line" in ring.tail()
        await proc.stop()

    run(main())


GATEWAY_SCRIPT = """
import asyncio, sys
sys.path.insert(0, {repo!r})
from engines import EnginePool
from engines.spec import ModelSpec, HealthPolicy

async def main():
    spec = ModelSpec(name={model!r}, engine="vllm", model="fake", command=(sys.executable, {fake!r}),
                     env={{"FAKE_FORK": "2", "FAKE_SETSID": "1"}}, stop_grace=1,
                     health=HealthPolicy(startup_interval=0.05, interval=0.2))
    pool = EnginePool([spec], sweep=False)
    await pool.start()
    ready = await pool.resolve({model!r}).replicas[0].wait_ready(15)
    print("READY" if ready else "NOT READY", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_a_gateway_killed_by_sigkill_leaves_no_engine_behind(fake_engine: Path, tmp_path: Path) -> None:
    model = unique()
    script = tmp_path / "gateway.py"
    script.write_text(GATEWAY_SCRIPT.format(repo=str(REPO), model=model, fake=str(fake_engine)))
    gateway = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)

    def engine_processes() -> list[int]:
        return [t.pid for t in procfs.tagged_processes(owner_pid=gateway.pid)]

    try:
        assert gateway.stdout is not None
        assert gateway.stdout.readline().strip() == "READY"
        assert len(engine_processes()) == 4  # reaper, engine, two setsid workers
        gateway.kill()
        gateway.wait(5)
        deadline = time.monotonic() + 5
        while engine_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine_processes() == []
    finally:
        gateway.kill()
        gateway.wait(5)
        if gateway.stdout is not None:
            gateway.stdout.close()
        procfs.kill(engine_processes())


def test_sweep_kills_what_a_dead_gateway_left_behind() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    model = unique()
    env = {
        **os.environ,
        "GATEWAY_ENGINE_ID": f"{model}/0/1",
        "GATEWAY_OWNER_PID": str(dead.pid),
        "GATEWAY_OWNER_START": "1",
    }
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        time.sleep(0.05)
        live_env = {
            **env,
            "GATEWAY_OWNER_PID": str(os.getpid()),
            "GATEWAY_OWNER_START": procfs.start_time(os.getpid()) or "",
        }
        mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=live_env)
        try:
            time.sleep(0.05)
            swept = sweep_leftovers()
            # Another test run's sweep on this machine may have got there first: either way, it is gone.
            assert orphan.pid in swept or orphan.poll() is not None
            assert orphan.wait(5) == -signal.SIGKILL
            assert mine.poll() is None  # its gateway (this test) is alive
        finally:
            mine.kill()
            mine.wait()
    finally:
        orphan.kill()
        orphan.wait()
