"""Swaps through a real gateway and stand-in engines sharing one GPU: the anti-thrash policy, a start whose
waiters all left, priorities in a queue, and sleep instead of stop (engines/scheduling/scheduler.py).

Starts are counted from each engine's STANDIN_RECORD ("start" records: one per launch), what reached an
engine and in which order from its "request" records, and which engine processes exist from /proc.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import chat, run_gateway, wait_until
from tests.helpers import standin_model as model
from tests.standin.harness import read_records

pytestmark = pytest.mark.timeout(90)


def records(path: Path, event: str = "request") -> list[dict[str, Any]]:
    return [r for r in read_records(path) if r.get("event") == event]


def health(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/health", timeout=5).json()["models"])


def test_two_sequential_clients_on_one_gpu_swap_per_residency_not_per_request(tmp_path: Path) -> None:
    """Each client sends its requests one after another to its own model; the models share GPU 0. Swap on
    arrival would start a model for (nearly) every request; with a residency each model serves its client's
    run of requests, then yields once its client pauses."""
    recs = {name: tmp_path / f"{name}.jsonl" for name in ("a", "b")}
    config = {
        "server": {"queue_timeout": 60},
        "swap": {"min_residency": 30, "max_wait": 60, "linger": 1},
        "models": {
            name: model(load="on_demand", gpus=[0], env={"STANDIN_RECORD": str(rec)}) for name, rec in recs.items()
        },
    }
    answers: dict[str, list[int]] = {"a": [], "b": []}

    def client(name: str) -> None:
        for i in range(5):
            answers[name].append(chat(gw.url, name, f"{name} turn {i}", timeout=60).status_code)

    with run_gateway(config, tmp_path) as gw:
        threads = [threading.Thread(target=client, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(80)
        metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    assert answers == {"a": [200] * 5, "b": [200] * 5}
    waited = [line for line in metrics.splitlines() if line.startswith("gateway_queue_wait_seconds_count")]
    assert sum(float(line.split()[-1]) for line in waited) >= 2, waited  # each model's first request waited
    starts = {name: len(records(rec, "start")) for name, rec in recs.items()}
    assert starts == {"a": 1, "b": 1}, starts  # one swap in all, for ten requests


def test_a_start_whose_only_waiter_left_is_cancelled(tmp_path: Path) -> None:
    rec = tmp_path / "slow.jsonl"
    config = {
        "models": {
            "slow": model(
                load="on_demand", gpus=[0], env={"STANDIN_FAULTS": "startup-delay=8", "STANDIN_RECORD": str(rec)}
            )
        },
    }
    with run_gateway(config, tmp_path) as gw:
        with pytest.raises(httpx.TimeoutException):
            chat(gw.url, "slow", "I will not wait", timeout=1.5)
        assert wait_until(lambda: health(gw.url)["slow"]["state"] == "stopped", 20), health(gw.url)["slow"]
        assert wait_until(lambda: not gw.engine_pids(), 10)  # the half-loaded engine is gone
        assert records(rec) == []  # nothing reached it
        assert "abandoned" in gw.log()
        # The next request starts it again, and is answered.
        assert chat(gw.url, "slow", "now I wait", timeout=30).status_code == 200


def test_a_queue_serves_higher_priority_first(tmp_path: Path) -> None:
    rec = tmp_path / "one.jsonl"
    config = {
        "models": {
            "one": model(max_concurrency=1, env={"STANDIN_FAULTS": "token-interval=0.1", "STANDIN_RECORD": str(rec)})
        },
    }
    with run_gateway(config, tmp_path) as gw:
        # The stand-in echoes the prompt: 60 words at 0.1 s a token keep the one slot busy for 6 s.
        busy = threading.Thread(target=chat, args=(gw.url, "one", "first " * 60), kwargs={"max_tokens": 60})
        busy.start()
        assert wait_until(lambda: len(records(rec)) == 1, 5)
        threads = []
        for text, priority in (("low", "-5"), ("normal", None), ("high", "5")):
            headers = {"X-Priority": priority} if priority else {}
            thread = threading.Thread(
                target=lambda t=text, h=headers: httpx.post(
                    gw.url + "/v1/chat/completions",
                    headers=h,
                    timeout=30,
                    json={"model": "one", "messages": [{"role": "user", "content": t}], "max_tokens": 2},
                )
            )
            thread.start()
            threads.append(thread)
            queued = len(threads)
            assert wait_until(lambda: health(gw.url)["one"]["queue_depth"] == queued, 5)  # noqa: B023 (read now)
        for thread in (busy, *threads):
            thread.join(30)
    order = [r["body"]["messages"][0]["content"].strip().split()[0] for r in records(rec)]
    assert order == ["first", "high", "normal", "low"]


def sleepers(tmp_path: Path, names: tuple[str, ...], **swap: Any) -> tuple[dict[str, Any], dict[str, Path]]:
    """Models sharing GPU 0 that sleep (10 GB of host RAM each, as the budget counts it) when swapped out."""
    recs = {name: tmp_path / f"{name}.jsonl" for name in names}
    config = {
        "swap": {"min_residency": 0, "max_wait": 0, "linger": 0, "round_trip": False, **swap},  # on arrival
        "models": {
            name: model(
                load="on_demand",
                gpus=[0],
                sleep={"level": 1, "ram_gb": 10},
                env={"STANDIN_FAULTS": "sleep-delay=0.2,wake-delay=0.2", "STANDIN_RECORD": str(rec)},
            )
            for name, rec in recs.items()
        },
    }
    return config, recs


def test_a_swap_puts_the_resident_to_sleep_and_its_next_request_wakes_it(tmp_path: Path) -> None:
    config, recs = sleepers(tmp_path, ("a", "b"))
    with run_gateway(config, tmp_path) as gw:
        assert chat(gw.url, "a", "one").status_code == 200
        a_pid = health(gw.url)["a"]["replicas"][0]["engine_pid"]
        assert chat(gw.url, "b", "two").status_code == 200  # a went to sleep to make room
        row = health(gw.url)["a"]
        assert row["state"] == "sleeping" and row["replicas"][0]["state"] == "sleeping"
        assert row["replicas"][0]["engine_pid"] == a_pid  # the same process, asleep
        cards = {m["id"]: m for m in httpx.get(gw.url + "/v1/models", timeout=5).json()["data"]}
        assert cards["a"]["state"] == "sleeping" and cards["a"]["loaded"] is False
        assert chat(gw.url, "a", "three").status_code == 200  # woken, not started again
        assert health(gw.url)["a"]["replicas"][0]["engine_pid"] == a_pid
        assert health(gw.url)["b"]["state"] == "sleeping"
    starts = {name: len(records(rec, "start")) for name, rec in recs.items()}
    assert starts == {"a": 1, "b": 1}
    calls = [r["path"] for r in records(recs["a"]) if r["path"] != "/is_sleeping"]  # the supervisor's checks
    assert calls == ["/v1/chat/completions", "/sleep", "/wake_up", "/v1/chat/completions"], calls


def test_the_sleep_budget_stops_the_least_recently_used_sleeper(tmp_path: Path) -> None:
    config, _ = sleepers(tmp_path, ("a", "b", "c"), sleep_ram_gb=15)  # room for one sleeper
    with run_gateway(config, tmp_path) as gw:
        for name in ("a", "b", "c"):
            assert chat(gw.url, name).status_code == 200
        models = health(gw.url)
        assert models["b"]["state"] == "sleeping"  # b slept for c; a, the older sleeper, made room
        assert models["a"]["state"] == "stopped" and models["a"]["replicas"][0]["engine_pid"] is None
        assert "a: stopping (evicted)" in gw.log()
