"""Engine faults seen through a real gateway process (docs/RELIABILITY.md §6: A1, A10, A11, C6, C10).

Each case drives the stand-in engines (tests/standin/README.md) behind ``python -m gateway serve`` and
asserts what a client sees, what the gateway's process tree looks like in /proc, and what the engine
recorded (STANDIN_RECORD).
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engines.process.log_ring import LogRing
from engines.process.ports import listener_pids
from tests.helpers import Gateway, chat, free_port, run_gateway, standin_command, tagged_pids, wait_until
from tests.helpers import standin_model as model
from tests.standin.harness import read_records, write_faults

pytestmark = pytest.mark.timeout(60)

# What the stand-in sends for garbage=badjson / badsse (tests/standin/_shapes.py garbage_body, copied: that
# module imports its siblings as top-level modules and cannot be imported from here).
GARBAGE_CHUNK = (
    b'{"id":"chatcmpl-garbage","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}]}'
)
BAD_JSON = b'{"id": "chatcmpl-garbage", "object": "chat.completion", "choices": [{"in'
BAD_SSE = (
    b"data:"
    + GARBAGE_CHUNK
    + b"\n"
    + b"event: weird\n\n"
    + GARBAGE_CHUNK
    + b"\n\n"
    + b"data: "
    + GARBAGE_CHUNK
    + b"\r"
    + b"data: {not json}\n\n"
    + b"data: [DONE]\n\n"
)
# The start of the stand-in's exit-at-startup stderr (tests/standin/_main.py): none of it may reach a client.
ENGINE_STDERR = ("Traceback", "RuntimeError", "Engine core initialization failed", "exit-at-startup")


def replica(gw: Gateway, name: str) -> dict[str, Any]:
    """The admin row of replica 0 of ``name`` (pid = the launch's reaper, engine_pid = the API server)."""
    rows = httpx.get(gw.url + "/admin/engines", timeout=5).json()["data"]
    return next(r for r in rows if r["model"] == name and r["replica"] == 0)


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and isinstance(body["error"]["message"], str)
    return dict(body["error"])


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, ppid) from /proc/<pid>/stat; the command name may hold spaces and parentheses, so split after it."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def zombie_children(owner: int) -> list[int]:
    """Zombies whose parent is the gateway or one of the processes it launched: children nobody reaped."""
    parents = {owner, *tagged_pids(str(owner))}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(entry)
            if stat is not None and stat[0] == "Z" and stat[1] in parents:
                found.append(int(entry))
    return found


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    stat = _stat(str(pid))
    return stat is not None and stat[0] != "Z"


# -- A1: an engine that exits during startup ---------------------------------------------------------------


def _crash_at_startup_config(queue_timeout: float) -> dict[str, Any]:
    # "bad" exits 0.5 s into its start, then waits 30 s in backoff (no jitter): the whole test runs in that gap.
    return {
        "server": {"retry_after": 2, "queue_timeout": queue_timeout},
        "models": {
            "bad": model(
                model="org/bad",
                env={"STANDIN_FAULTS": "startup-delay=0.5,exit-at-startup=1"},
                restart={"initial_delay": 30, "jitter": 0},
            ),
            "good": model(model="org/good"),
        },
    }


def _in_backoff(gw: Gateway) -> bool:
    try:
        row = replica(gw, "bad")
    except httpx.HTTPError:  # not listening yet: started with wait_ready=False, as "bad" keeps it unready
        return False
    return bool(row["state"] == "backoff" and row["last_exit_code"] == 1)


def test_a1_engine_exiting_at_startup_gives_a_clean_503_while_others_serve(tmp_path: Path) -> None:
    # queue_timeout 1: a request for the crashed model gets its answer within a second either way (see the
    # next test for "at once"); this one checks what the answer and the process tree look like.
    with run_gateway(_crash_at_startup_config(1), tmp_path, wait_ready=False) as gw:
        assert wait_until(lambda: _in_backoff(gw), 15), replica(gw, "bad")
        # The exit was noticed from the process (exit code 1), not from a startup deadline.
        assert replica(gw, "bad")["last_error"] == "exited with code 1 during startup"

        refused = chat(gw.url, "bad")
        assert_openai_error(refused, 503, "engine_unavailable")
        assert refused.headers["retry-after"].isdigit() and int(refused.headers["retry-after"]) >= 1
        assert not [s for s in ENGINE_STDERR if s in refused.text], refused.text
        # ...while the engine's last lines did go to the operator, in the gateway's log.
        assert "Engine core initialization failed" in gw.log()

        assert wait_until(lambda: chat(gw.url, "good").status_code == 200, 10)
        assert replica(gw, "bad")["state"] == "backoff"  # still in the gap: the 503 above was not luck
        # The launch that exited was reaped whole: the reaper by the gateway, the engine's children by the reaper.
        assert wait_until(lambda: not zombie_children(gw.proc.pid), 5), zombie_children(gw.proc.pid)


