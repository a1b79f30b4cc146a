"""The admin API and /gpu/status against a real gateway process with a stand-in vLLM, API keys configured.

One gateway serves the module; the lifecycle test runs last and leaves the engine ready again.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from tests.helpers import Gateway, run_gateway, standin_command, wait_until

OPS = {"authorization": "Bearer sk-ops-12345678"}
APP = {"authorization": "Bearer sk-app-12345678"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = {
        "auth": {
            "api_keys": [
                {"name": "ops", "key": "sk-ops-12345678", "permissions": ["all"]},
                {"name": "app", "key": "sk-app-12345678", "permissions": ["chat", "models"]},
            ]
        },
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/chat-model",
                "command": standin_command("vllm"),
                "gpus": [0],
                # vLLM prints its non-default args, this key among them: the admin log must not show it.
                "args": {"api-key": "sk-engine-secret"},
                "api_key_env": "ADMIN_TEST_ENGINE_KEY",
                "health": {"interval": 0.5, "startup_interval": 0.1},
                "stop_grace": 3,
            }
        },
    }
    with run_gateway(
        config, tmp_path_factory.mktemp("admin"), ready_timeout=20, env={"ADMIN_TEST_ENGINE_KEY": "sk-engine-secret"}
    ) as gw:
        yield gw


def get(gw: Gateway, path: str, **kw: Any) -> httpx.Response:
    return httpx.get(gw.url + path, headers=kw.pop("headers", OPS), timeout=10, **kw)


def post(gw: Gateway, path: str, **kw: Any) -> httpx.Response:
    return httpx.post(gw.url + path, headers=kw.pop("headers", OPS), timeout=15, **kw)


def engine(gw: Gateway) -> dict[str, Any]:
    rows: list[dict[str, Any]] = get(gw, "/admin/engines").json()["data"]
    assert len(rows) == 1
    return rows[0]


def ready(gw: Gateway) -> bool:
    return httpx.get(gw.url + "/ready", timeout=2).status_code == 200


def admin_requests(gw: Gateway) -> float:
    """Finished admin requests (the middleware counts a request when its response has ended)."""
    text = get(gw, "/metrics").text
    found = re.search(r'^gateway_requests_total\{endpoint="admin",model="",status="200"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/engines"),
        ("GET", "/admin/engines/chat/logs"),
        ("POST", "/admin/engines/chat/stop"),
        ("GET", "/gpu/status"),
    ],
)
def test_admin_needs_the_admin_permission(gateway: Gateway, method: str, path: str) -> None:
    bare = httpx.request(method, gateway.url + path, timeout=5)
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"
    as_app = httpx.request(method, gateway.url + path, headers=APP, timeout=5)
    assert as_app.status_code == 403 and as_app.json()["error"]["code"] == "permission_denied"
    assert as_app.headers["x-request-id"]
    assert ready(gateway)  # the refused stop did nothing


def test_list_engines(gateway: Gateway) -> None:
    row = engine(gateway)
    assert row["model"] == "chat" and row["replica"] == 0 and row["engine"] == "vllm"
    assert row["state"] == "ready" and row["launches"] == 1 and row["restarts"] == 0
    assert row["pid"] > 0 and row["engine_pid"] > 0 and row["port"] > 0 and row["gpus"] == [0]
    assert "serve" in row["argv"] and "org/chat-model" in row["argv"]
    assert "sk-engine-secret" not in json.dumps(row) and "***" in row["argv"]
    assert get(gateway, "/admin/engines/chat").json()["data"] == [row]


def test_unknown_model_or_replica_is_404(gateway: Gateway) -> None:
    for response in (
        post(gateway, "/admin/engines/nope/restart"),
        get(gateway, "/admin/engines/nope/logs"),
        get(gateway, "/admin/engines/nope"),
    ):
        assert response.status_code == 404
        assert response.json()["error"] == {
            "message": "The model 'nope' does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    missing = post(gateway, "/admin/engines/chat/stop", params={"replica": 3})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "replica_not_found"
    assert get(gateway, "/admin/engines/chat/logs", params={"tail": -1}).status_code == 400
    assert ready(gateway)


def test_logs_tail_has_the_engine_startup_lines(gateway: Gateway) -> None:
    body = get(gateway, "/admin/engines/chat/logs", params={"tail": 500}).json()
    assert body["model"] == "chat"
    (replica,) = body["data"]
    text = "\n".join(replica["lines"])
    assert "[gateway] launch 1:" in text and "vLLM API server version" in text
    assert "sk-engine-secret" not in text and "'api_key': ['***']" in text
    assert replica["total_lines"] >= len(replica["lines"])
    two = get(gateway, "/admin/engines/chat/logs", params={"tail": 2}).json()["data"][0]["lines"]
    assert len(two) == 2


def settled_admin_requests(gw: Gateway) -> float:
    """The count once the requests before it have been counted (that happens just after their last byte)."""
    last = admin_requests(gw)
    for _ in range(20):
        time.sleep(0.1)
        now = admin_requests(gw)
        if now == last:
            return now
        last = now
    raise AssertionError("the admin request count does not settle")


def test_logs_follow_streams_new_lines_and_ends_on_disconnect(gateway: Gateway) -> None:
    before = settled_admin_requests(gateway)
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    with (
        httpx.Client(headers=OPS, timeout=5) as client,
        client.stream("GET", gateway.url + "/admin/engines/chat/logs", params={"follow": "true", "tail": 3}) as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=APP, timeout=5).status_code == 200
        lines = cast(Generator[str, None, None], stream.iter_lines())  # a generator: it can be closed
        for line in lines:
            if line.startswith("data: "):
                seen.append(json.loads(line[len("data: ") :]))
            if any("POST /v1/chat/completions" in e["line"] for e in seen) or time.monotonic() > deadline:
                break
        # Still open: the follow counts as finished only once it ends.
        assert admin_requests(gateway) == before
        lines.close()  # leaving the line iterator drops the connection (httpx closes an abandoned stream)
    assert len(seen) >= 4 and all(e["replica"] == 0 for e in seen)
    assert not any("sk-engine-secret" in e["line"] for e in seen)
    assert "sk-engine-secret" not in gateway.log()  # scrubbed at the pipe: the gateway's own log is clean too
    assert any("POST /v1/chat/completions" in e["line"] for e in seen[3:]), seen
    # The client left: the gateway ends the stream (and unsubscribes) although the engine keeps logging.
    assert wait_until(lambda: admin_requests(gateway) == before + 1, 5)


def test_gpu_status_answers_with_or_without_gpus(gateway: Gateway) -> None:
    body = get(gateway, "/gpu/status").json()
    assert body["count"] == len(body["gpus"])
    if not body["gpus"]:
        assert body["reason"]  # this machine has no GPU or driver: the empty answer says why
    else:
        assert {"index", "name", "memory_total_bytes", "memory_used_bytes", "engines"} <= set(body["gpus"][0])


def test_stop_start_restart(gateway: Gateway) -> None:
    first = engine(gateway)

    stopped = post(gateway, "/admin/engines/chat/stop")
    assert stopped.status_code == 200
    assert stopped.json()["action"] == "stop"
    assert stopped.json()["data"][0]["state"] == "stopped" and stopped.json()["data"][0]["pid"] is None
    assert httpx.get(gateway.url + "/ready", timeout=2).status_code == 503
    refused = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=APP, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
    assert "retry-after" in refused.headers

    started = post(gateway, "/admin/engines/chat/start")
    assert started.status_code == 200 and started.json()["data"][0]["state"] in ("starting", "ready")
    assert wait_until(lambda: ready(gateway), 15)
    second = engine(gateway)
    assert second["pid"] != first["pid"] and second["launches"] == first["launches"] + 1

    restarted = post(gateway, "/admin/engines/chat/restart", params={"replica": 0})
    assert restarted.status_code == 200
    assert wait_until(lambda: ready(gateway), 15)
    third = engine(gateway)
    assert third["state"] == "ready" and third["pid"] != second["pid"]
    assert third["launches"] == second["launches"] + 1 and third["restarts"] == 0  # commanded, not a crash
    assert httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=APP, timeout=5).status_code == 200
    assert len(gateway.engine_pids()) >= 1


def test_an_open_follow_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    config = {
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/chat-model",
                "command": standin_command("vllm"),
                "health": {"interval": 0.5, "startup_interval": 0.1},
                "stop_grace": 3,
            }
        },
        "server": {"drain_timeout": 60},
    }
    with (
        run_gateway(config, tmp_path, ready_timeout=20) as gw,
        httpx.stream("GET", gw.url + "/admin/engines/chat/logs", params={"follow": "true"}, timeout=5) as stream,
    ):
        assert stream.status_code == 200
        gw.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for _ in stream.iter_lines():  # engine lines keep coming until shutdown ends the stream
            assert time.monotonic() - started < 30, "the follow held the 60 s drain open"
        assert gw.proc.wait(10) == 0


def test_probes_answer_everyone_but_only_an_admin_key_sees_the_engines(gateway: Gateway) -> None:
    for headers in ({}, APP, {"authorization": "Bearer sk-wrong"}):
        response = httpx.get(gateway.url + "/health", headers=headers, timeout=5)
        assert response.status_code == 200  # a load balancer or a kubelet probes without a key
        body = response.json()
        assert body["status"] == "ok" and body["models_total"] == 1 and body["models_ready"] == 1
        assert "models" not in body and "chat" not in response.text and "pid" not in response.text
        assert httpx.get(gateway.url + "/ready", headers=headers, timeout=5).status_code == 200
    full = httpx.get(gateway.url + "/health", headers=OPS, timeout=5).json()
    assert full["models"]["chat"]["replicas"][0]["pid"] > 0
