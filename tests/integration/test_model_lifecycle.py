"""Model lifecycle through a real gateway and stand-in engines: on-demand starts with a FIFO queue, idle stops,
GPU swaps, replicas with passive ejection, per-model concurrency, and config reload (HTTP and SIGHUP).

Which engine processes exist is read from /proc (every process of a launch carries
``GATEWAY_ENGINE_ID=<model>/<replica>/<launch>``); what reached an engine, from its STANDIN_RECORD file.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import Gateway, chat, run_gateway, wait_until
from tests.helpers import standin_model as model
from tests.standin.harness import read_records, write_faults

pytestmark = pytest.mark.timeout(60)


def stream(url: str, name: str, tokens: int, out: list[bytes], on_first: Callable[[], None] | None = None) -> None:
    body = {
        "model": name,
        "messages": [{"role": "user", "content": "stream please"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        parts = []
        for part in r.iter_raw():
            if not parts and on_first is not None:
                on_first()
            parts.append(part)
        out.append(b"".join(parts))


def in_thread(target: Callable[..., Any], *args: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(target(*args)), daemon=True)
    thread.start()
    return thread, result


def health(gw: Gateway) -> dict[str, Any]:
    return dict(httpx.get(gw.url + "/health", timeout=5).json()["models"])


def records(path: Path, event: str = "request") -> list[dict[str, Any]]:
    return read_records(path, event)


def engine_processes(owner: int) -> dict[str, set[int]]:
    """Live processes the gateway ``owner`` launched, by model."""
    found: dict[str, set[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = dict(v.split(b"=", 1) for v in fh.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if env.get(b"GATEWAY_OWNER_PID") == str(owner).encode() and b"GATEWAY_ENGINE_ID" in env:
            found.setdefault(env[b"GATEWAY_ENGINE_ID"].split(b"/")[0].decode(), set()).add(int(entry))
    return found


class Overlap:
    """Watches /proc while a test runs: did processes of two models ever live at the same time?"""

    def __init__(self, owner: int, models: set[str]) -> None:
        self.owner, self.models, self.both = owner, models, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.models <= set(engine_processes(self.owner)):
                self.both = True
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_on_demand_start_queue_overflow_disconnect_idle_stop_and_concurrency_limit(tmp_path: Path) -> None:
    lazy_rec, limited_rec = tmp_path / "lazy.jsonl", tmp_path / "limited.jsonl"
    config = {
        "server": {"retry_after": 1, "queue_timeout": 20},
        "models": {
            "lazy": model(
                load="on_demand",
                gpus=[0],
                max_queue=3,
                idle_timeout=1.5,
                env={"STANDIN_FAULTS": "startup-delay=2.5", "STANDIN_RECORD": str(lazy_rec)},
            ),
            "limited": model(
                max_concurrency=1, env={"STANDIN_FAULTS": "token-interval=0.1", "STANDIN_RECORD": str(limited_rec)}
            ),
        },
    }
    with run_gateway(config, tmp_path) as gw:
        assert health(gw)["lazy"]["state"] == "stopped" and not engine_processes(gw.proc.pid).get("lazy")
        # The first requests start it and wait in the queue; one client gives up while queued.
        waiting = [in_thread(chat, gw.url, "lazy", f"first request {i}") for i in range(2)]
        leaver = in_thread(lambda: _gives_up(gw.url))
        assert wait_until(lambda: health(gw)["lazy"]["queue_depth"] == 3, 5), health(gw)["lazy"]
        assert health(gw)["lazy"]["state"] == "starting"
        full = chat(gw.url, "lazy", "overflow")
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full" and full.json()["error"]["type"] == "rate_limit_error"
        leaver[0].join(5)
        assert leaver[1] == ["left"]
        assert wait_until(lambda: health(gw)["lazy"]["queue_depth"] == 2, 10)
        for thread, result in waiting:
            thread.join(20)
            assert result and result[0].status_code == 200, result
        sent = [r["body"]["messages"][0]["content"] for r in records(lazy_rec)]
        assert sorted(sent) == ["first request 0", "first request 1"]  # the leaver never reached it
        models = httpx.get(gw.url + "/v1/models", timeout=5).json()["data"]
        assert {m["id"]: m["state"] for m in models}["lazy"] == "ready"

        # Per-model concurrency: the second stream waits for the first one's slot.
        bodies: list[bytes] = []
        first = in_thread(stream, gw.url, "limited", 8, bodies)
        assert wait_until(lambda: len(records(limited_rec)) == 1, 5)
        second = in_thread(stream, gw.url, "limited", 2, bodies)
        assert wait_until(lambda: health(gw)["limited"]["queue_depth"] == 1, 3)
        first[0].join(10)
        second[0].join(10)
        assert len(bodies) == 2 and all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
        starts = [r["ts"] for r in records(limited_rec)]
        assert starts[1] - starts[0] >= 0.6  # 8 tokens at 0.1 s went first

        # Unused for idle_timeout: drained, stopped, its processes gone (its GPU free).
        assert wait_until(lambda: health(gw)["lazy"]["state"] == "stopped", 8), health(gw)["lazy"]
        assert wait_until(lambda: not engine_processes(gw.proc.pid).get("lazy"), 3)
        assert health(gw)["lazy"]["replicas"][0]["pid"] is None
        assert httpx.get(gw.url + "/ready", timeout=5).status_code == 200


def _gives_up(url: str) -> str:
    try:
        chat(url, "lazy", "I will leave early", timeout=1.0)
    except httpx.TimeoutException:
        return "left"
    return "answered"


def test_swap_drains_the_running_model_before_the_other_starts_and_never_runs_both(tmp_path: Path) -> None:
    recs = {name: tmp_path / f"{name}.jsonl" for name in ("a", "b")}
    config = {
        "server": {"queue_timeout": 20},
        # The drain's mechanics, without the anti-thrash policy (test_swap_policy.py): swap on arrival.
        "swap": {"min_residency": 0, "max_wait": 0, "linger": 0, "round_trip": False},
        "models": {
            name: model(
                load="on_demand", gpus=[0], env={"STANDIN_FAULTS": "token-interval=0.1", "STANDIN_RECORD": str(rec)}
            )
            for name, rec in recs.items()
        },
    }
    with run_gateway(config, tmp_path) as gw:
        overlap = Overlap(gw.proc.pid, {"a", "b"})
        try:
            assert chat(gw.url, "a").status_code == 200
            bodies: list[bytes] = []
            streaming = threading.Event()
            a_stream = in_thread(stream, gw.url, "a", 15, bodies, streaming.set)
            assert streaming.wait(5)
            b_call = in_thread(chat, gw.url, "b", "for b")
            assert wait_until(lambda: health(gw)["a"]["state"] == "draining", 3), health(gw)
            a_again = in_thread(chat, gw.url, "a", "a again")  # a is draining: this one queues
            a_stream[0].join(10)
            stream_done = time.time()
            assert bodies and bodies[0].endswith(b"data: [DONE]\n\n") and bodies[0].count(b'"content"') >= 15
            b_call[0].join(20)
            assert b_call[1][0].status_code == 200
            assert records(recs["b"], "start")[0]["ts"] >= stream_done - 0.05  # b launched after a's stream ended
            a_again[0].join(20)
            assert a_again[1][0].status_code == 200  # then a swapped back in for its queued request
        finally:
            overlap.close()
        assert not overlap.both, "processes of a and b were alive at the same time"
        assert records(recs["a"])[-1]["body"]["messages"][0]["content"] == "a again"


def test_replicas_share_load_and_a_failing_replica_is_ejected(tmp_path: Path) -> None:
    faults = [tmp_path / f"faults-{i}.json" for i in (0, 1)]
    recs = [tmp_path / f"rec-{i}.jsonl" for i in (0, 1)]
    for f in faults:
        write_faults(f, {"token-interval": 0.2})
    config = {
        "models": {
            "r": model(
                gpus=[[0], [1]],
                affinity=False,  # balanced by in-flight count (test_affinity.py has the other way)
                outlier={"consecutive_failures": 2, "base_ejection_time": 30},
                env={
                    "STANDIN_FAULTS_FILE": str(tmp_path / "faults-{replica}.json"),
                    "STANDIN_RECORD": str(tmp_path / "rec-{replica}.jsonl"),
                },
            )
        }
    }
    with run_gateway(config, tmp_path) as gw:
        assert wait_until(lambda: [x["state"] for x in health(gw)["r"]["replicas"]] == ["ready", "ready"], 10)
        assert [x["gpus"] for x in health(gw)["r"]["replicas"]] == [[0], [1]]
        bodies: list[bytes] = []
        threads = [in_thread(stream, gw.url, "r", 4, bodies)[0] for _ in range(4)]
        for thread in threads:
            thread.join(10)
        assert len(bodies) == 4
        assert [len(records(rec)) for rec in recs] == [2, 2]  # by in-flight count: two each

        write_faults(faults[0], {})
        write_faults(faults[1], {"status": 500})
        statuses = [chat(gw.url, "r").status_code for _ in range(4)]
        assert statuses.count(500) == 2  # replica 1 failed twice in a row: ejected
        assert health(gw)["r"]["replicas"][1]["ejected"] is True
        before = len(records(recs[1]))
        assert all(chat(gw.url, "r").status_code == 200 for _ in range(6))
        assert len(records(recs[1])) == before  # no traffic to the ejected replica


def test_reload_adds_removes_and_keeps_serving_then_sighup(tmp_path: Path) -> None:
    models = {"keep": model(env={"STANDIN_FAULTS": "token-interval=0.15"}), "old": model()}
    with run_gateway({"server": {"retry_after": 1}, "models": models}, tmp_path) as gw:
        path = tmp_path / f"gateway-{gw.port}.yaml"
        base = yaml.safe_load(path.read_text())
        keep_pid = health(gw)["keep"]["replicas"][0]["pid"]
        old_pids = engine_processes(gw.proc.pid)["old"]
        bodies: list[bytes] = []
        streaming = threading.Event()
        long_stream = in_thread(stream, gw.url, "keep", 15, bodies, streaming.set)
        assert streaming.wait(5)

        changed = {
            **base,
            "server": {**base["server"], "retry_after": 3},
            "models": {"keep": base["models"]["keep"], "new": model()},
        }
        path.write_text(yaml.safe_dump(changed))
        answer = httpx.post(gw.url + "/admin/reload", timeout=10)
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert (report["added"], report["removed"], report["changed"], report["unchanged"]) == (
            ["new"],
            ["old"],
            [],
            ["keep"],
        )
        assert report["restart_required"] == ["server"] and "restart" in report["message"]

        long_stream[0].join(10)
        assert bodies and bodies[0].endswith(b"data: [DONE]\n\n")  # the untouched model never noticed
        assert health(gw)["keep"]["replicas"][0]["pid"] == keep_pid
        assert wait_until(lambda: chat(gw.url, "new").status_code == 200, 10)
        assert chat(gw.url, "old").status_code == 404
        assert wait_until(lambda: not (old_pids & engine_processes(gw.proc.pid).get("old", set())), 5)
        assert httpx.get(gw.url + "/ready", timeout=5).status_code == 200

        path.write_text("models: {broken: {engine: nope}}")
        refused = httpx.post(gw.url + "/admin/reload", timeout=10)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_config"
        assert "models.broken.engine" in refused.json()["error"]["message"]
        assert chat(gw.url, "new").status_code == 200  # nothing changed

        # SIGHUP: "new" changes (restarted with its new spec), "keep" again untouched.
        new_pid = health(gw)["new"]["replicas"][0]["pid"]
        respec = {"keep": changed["models"]["keep"], "new": model(env={"STANDIN_FAULTS": "token-interval=0.01"})}
        path.write_text(yaml.safe_dump({**changed, "models": respec}))
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: health(gw)["new"]["replicas"][0]["pid"] not in (None, new_pid), 10)
        assert wait_until(lambda: chat(gw.url, "new").status_code == 200, 10)
        assert health(gw)["keep"]["replicas"][0]["pid"] == keep_pid and gw.proc.poll() is None
        assert "config reloaded" in gw.log() and "changed ('new',)" in gw.log()


def test_a_refused_connection_fails_over_to_another_replica_once(tmp_path: Path) -> None:
    """C8: nothing reached the engine, so the gateway may send it elsewhere; with nowhere else, 503."""
    faults = [tmp_path / f"faults-{i}.json" for i in (0, 1)]
    recs = [tmp_path / f"rec-{i}.jsonl" for i in (0, 1)]
    for f in faults:
        write_faults(f, {})
    # Probes a minute apart: the refusing replica stays "ready" for the whole test, as in the gap before a
    # probe notices a listener gone.
    config = {
        "models": {
            "r": model(
                gpus=[[0], [1]],
                affinity=False,  # round robin between idle replicas: the refusing one is asked first
                health={"interval": 60, "startup_interval": 0.1},
                outlier={"consecutive_failures": 100},
                env={
                    "STANDIN_FAULTS_FILE": str(tmp_path / "faults-{replica}.json"),
                    "STANDIN_RECORD": str(tmp_path / "rec-{replica}.jsonl"),
                },
            )
        }
    }
    with run_gateway(config, tmp_path) as gw:
        assert wait_until(lambda: [x["state"] for x in health(gw)["r"]["replicas"]] == ["ready", "ready"], 10)
        write_faults(faults[0], {"refuse-connections": True})
        while not records(recs[0]):  # round robin: replica 0 answers one more, then stops listening
            assert chat(gw.url, "r").status_code == 200
        served = [len(records(rec)) for rec in recs]
        statuses = [chat(gw.url, "r").status_code for _ in range(6)]
        assert statuses == [200] * 6  # the first was refused by replica 0 and sent to replica 1
        assert [len(records(rec)) for rec in recs] == [served[0], served[1] + 6]  # each sent once
        # The refusal asked for a probe at once (not a minute later): replica 0 is out of rotation.
        assert wait_until(lambda: health(gw)["r"]["replicas"][0]["state"] == "unhealthy", 10)

        write_faults(faults[1], {"refuse-connections": True})
        assert chat(gw.url, "r").status_code == 200  # replica 1's last answer
        refused = chat(gw.url, "r")  # both refuse: one failover, then the error
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "engine_unavailable"
    assert "refused the connection; sent to replica 1" in gw.log()


def test_an_engine_healthy_to_its_probe_but_failing_every_request_is_restarted(tmp_path: Path) -> None:
    """B3: /health says 200, yet every answer is a 500 (then: never comes). Real traffic is the evidence."""
    faults = tmp_path / "faults.json"
    write_faults(faults, {"health": "ok-but-broken"})
    config = {
        "server": {"first_byte_timeout": 1},
        "models": {
            "m": model(
                outlier={"restart_after": 3},
                env={"STANDIN_FAULTS_FILE": str(faults)},
                restart={"initial_delay": 0.1, "jitter": 0},
            )
        },
    }
    with run_gateway(config, tmp_path) as gw:
        first = health(gw)["m"]["replicas"][0]
        assert [chat(gw.url, "m").status_code for _ in range(3)] == [500] * 3
        write_faults(faults, {"health": "ok-but-broken:hang"})  # what the next launch will do
        assert wait_until(
            lambda: (
                health(gw)["m"]["replicas"][0]["pid"] not in (None, first["pid"])
                and health(gw)["m"]["state"] == "ready"
            ),
            15,
        )
        second = health(gw)["m"]["replicas"][0]
        assert second["restarts"] == first["restarts"] + 1
        assert [chat(gw.url, "m").status_code for _ in range(3)] == [504] * 3  # hangs end at the first-byte clock
        write_faults(faults, {})
        assert wait_until(
            lambda: (
                health(gw)["m"]["replicas"][0]["pid"] not in (None, second["pid"])
                and health(gw)["m"]["state"] == "ready"
            ),
            15,
        )
        assert chat(gw.url, "m").status_code == 200
    assert "3 requests in a row failed while its health check passed" in gw.log()


def test_an_engine_4xx_is_passed_through_once_and_not_held_against_the_replica(tmp_path: Path) -> None:
    """C7: a 400 is the client's fault. With one failure enough to eject a replica, a 400 counted as a
    failure would take one out of rotation; the positive control at the end shows that it would show."""
    faults = [tmp_path / f"faults-{i}.json" for i in (0, 1)]
    recs = [tmp_path / f"rec-{i}.jsonl" for i in (0, 1)]
    for f in faults:
        write_faults(f, {"status": 400})
    config = {
        "models": {
            "r": model(
                gpus=[[0], [1]],
                outlier={"consecutive_failures": 1, "base_ejection_time": 60},
                env={
                    "STANDIN_FAULTS_FILE": str(tmp_path / "faults-{replica}.json"),
                    "STANDIN_RECORD": str(tmp_path / "rec-{replica}.jsonl"),
                },
            )
        }
    }
    with run_gateway(config, tmp_path) as gw:
        assert wait_until(lambda: [x["state"] for x in health(gw)["r"]["replicas"]] == ["ready", "ready"], 10)
        ids = [f"c7-{i}" for i in range(4)]
        for request_id in ids:
            response = httpx.post(
                gw.url + "/v1/chat/completions",
                headers={"x-request-id": request_id},
                timeout=20,
                json={"model": "r", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert response.status_code == 400
            assert "maximum context length" in response.json()["error"]["message"]  # the engine's own text
        seen = [r["headers"]["x-request-id"] for rec in recs for r in records(rec)]
        assert sorted(seen) == ids  # each request reached an engine exactly once: no retry
        replicas = health(gw)["r"]["replicas"]
        assert [(x["state"], x["ejected"], x["restarts"]) for x in replicas] == [("ready", False, 0)] * 2
        assert "gateway_upstream_errors_total{" not in metrics(gw)

        for f in faults:
            write_faults(f, {"status": 500})
        assert chat(gw.url, "r").status_code == 500
        assert [x["ejected"] for x in health(gw)["r"]["replicas"]].count(True) == 1
        assert "gateway_upstream_errors_total{" in metrics(gw)


def metrics(gw: Gateway) -> str:
    return httpx.get(gw.url + "/metrics", timeout=5).text


def test_a_drain_refuses_the_requests_waiting_for_a_model_at_once(tmp_path: Path) -> None:
    """SIGTERM while a request waits for an on-demand model that takes 60 s to load: it gets its 503 (retry
    elsewhere) at once, not after its 60 s queue_timeout, and the gateway stops without waiting for the load."""
    config = {
        "server": {"queue_timeout": 60, "drain_timeout": 60},
        "models": {"slow": model(load="on_demand", env={"STANDIN_FAULTS": "startup-delay=60"})},
    }
    with run_gateway(config, tmp_path) as gw:
        thread, result = in_thread(chat, gw.url, "slow")
        assert wait_until(lambda: health(gw)["slow"]["queue_depth"] == 1, 10)
        gw.proc.send_signal(signal.SIGTERM)
        thread.join(20)
        assert not thread.is_alive() and result
        response = result[0]
        assert response.status_code == 503 and response.json()["error"]["code"] == "server_shutting_down"
        assert response.headers["connection"] == "close"
        assert gw.proc.wait(20) in (0, -signal.SIGTERM)