def test_a1_requests_during_startup_backoff_are_refused_at_once(tmp_path: Path) -> None:
    # queue_timeout 60 vs a 5 s client timeout: a request parked in the queue for the backoff times out here.
    with run_gateway(_crash_at_startup_config(60), tmp_path, wait_ready=False) as gw:
        assert wait_until(lambda: _in_backoff(gw), 15), replica(gw, "bad")
        try:
            refused = chat(gw.url, "bad", timeout=5)
        except httpx.TimeoutException:
            pytest.fail("a request for a model in startup backoff waited in the queue")
        assert_openai_error(refused, 503, "engine_unavailable")
        assert "retry-after" in refused.headers


# -- A10: a child of the killed engine still holds its fixed port ------------------------------------------


def test_a10_port_held_by_an_orphan_is_freed_and_the_engine_relaunched_on_it(tmp_path: Path) -> None:
    port = free_port()
    held = model(port=port, env={"STANDIN_FAULTS": "hold-port-in-child"}, restart={"initial_delay": 0.2, "jitter": 0})
    with run_gateway({"models": {"held": held}}, tmp_path) as gw:
        first = replica(gw, "held")
        assert first["state"] == "ready" and first["port"] == port and first["launches"] == 1
        holders = [p for p in tagged_pids(str(gw.proc.pid)) if "standin::port-holder" in cmdline(p)]
        assert len(holders) == 1, holders
        holder = holders[0]

        # Only the API server dies: its port-holder child keeps the socket in LISTEN.
        os.kill(first["engine_pid"], signal.SIGKILL)

        def relaunched() -> bool:
            row = replica(gw, "held")
            return bool(row["state"] == "ready" and row["engine_pid"] not in (None, first["engine_pid"]))

        assert wait_until(relaunched, 20), replica(gw, "held")
        again = replica(gw, "held")
        assert again["port"] == port
        # One relaunch, no attempt refused for a busy port: the old launch was ended whole before it.
        assert again["launches"] == 2 and again["restarts"] == 1, again
        assert "already in use" not in gw.log()
        assert not alive(holder) or "port-holder" not in cmdline(holder)
        # The port is now held by the new launch's processes only.
        owners = listener_pids(port, tagged_pids(str(gw.proc.pid)))
        assert owners is not None and again["engine_pid"] in owners and holder not in owners
        assert chat(gw.url, "held").status_code == 200


# -- A11: an engine flooding its output ---------------------------------------------------------------------


def test_a11_log_flood_keeps_serving_and_gateway_memory_bounded(tmp_path: Path) -> None:
    # on_demand: the flood starts with the engine, after the idle gateway's RSS has been read. log_level warning:
    # at info every engine line is also formatted into the gateway's own log, which caps the drain at ~20k
    # lines/s on a small box; at warning it is the pipe and the ring alone, and a flood larger than the memory
    # bound below (each flood line is over 100 bytes) gets through in a few seconds.
    flood = model(load="on_demand", env={"STANDIN_FAULTS": "log-flood=200000"})
    config = {"server": {"queue_timeout": 30, "log_level": "warning"}, "models": {"flood": flood}}
    with run_gateway(config, tmp_path) as gw:
        before = rss_kib(gw.proc.pid)
        statuses = [chat(gw.url, "flood", f"request {i}").status_code for i in range(20)]
        assert statuses == [200] * 20
        # The pipe kept draining (a stalled pipe stalls the stand-in's writes): over 50 MB of output went by...
        assert wait_until(lambda: _total_lines(gw) > 500_000, 30), _total_lines(gw)
        after = rss_kib(gw.proc.pid)
        # ...and the gateway kept only its bounded ring of it.
        assert after - before < 50 * 1024, f"gateway RSS grew from {before} KiB to {after} KiB during the flood"
        logs = httpx.get(gw.url + "/admin/engines/flood/logs", params={"tail": 100_000}, timeout=10).json()
        assert len(logs["data"][0]["lines"]) <= LogRing().max_lines
        assert replica(gw, "flood")["health_failures"] == 0
        assert chat(gw.url, "flood", "still there").status_code == 200


