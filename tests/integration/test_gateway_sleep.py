"""Sleep and wake through a real gateway (issue 17): the admin actions, and what /ready, /health, /v1/models and
/metrics say of a sleeping model. Two vLLM stand-ins on their own GPUs: one configured to sleep, one not.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import Gateway, run_gateway, standin_model, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = {
        "models": {
            "sleepy": standin_model(gpus=[0], sleep={"level": 1}),
            "plain": standin_model(gpus=[1]),
        }
    }
    with run_gateway(config, tmp_path_factory.mktemp("sleep"), ready_timeout=30) as gw:
        yield gw


def rows(gw: Gateway, model: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = httpx.get(f"{gw.url}/admin/engines/{model}", timeout=10).json()["data"]
    return data


def metric(gw: Gateway, pattern: str) -> float | None:
    found = re.search(pattern, httpx.get(gw.url + "/metrics", timeout=10).text, re.M)
    return float(found.group(1)) if found else None


def test_a_model_put_to_sleep_by_the_admin_api_and_woken(gateway: Gateway) -> None:
    gw = gateway
    answer = httpx.post(gw.url + "/admin/engines/sleepy/sleep", timeout=30)
    assert answer.status_code == 200 and answer.json()["action"] == "sleep"
    assert wait_until(lambda: [r["state"] for r in rows(gw, "sleepy")] == ["sleeping"], 20)
    row = rows(gw, "sleepy")[0]
    assert row["last_error"] is None and row["engine_pid"] is not None  # asleep, its process alive
    assert "--enable-sleep-mode" in row["argv"]
    # a sleeping model is not "not ready": it comes back on its next request
    assert httpx.get(gw.url + "/ready", timeout=5).status_code == 200
    card = httpx.get(gw.url + "/v1/models/sleepy", timeout=5).json()
    assert (card["state"], card["loaded"]) == ("sleeping", False)
    health = httpx.get(gw.url + "/health", timeout=5).json()["models"]["sleepy"]
    assert health["state"] == "sleeping" and health["replicas"][0]["state"] == "sleeping"
    state = r'^gateway_engine_state\{model="sleepy",replica="0",state="sleeping"\} (\S+)$'
    assert metric(gw, state) == 1.0
    assert metric(gw, r'^gateway_engine_wake_seconds_count\{model="sleepy"\} (\S+)$') in (None, 0.0)

    answer = httpx.post(gw.url + "/admin/engines/sleepy/wake", timeout=30)
    assert answer.status_code == 200 and answer.json()["action"] == "wake"
    assert wait_until(lambda: [r["state"] for r in rows(gw, "sleepy")] == ["ready"], 20)
    assert metric(gw, r'^gateway_engine_wake_seconds_count\{model="sleepy"\} (\S+)$') == 1.0
    assert rows(gw, "sleepy")[0]["launches"] == 1  # woken, not started again
    chat = {"model": "sleepy", "messages": [{"role": "user", "content": "awake again"}], "max_tokens": 4}
    answer = httpx.post(gw.url + "/v1/chat/completions", json=chat, timeout=30)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "awake again"


def test_a_model_without_sleep_configured_is_a_409(gateway: Gateway) -> None:
    answer = httpx.post(gateway.url + "/admin/engines/plain/sleep", timeout=10)
    assert answer.status_code == 409
    error = answer.json()["error"]
    assert error["code"] == "sleep_unsupported" and error["type"] == "invalid_request_error"
    assert error["message"] == (
        "The model 'plain' cannot be put to sleep: the model 'plain' has no 'sleep:' in its config."
    )
    assert [r["state"] for r in rows(gateway, "plain")] == ["ready"]  # untouched
    assert httpx.post(gateway.url + "/admin/engines/nope/sleep", timeout=10).status_code == 404
