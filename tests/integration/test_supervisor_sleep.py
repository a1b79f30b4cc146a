"""Sleep and wake (issue 17): a real Supervisor over the vLLM and LMDeploy stand-ins, real processes and sockets.

The stand-ins answer /sleep, /wake_up (vLLM, dev mode) and /wakeup (LMDeploy) as the engines' code does
(tests/standin/_sleep.py). The specs give the vLLM replica a GPU, so that its command line is a GPU host's
(``--enable-sleep-mode``); the stand-in never touches one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
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
    wait_until,
)

from engines.replica.state import EngineState
from engines.replica.supervisor import Supervisor
from engines.spec import ModelSpec
from tests.standin.harness import read_records, write_faults

S = EngineState
STANDIN = REPO / "tests" / "standin"
pytestmark = pytest.mark.timeout(60)


def sleepy_spec(name: str, kind: str = "vllm", faults: str = "", level: int = 1, **overrides: Any) -> ModelSpec:
    env = {"STANDIN_FAULTS": faults} if faults else {}
    env.update(overrides.pop("env", {}))
    values: dict[str, Any] = {
        "name": name,
        "engine": kind,
        "model": "/models/standin",
        "command": (sys.executable, str(STANDIN / kind)),
        "env": env,
        "gpus": (0,),
        "sleep": {"level": level},
        "health": FAST_HEALTH,
        "restart": FAST_RESTART,
        "stop_grace": 1.0,
        "startup_timeout": 15.0,
    }
    values.update(overrides)
    return ModelSpec(**values)


async def engine(sup: Supervisor, method: str, path: str, body: Any = None, limit: float = 10) -> tuple[int, bytes]:
    """A request straight to the replica's engine (not through the supervisor)."""
    snap = sup.snapshot()
    url = f"http://127.0.0.1:{snap.port}{path}"
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, json=body, timeout=aiohttp.ClientTimeout(total=limit)) as resp:
            return resp.status, await resp.read()


CHAT = {"model": None, "messages": [{"role": "user", "content": "still here"}], "max_tokens": 4}


def test_vllm_sleeps_holds_a_request_and_wakes(name: str, tmp_path: Path) -> None:
    async def main() -> None:
        events = Events()
        record = tmp_path / "engine.jsonl"
        spec = sleepy_spec(name, env={"STANDIN_RECORD": str(record)})
        async with supervised(spec, events=events) as sup:
            assert await sup.wait_ready(10)
            assert "--enable-sleep-mode" in sup.snapshot().argv
            await sup.sleep()
            snap = sup.snapshot()
            assert snap.state is S.SLEEPING and snap.base_url is None and snap.inflight == 0
            assert snap.last_error is None and not sup.ready.is_set()
            assert json.loads((await engine(sup, "GET", "/is_sleeping"))[1]) == {"is_sleeping": True}
            assert [r["frees_memory"] for r in read_records(record, "sleep")] == [True]  # a GPU host's sleep
            # vLLM takes a request while asleep and holds it until the wake
            held = asyncio.create_task(engine(sup, "POST", "/v1/chat/completions", {**CHAT, "model": name}, 30))
            await asyncio.sleep(0.5)
            assert not held.done()
            await sup.sleep()  # asleep already: nothing happens
            assert sup.state is S.SLEEPING
            await sup.wake()
            assert sup.state in (S.WAKING, S.READY)
            assert await sup.wait_ready(10)
            status, body = await held
            assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "still here"
            assert json.loads((await engine(sup, "GET", "/is_sleeping"))[1]) == {"is_sleeping": False}
            assert sup.snapshot().launches == 1 and sup.snapshot().restarts == 0
        assert events.states() == ["starting", "ready", "sleeping", "waking", "ready", "stopping", "stopped"]
        calls = [(r["method"], r["path"], r["query"]) for r in read_records(record, "request")]
        assert ("POST", "/sleep", "level=1&mode=abort") in calls and ("POST", "/wake_up", "") in calls

    run(main())


def test_vllm_level_2_wakes_weights_reloads_them_then_the_kv_cache(name: str, tmp_path: Path) -> None:
    async def main() -> None:
        record = tmp_path / "engine.jsonl"
        async with supervised(sleepy_spec(name, level=2, env={"STANDIN_RECORD": str(record)})) as sup:
            assert await sup.wait_ready(10)
            await sup.sleep()
            assert sup.state is S.SLEEPING
            await sup.wake()
            assert await sup.wait_ready(10)
        calls = [(r["path"], r["query"]) for r in read_records(record, "request")]
        wake = calls[calls.index(("/sleep", "level=2&mode=abort")) + 2 :]
        assert [c for c in wake if c[0] != "/is_sleeping"] == [
            ("/wake_up", "tags=weights"),
            ("/collective_rpc", ""),
            ("/wake_up", "tags=kv_cache"),
        ]
        assert [r["event"] for r in read_records(record) if r["event"] == "reload_weights"] == ["reload_weights"]

    run(main())