def _total_lines(gw: Gateway) -> int:
    logs = httpx.get(gw.url + "/admin/engines/flood/logs", params={"tail": 0}, timeout=10).json()
    return int(logs["data"][0]["total_lines"])


# -- C6 and C10: one gateway, faults switched per test through the engine's faults file ---------------------


class Engine:
    def __init__(self, gateway: Gateway, faults: Path, record: Path) -> None:
        self.gateway, self.faults, self.record = gateway, faults, record

    def events(self, kind: str) -> list[dict[str, Any]]:
        return read_records(self.record, kind)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    tmp = tmp_path_factory.mktemp("faults")
    faults, record = tmp / "faults.json", tmp / "record.jsonl"
    write_faults(faults, {})
    # The total clock (3 s) runs out long before the first-byte one (30 s): C10 is about the total one.
    config = {
        "server": {"total_timeout": 3, "first_byte_timeout": 30, "idle_timeout": 10},
        "models": {
            "chat": model(
                env={"STANDIN_FAULTS_FILE": str(faults), "STANDIN_RECORD": str(record)},
                health={"interval": 60, "startup_interval": 0.1},
            )
        },
    }
    with run_gateway(config, tmp) as gw:
        yield Engine(gw, faults, record)


@pytest.fixture
def faults(engine: Engine) -> Iterator[Any]:
    yield lambda **kw: write_faults(engine.faults, kw)
    write_faults(engine.faults, {})


def test_c6_bad_json_from_the_engine_is_a_sanitized_502(engine: Engine, faults: Any) -> None:
    faults(garbage="badjson")
    answer = chat(engine.gateway.url, "chat")
    error = assert_openai_error(answer, 502, "bad_upstream_response")
    assert error["message"] == "The engine sent an answer that is not valid JSON."
    assert "chatcmpl-garbage" not in answer.text and BAD_JSON.decode() not in answer.text  # no engine bytes echoed


def test_c6_badly_framed_sse_is_relayed_unchanged_and_ends_with_done(engine: Engine, faults: Any) -> None:
    # relay.py forwards a stream whole events at a time and parses only events that mention "error" or
    # "usage": the odd framing is not its to judge, so the bytes pass as they are and the [DONE] ends it.
    faults(garbage="badsse")
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", engine.gateway.url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    assert raw == BAD_SSE
    assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw


def test_c10_non_stream_answer_past_the_total_deadline_is_504_and_the_engine_is_let_go(
    engine: Engine, faults: Any
) -> None:
    faults(**{"first-token-delay": 60, "record-disconnects": True})
    gone_before = len(engine.events("disconnect"))
    # 60 s of "generation" vs the 3 s total limit and a 20 s client timeout: only the total clock can answer.
    answer = chat(engine.gateway.url, "chat", timeout=20)
    error = assert_openai_error(answer, 504, "upstream_timeout")
    assert error["message"] == "The engine did not finish the answer within 3 s."
    # The upstream request was closed, so the engine stopped generating for nobody.
    assert wait_until(lambda: len(engine.events("disconnect")) > gone_before, 10)
    assert engine.events("disconnect")[-1]["path"] == "/v1/chat/completions"
    assert wait_until(lambda: "standin: client disconnected" in engine.gateway.log(), 10)  # its stderr, logged