def test_lmdeploy_sleeps_refuses_requests_and_wakes(name: str) -> None:
    async def main() -> None:
        events = Events()
        async with supervised(sleepy_spec(name, "lmdeploy", args={"api-keys": ["sk-e"]}), events=events) as sup:
            assert await sup.wait_ready(10)
            await sup.sleep()  # its management routes want the key and a JSON content type: the supervisor sends both
            assert sup.state is S.SLEEPING
            status, body = await engine(sup, "GET", "/health")
            assert status == 200 and json.loads(body)["status"] == "sleeping"
            # LMDeploy refuses inference while asleep (503, before it checks the key) rather than holding it
            status, body = await engine(sup, "POST", "/v1/chat/completions", {**CHAT, "model": name})
            assert status == 503 and "sleeping" in json.loads(body)["message"]
            await wait_until(lambda: sup.snapshot().health_failures == 0)  # probes pass while asleep
            await sup.wake()
            assert await sup.wait_ready(10)
        assert events.states()[:5] == ["starting", "ready", "sleeping", "waking", "ready"]

    run(main())


def test_a_failed_sleep_is_a_stop_with_the_reason(name: str) -> None:
    async def main() -> None:
        events = Events()
        async with supervised(sleepy_spec(name, faults="sleep-fails"), events=events) as sup:
            assert await sup.wait_ready(10)
            launched = tagged_pids(name)
            await sup.sleep()
            snap = sup.snapshot()
            assert snap.state is S.STOPPED
            assert snap.last_error is not None and snap.last_error.startswith("could not sleep: POST /sleep")
            assert "HTTP 500" in snap.last_error and "stopped instead" in snap.last_error
            assert all(pid_gone(pid) for pid in launched) and tagged_pids(name) == []
        assert events.states()[:4] == ["starting", "ready", "stopping", "stopped"]

    run(main())


def test_without_a_sleep_api_the_sleep_is_a_stop(name: str) -> None:
    async def main() -> None:
        async with supervised(sleepy_spec(name, sleep=None)) as sup:
            assert await sup.wait_ready(10)
            await sup.sleep()
            assert sup.state is S.STOPPED
            assert sup.snapshot().last_error == (
                f"could not sleep: the model '{name}' has no 'sleep:' in its config; stopped instead"
            )
            await sup.wake()  # a wake of a stopped replica is a start
            assert await sup.wait_ready(10)
            await sup.restart()
            await sup.sleep()  # not READY yet (STARTING): a stop, like "stop"
            assert sup.state is S.STOPPED

    run(main())


def test_a_failed_wake_is_a_crash_and_a_cold_restart(name: str, tmp_path: Path) -> None:
    async def main() -> None:
        events = Events()
        faults = tmp_path / "faults.json"
        async with supervised(sleepy_spec(name, env={"STANDIN_FAULTS_FILE": str(faults)}), events=events) as sup:
            assert await sup.wait_ready(10)
            first = sup.snapshot().engine_pid
            await sup.sleep()
            assert sup.state is S.SLEEPING
            write_faults(faults, {"wake-fails": True})
            await sup.wake()
            await wait_until(lambda: sup.snapshot().launches == 2 and sup.state is S.READY)
            snap = sup.snapshot()
            assert snap.restarts == 1 and snap.engine_pid != first and first is not None and pid_gone(first)
            assert json.loads((await engine(sup, "GET", "/is_sleeping"))[1]) == {"is_sleeping": False}
        assert events.states()[:7] == ["starting", "ready", "sleeping", "waking", "backoff", "starting", "ready"]
        failed = events.items[4].reason
        assert failed.startswith("wake failed: POST /wake_up answered HTTP 500"), failed

    run(main())


def test_killed_while_asleep_is_stopped_and_not_restarted(name: str) -> None:
    async def main() -> None:
        events = Events()
        async with supervised(sleepy_spec(name), events=events) as sup:
            assert await sup.wait_ready(10)
            await sup.sleep()
            launched = tagged_pids(name)
            assert len(launched) >= 4  # reaper, API server, EngineCore, Worker
            engine_pid = sup.snapshot().engine_pid
            assert engine_pid is not None
            os.kill(engine_pid, signal.SIGKILL)  # the real vLLM leaves EngineCore and its Worker orphaned here
            await wait_until(lambda: sup.state is S.STOPPED)
            snap = sup.snapshot()
            assert snap.last_exit_code == 128 + signal.SIGKILL
            assert snap.last_error is not None and snap.last_error.startswith("exited while asleep")
            assert all(pid_gone(pid) for pid in launched) and tagged_pids(name) == []
            await asyncio.sleep(10 * FAST_HEALTH.interval + FAST_RESTART.initial_delay)
            assert sup.state is S.STOPPED and sup.snapshot().launches == 1  # never restarted
        assert events.states()[:4] == ["starting", "ready", "sleeping", "stopped"]

    run(main())


def test_stop_while_asleep_leaves_nothing(name: str) -> None:
    async def main() -> None:
        events = Events()
        async with supervised(sleepy_spec(name, "lmdeploy", args={"backend": "pytorch"}), events=events) as sup:
            assert await sup.wait_ready(10)
            await sup.sleep()
            launched = tagged_pids(name)
            assert len(launched) >= 3  # reaper, API server, its ZMQMPEngine
            await sup.stop()
            assert sup.state is S.STOPPED and all(pid_gone(pid) for pid in launched) and tagged_pids(name) == []
        assert events.states() == ["starting", "ready", "sleeping", "stopping", "stopped"]

    run(main())


def test_commands_during_a_slow_sleep_wait_for_it_and_a_stop_ends_it(name: str) -> None:
    async def main() -> None:
        events = Events()
        async with supervised(sleepy_spec(name, faults="sleep-delay=1,wake-delay=0.5"), events=events) as sup:
            assert await sup.wait_ready(10)
            sleeping = asyncio.create_task(sup.sleep())
            await asyncio.sleep(0.2)
            await sup.wake()  # taken up once the sleep is done, not cutting it short
            await sleeping
            assert await sup.wait_ready(10)
            assert events.states()[:5] == ["starting", "ready", "sleeping", "waking", "ready"]
            # a stop during the sleep call does not wait for it
            sleeping = asyncio.create_task(sup.sleep())
            await asyncio.sleep(0.2)
            await sup.stop()
            await sleeping
            assert sup.state is S.STOPPED and tagged_pids(name) == []
            # a start while asleep is a wake
            await sup.start()
            assert await sup.wait_ready(10)
            await sup.sleep()
            await sup.start()
            assert await sup.wait_ready(10)
        assert events.states()[-6:] == ["ready", "sleeping", "waking", "ready", "stopping", "stopped"]

    run(main())


def test_a_stream_in_flight_when_vllm_sleeps_is_aborted(name: str) -> None:
    async def main() -> None:
        async with supervised(sleepy_spec(name, faults="token-interval=0.2")) as sup:
            assert await sup.wait_ready(10)
            body = {**CHAT, "model": name, "stream": True, "max_tokens": 50, "ignore_eos": True}
            stream = asyncio.create_task(engine(sup, "POST", "/v1/chat/completions", body, 30))
            await asyncio.sleep(0.5)
            await sup.sleep()  # mode=abort: what the gateway asks only once its leases are released
            assert sup.state is S.SLEEPING
            status, raw = await stream
            events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
            assert status == 200 and events[-1] == "[DONE]"
            finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]]
            assert finishes[-1] == "abort" and "length" not in finishes

    run(main())


def test_an_exit_during_the_sleep_call_is_a_stop(name: str) -> None:
    async def main() -> None:
        events = Events()
        async with supervised(sleepy_spec(name, faults="sleep-delay=5"), events=events) as sup:
            assert await sup.wait_ready(10)
            falling = asyncio.create_task(sup.sleep())
            await asyncio.sleep(0.5)
            engine_pid = sup.snapshot().engine_pid
            assert engine_pid is not None and not falling.done()
            os.kill(engine_pid, signal.SIGKILL)
            await falling
            snap = sup.snapshot()
            assert snap.state is S.STOPPED and snap.last_exit_code == 128 + signal.SIGKILL
            assert snap.last_error is not None and snap.last_error.startswith("exited while falling asleep")
            assert tagged_pids(name) == [] and snap.launches == 1
        assert events.states()[:4] == ["starting", "ready", "stopping", "stopped"]

    run(main())


def test_an_exit_during_the_wake_call_is_a_cold_restart(name: str) -> None:
    async def main() -> None:
        events = Events()
        async with supervised(sleepy_spec(name, faults="wake-delay=5"), events=events) as sup:
            assert await sup.wait_ready(10)
            await sup.sleep()
            await sup.wake()
            assert sup.state is S.WAKING
            engine_pid = sup.snapshot().engine_pid
            assert engine_pid is not None
            os.kill(engine_pid, signal.SIGKILL)
            await wait_until(lambda: sup.snapshot().launches == 2 and sup.state is S.READY, limit=20)
            assert sup.snapshot().last_exit_code == 128 + signal.SIGKILL
        assert events.states()[:7] == ["starting", "ready", "sleeping", "waking", "backoff", "starting", "ready"]
        assert events.items[4].reason == f"exited with code {128 + signal.SIGKILL} while waking"

    run(main())