def test_b2_slow_probes_take_an_engine_out_of_rotation_before_any_restart(tmp_path: Path) -> None:
    """B2: probes time out (the engine is busy, say). It leaves rotation at the threshold; its stream in flight
    finishes; it is restarted only once it has failed for restart_grace, and comes back if the probes pass."""
    faults = {name: tmp_path / f"faults-{name}.json" for name in ("patient", "quick")}
    for path in faults.values():
        write_faults(path, {"token-interval": 0.1})
    health = {"interval": 0.3, "startup_interval": 0.1, "timeout": 0.5, "unhealthy_threshold": 2}
    config = {
        "server": {"retry_after": 1},
        "models": {
            name: model(health={**health, "restart_grace": grace}, env={"STANDIN_FAULTS_FILE": str(faults[name])})
            for name, grace in (("patient", 120), ("quick", 1))
        },
    }
    with run_gateway(config, tmp_path) as gw:
        first = replica(gw, "patient")
        body = {
            "model": "patient",
            "messages": [{"role": "user", "content": "a b c"}],
            "max_tokens": 40,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as stream:
            for path in faults.values():
                write_faults(path, {"token-interval": 0.1, "health": "slow:5"})
            assert wait_until(lambda: replica(gw, "patient")["state"] == "unhealthy", 15)
            refused = chat(gw.url, "patient")
            assert_openai_error(refused, 503, "engine_unavailable")  # out of rotation: nowhere to send it
            assert refused.headers["retry-after"] == "1"
            streamed = b"".join(stream.iter_raw())
        assert streamed.endswith(b"data: [DONE]\n\n")  # its answer in flight was not cut by a restart
        # The other model's grace is 1 s: restarted. This one's is 120 s: untouched.
        assert wait_until(lambda: replica(gw, "quick")["restarts"] >= 1, 15)
        row = replica(gw, "patient")
        assert row["state"] == "unhealthy" and row["restarts"] == 0 and row["engine_pid"] == first["engine_pid"]
        write_faults(faults["patient"], {})
        assert wait_until(lambda: replica(gw, "patient")["state"] == "ready", 10)
        assert chat(gw.url, "patient").status_code == 200
        assert replica(gw, "patient")["engine_pid"] == first["engine_pid"]
        metrics = httpx.get(gw.url + "/metrics", timeout=5).text
        assert 'gateway_engine_state{model="patient",replica="0",state="unhealthy"} 0.0' in metrics
    assert "out of rotation, restarted if it lasts 120s" in gw.log()


@pytest.mark.parametrize("engine", ["vllm", "lmdeploy"])
def test_an_engine_started_with_its_own_key_is_sent_that_key(tmp_path: Path, engine: str) -> None:
    """The operator gave the engine a key in ``args`` only: probes and requests carry it (no 401 from the
    engine), and the client's own Authorization never reaches the engine."""
    flag = "api-key" if engine == "vllm" else "api-keys"
    record = tmp_path / "record.jsonl"
    config = {
        "models": {
            "m": model(
                engine=engine,
                command=standin_command(engine),
                args={flag: "sk-engine-own-key"},
                env={"STANDIN_RECORD": str(record)},
            )
        }
    }
    with run_gateway(config, tmp_path) as gw:
        answer = httpx.post(
            gw.url + "/v1/chat/completions",
            timeout=20,
            headers={"Authorization": "Bearer sk-client-key"},
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert answer.status_code == 200, answer.text
    sent = [r for r in read_records(record, "request") if r["path"] == "/v1/chat/completions"]
    assert len(sent) == 1
    headers = {k.lower(): v for k, v in sent[0]["headers"].items()}
    assert headers["authorization"] == "Bearer sk-engine-own-key"


def test_a2_an_engine_never_healthy_is_ended_at_its_startup_deadline_and_its_port_freed(tmp_path: Path) -> None:
    """A2: /health answers 503 for ever. At the startup deadline the launch is ended (no process, the port
    free again), the model is FAILED once its budget is spent, and no request ever reached the engine."""
    port = free_port()
    record = tmp_path / "record.jsonl"
    config = {
        "server": {"retry_after": 1},
        "models": {
            "sick": model(
                port=port,
                startup_timeout=1,
                restart={"max_restarts": 0},
                env={"STANDIN_FAULTS": "never-ready", "STANDIN_RECORD": str(record)},
            )
        },
    }
    with run_gateway(config, tmp_path, wait_ready=False) as gw:

        def failed() -> bool:
            try:
                return bool(replica(gw, "sick")["state"] == "failed")
            except httpx.TransportError:  # not listening yet: the lifespan is still starting the engines
                return False

        assert wait_until(failed, 20), gw.log()[-2000:]
        row = replica(gw, "sick")
        assert "not ready after 1s" in (row["last_error"] or "") and row["pid"] is None
        assert not tagged_pids(str(gw.proc.pid))
        with socket.socket() as probe:  # nothing of the launch holds the port (TIME_WAIT left by probes aside,
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as for the engines themselves)
            probe.bind(("127.0.0.1", port))
            probe.listen()
        assert_openai_error(chat(gw.url, "sick"), 503, "engine_failed")
    assert not [r for r in read_records(record, "request") if r["path"].startswith("/v1/chat")]
