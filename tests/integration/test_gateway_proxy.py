"""The request path end to end: openai SDK → gateway process → stand-in engines, over real sockets.

One gateway serves most of the module (starting engines costs seconds); each test sets the stand-ins'
faults through their faults file and resets it afterwards. Its upstream clocks are short (2 s first byte,
1 s idle), so the client-disconnect tests use a second gateway (``patient``) with long clocks: there, only
the client leaving can make the gateway close an upstream request within the tests' wait.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Gateway, free_port, run_gateway, standin_command, wait_until
from tests.standin.harness import launch, read_records, serve_args, standin_env, write_faults


class Env:
    def __init__(self, gateway: Gateway, faults: Path, record: Path, remote_faults: Path) -> None:
        self.gateway = gateway
        self.faults = faults
        self.record = record
        self.remote_faults = remote_faults
        self._client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-unused", max_retries=0)

    def client(self) -> openai.OpenAI:
        return self._client

    def close(self) -> None:
        self._client.close()

    def set_faults(self, **faults: Any) -> None:
        write_faults(self.faults, faults)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return read_records(self.record, kind)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("proxy")
    faults, record, remote_faults = tmp / "faults.json", tmp / "record.jsonl", tmp / "remote-faults.json"
    write_faults(faults, {})
    write_faults(remote_faults, {})
    remote_port = free_port()
    remote = launch(
        "vllm",
        serve_args("vllm", remote_port, "upstream-name"),
        env=standin_env(faults_file=remote_faults),
        port=remote_port,
    )
    engine_env = {"STANDIN_FAULTS_FILE": str(faults), "STANDIN_RECORD": str(record)}
    config = {
        "server": {
            "first_byte_timeout": 2,
            "idle_timeout": 1,
            "total_timeout": 6,
            "max_body_bytes": 1_000_000,
            "retry_after": 2,
            "queue_timeout": 1,
        },
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/chat-model",
                "aliases": ["gpt-4o-mini"],
                "display_name": "Chat",
                "command": standin_command("vllm"),
                "env": engine_env,
                "health": {"interval": 0.5, "startup_interval": 0.1},
                "stop_grace": 3,
            },
            "vl": {
                "engine": "lmdeploy",
                "model": "org/vl-model",
                "command": standin_command("lmdeploy"),
                "env": engine_env,
                "health": {"interval": 0.5, "startup_interval": 0.1},
                "stop_grace": 3,
            },
            "remote": {
                "engine": "openai",
                "url": f"http://127.0.0.1:{remote_port}/v1",
                "model": "upstream-name",
                "health": {"interval": 0.5, "startup_interval": 0.1},
            },
            "down": {"engine": "openai", "url": f"http://127.0.0.1:{free_port()}/v1", "load": "on_demand"},
            # Never asked for by name in this module: a request that launched it would show in its `launches`
            # (E1). On demand costs nothing at start-up and does not hold up /ready.
            "lazy": {
                "engine": "vllm",
                "model": "org/lazy-model",
                "load": "on_demand",
                "command": standin_command("vllm"),
                "health": {"startup_interval": 0.1},
                "stop_grace": 3,
            },
        },
    }
    try:
        with run_gateway(config, tmp) as gateway:
            env = Env(gateway, faults, record, remote_faults)
            yield env
            env.close()
    finally:
        remote.kill()


@pytest.fixture(autouse=True)
def _reset_faults(env: Env) -> Iterator[None]:
    env.set_faults()
    write_faults(env.remote_faults, {})
    yield
    env.set_faults()


MESSAGES = [{"role": "user", "content": "tell me about gateways"}]


def test_models_list_names_aliases_and_state(env: Env) -> None:
    models = {m.id: m for m in env.client().models.list().data}
    assert {"chat", "gpt-4o-mini", "vl", "remote"} <= set(models)
    card = models["gpt-4o-mini"].model_dump()
    assert card["alias_of"] == "chat" and card["state"] == "ready" and card["loaded"] is True
    assert card["display_name"] == "Chat"
    assert env.client().models.retrieve("vl").id == "vl"
    with pytest.raises(openai.NotFoundError):
        env.client().models.retrieve("nope")


@pytest.mark.parametrize("model", ["chat", "gpt-4o-mini", "vl", "remote"])
def test_chat_non_stream_through_names_and_aliases(env: Env, model: str) -> None:
    reply = env.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=5)
    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 5
    # The client sees the name it can use again, never the engine's internal name.
    assert reply.model in ("chat", "vl", "remote")


@pytest.mark.parametrize("model", ["gpt-4o-mini", "vl", "remote"])
def test_chat_stream_with_usage(env: Env, model: str) -> None:
    stream = env.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 4


def test_completions_embeddings_rerank(env: Env) -> None:
    client = env.client()
    completion = client.completions.create(model="chat", prompt="once upon", max_tokens=3)
    assert completion.choices[0].text
    streamed = list(client.completions.create(model="chat", prompt="once upon", max_tokens=3, stream=True))
    assert any(c.choices and c.choices[0].text for c in streamed)
    embedding = client.embeddings.create(model="gpt-4o-mini", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) > 0
    rerank = httpx.post(
        env.gateway.url + "/v1/rerank", json={"model": "chat", "query": "q", "documents": ["a", "b", "c"]}, timeout=5
    )
    assert rerank.status_code == 200 and len(rerank.json()["results"]) == 3
    # LMDeploy refuses embeddings: its flat 400 keeps its status and message, in our shape.
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="vl", input="a")
    assert "Unsupported" in info.value.message


def test_request_id_both_ways_and_client_auth_not_forwarded(env: Env) -> None:
    response = httpx.post(
        env.gateway.url + "/v1/chat/completions",
        json={"model": "chat", "messages": MESSAGES, "max_tokens": 1, "api_base": "http://evil"},
        headers={"x-request-id": "req-abc.123", "authorization": "Bearer sk-client-secret"},
        timeout=5,
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-abc.123"
    seen = [r for r in env.events("request") if r["path"] == "/v1/chat/completions"][-1]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-request-id"] == "req-abc.123"
    assert "authorization" not in headers
    assert "api_base" not in seen["body"] and seen["body"]["model"] == "chat"
    generated = httpx.get(env.gateway.url + "/health", timeout=5).headers["x-request-id"]
    assert len(generated) == 24


@pytest.mark.parametrize("stream", [False, True], ids=["aiohttp", "spliced-stream"])
def test_hop_by_hop_headers_and_client_credentials_are_not_forwarded(env: Env, stream: bool) -> None:
    """G6, outbound: the request to the engine is built anew (a non-stream goes through aiohttp, a stream
    through gateway/proxy/upstream/raw.py's own request bytes); none of the client's hop-by-hop headers, the header its
    ``Connection`` names, or its credentials may reach the engine."""
    request_id = f"g6-hop-by-hop-{stream}"
    sent = {
        "Connection": "x-foo",
        "X-Foo": "bar-g6",
        "TE": "trailers",
        "Keep-Alive": "5",
        "Proxy-Authorization": "Basic proxy-secret-g6",
        "Authorization": "Bearer client-key-g6",
    }
    body = json.dumps({"model": "chat", "messages": MESSAGES, "max_tokens": 2, "stream": stream}).encode()
    # http.client sends exactly these headers (plus Host): httpx would add or merge its own Connection.
    conn = http.client.HTTPConnection("127.0.0.1", env.gateway.port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        for name, value in {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "X-Request-Id": request_id,
            **sent,
        }.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        answer = response.read()
    finally:
        conn.close()
    assert response.status == 200, answer
    if stream:
        assert answer.rstrip().endswith(b"data: [DONE]")
    seen = [r for r in env.events("request") if r["headers"].get("x-request-id") == request_id]
    assert len(seen) == 1
    raw = [(name.lower(), value) for name, value in seen[0]["raw_headers"]]  # every header line, repeats kept
    names = {name for name, _ in raw}
    assert not names & {"x-foo", "te", "keep-alive", "proxy-authorization", "authorization"}, raw
    assert all("x-foo" not in value.lower() for name, value in raw if name == "connection"), raw
    values = " ".join(value for _, value in raw)
    for secret in ("bar-g6", "trailers", "proxy-secret-g6", "client-key-g6"):
        assert secret not in values, raw


def test_stream_cut_by_engine_ends_with_error_event_and_no_done(env: Env) -> None:
    # An earlier test may have left the engine restarting; the counts below must start from a ready one.
    assert wait_until(lambda: replica(env, "chat")["state"] == "ready", 15)
    before = replica(env, "chat")
    cut = metric(env, "gateway_upstream_errors_total", model="chat", kind="disconnected")
    env.set_faults(**{"crash-after-chunks": 3})
    with httpx.stream(
        "POST",
        env.gateway.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "chat", "messages": MESSAGES, "max_tokens": 20, "stream": True},
    ) as r:
        assert r.status_code == 200
        body = b"".join(r.iter_raw())
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 4, body
    assert b"[DONE]" not in body
    error = json.loads(events[-1][len(b"data: ") :])["error"]
    assert error["code"] == "upstream_disconnected" and set(error) == {"message", "type", "param", "code"}
    # The failure is counted against the engine, as a broken upstream (the counter is bumped as the relay ends,
    # just after the last byte went out: hence the wait).
    assert wait_until(
        lambda: metric(env, "gateway_upstream_errors_total", model="chat", kind="disconnected") == cut + 1, 10
    )

    def restarted() -> bool:
        now = replica(env, "chat")
        return now["state"] == "ready" and now["restarts"] == before["restarts"] + 1

    # A new launch, not just /ready: /ready stays 200 until the exit is noticed, so it can pass before.
    assert wait_until(restarted, 15), replica(env, "chat")
    after = replica(env, "chat")
    assert after["pid"] != before["pid"] and after["last_exit_code"] == 1  # the stand-in's os._exit(1)
    # The SDK surfaces it as an error, not as a short, clean answer.
    env.set_faults(**{"close-after-chunks": 2})
    with pytest.raises(openai.APIError):
        list(env.client().chat.completions.create(model="vl", messages=MESSAGES, max_tokens=20, stream=True))


def test_stream_closed_mid_line_forwards_only_whole_events_then_one_error(env: Env) -> None:
    env.set_faults(**{"close-after-chunks": 3})
    cuts = len(env.events("closed-mid-line"))
    with httpx.stream(
        "POST",
        env.gateway.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "chat", "messages": MESSAGES, "max_tokens": 20, "stream": True},
    ) as r:
        assert r.status_code == 200
        body = b"".join(r.iter_raw())
    assert len(env.events("closed-mid-line")) == cuts + 1  # the engine did cut a data: line in half
    assert b"[DONE]" not in body
    # Nothing after the last event separator: the engine's half line was held back, not forwarded.
    assert body.endswith(b"\n\n")
    events = body[:-2].split(b"\n\n")
    assert len(events) == 4, body  # the engine's three whole events, then the gateway's own
    for event in events:
        assert event.startswith(b"data: {") and b"\n" not in event, event  # one complete line each
    parsed = [json.loads(event[len(b"data: ") :]) for event in events]
    assert all("choices" in p and "error" not in p for p in parsed[:-1])
    error = parsed[-1]["error"]
    assert error["code"] == "upstream_disconnected" and set(error) == {"message", "type", "param", "code"}


def replica(env: Env, model: str) -> dict[str, Any]:
    """Replica 0 of ``model`` as ``/health`` shows it (state, pid, restarts, in_flight): this gateway has no
    keys, so ``/health`` gives every caller the detail."""
    return httpx.get(env.gateway.url + "/health", timeout=5).json()["models"][model]["replicas"][0]


def engine_rows(env: Env) -> dict[str, dict[str, Any]]:
    """``/admin/engines`` (open without keys) by model: replica 0 with ``launches`` and ``health_failures``."""
    rows = httpx.get(env.gateway.url + "/admin/engines", timeout=5).json()["data"]
    return {row["model"]: row for row in rows if row["replica"] == 0}


def metric(env: Env, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` in ``/metrics``; 0 when absent (a labelled series appears at
    its first use)."""
    text = httpx.get(env.gateway.url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def assert_let_go(env: Env, model: str, disconnects_before: int) -> None:
    """The gateway hung up on the engine and released what the request held: its fault would have held the
    request open for ever, so a disconnect record means the gateway closed it. The slot (the replica's
    ``in_flight``, what ``max_concurrency`` counts) and the ``gateway_requests_in_flight`` gauge are freed
    as the relay ends, just after the client's last byte: hence the waits."""
    assert wait_until(lambda: len(env.events("disconnect")) > disconnects_before, 10)
    assert wait_until(lambda: metric(env, "gateway_requests_in_flight", model=model) == 0, 10)
    assert wait_until(lambda: replica(env, model)["in_flight"] == 0, 10)


def test_engine_error_event_mid_stream_is_reshaped_without_done(env: Env) -> None:
    env.set_faults(**{"error-after-chunks": 2})
    with httpx.stream(
        "POST",
        env.gateway.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "vl", "messages": MESSAGES, "max_tokens": 20, "stream": True},
    ) as r:
        body = b"".join(r.iter_raw())
    assert b"[DONE]" not in body
    last = [e for e in body.split(b"\n\n") if e][-1]
    assert set(json.loads(last[len(b"data: ") :])["error"]) == {"message", "type", "param", "code"}


def _leave_mid_stream(env: Env, request_id: str) -> None:
    """Start a 200-token stream (40 s at the engine's pace) and hang up after two events."""
    with socket.create_connection(("127.0.0.1", env.gateway.port)) as sock:
        body = json.dumps({"model": "chat", "messages": MESSAGES, "max_tokens": 200, "stream": True}).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (request_id.encode(), len(body), body)
        )
        received = b""
        while received.count(b"data: ") < 2:
            received += sock.recv(65536)


def test_client_disconnect_closes_upstream(env: Env) -> None:
    env.set_faults(**{"token-interval": 0.2, "record-disconnects": True})
    assert wait_until(lambda: replica(env, "chat")["state"] == "ready", 15)
    before = replica(env, "chat")
    left = metric(env, "gateway_requests_total", model="chat", endpoint="chat", status="499")
    gone = metric(env, "gateway_upstream_errors_total", model="chat", kind="client_disconnected")
    broken = metric(env, "gateway_upstream_errors_total", model="chat", kind="disconnected")
    disconnects = len(env.events("disconnect"))
    _leave_mid_stream(env, "d1-leaves-mid-stream")
    # The engine would stream for 40 s more; it sees the gateway hang up long before, and the request's slot
    # and in-flight count are given back.
    assert_let_go(env, "chat", disconnects)
    # Counted as the client's leaving (499), not as an engine failure.
    assert wait_until(
        lambda: metric(env, "gateway_requests_total", model="chat", endpoint="chat", status="499") == left + 1, 10
    )
    assert metric(env, "gateway_upstream_errors_total", model="chat", kind="client_disconnected") == gone + 1
    assert metric(env, "gateway_upstream_errors_total", model="chat", kind="disconnected") == broken
    # Nor is the engine held responsible: still the same ready launch, not ejected, its probes passing.
    after = replica(env, "chat")
    assert after["state"] == "ready" and not after["ejected"]
    assert (after["pid"], after["restarts"]) == (before["pid"], before["restarts"])
    assert engine_rows(env)["chat"]["health_failures"] == 0


def test_client_disconnect_mid_stream_is_logged_as_499(env: Env) -> None:
    """D1 "gateway logs 499": a line of that request (its id in brackets, the text format's request_id field)
    that says the client left."""
    env.set_faults(**{"token-interval": 0.2})
    request_id = "d1-logged-499"
    disconnects = len(env.events("disconnect"))
    _leave_mid_stream(env, request_id)
    assert wait_until(lambda: len(env.events("disconnect")) > disconnects, 10)

    def logged() -> bool:
        lines = [line for line in env.gateway.log().splitlines() if f"[{request_id}]" in line]
        return any("499" in line or "client_disconnected" in line or "client disconnected" in line for line in lines)

    # Logging happens as the relay ends, right after the engine was let go: 2 s is plenty.
    assert wait_until(logged, 2), env.gateway.log()[-3000:]


@dataclass
class Patient:
    """A gateway whose upstream clocks are far longer than any test here waits: only a client leaving can make
    it close an upstream request early. The engine takes 60 s to its first token."""

    gateway: Gateway
    record: Path

    def disconnects(self) -> int:
        if not self.record.exists():
            return 0
        return sum(
            json.loads(line)["event"] == "disconnect" for line in self.record.read_text().splitlines() if line.strip()
        )


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Patient]:
    tmp = tmp_path_factory.mktemp("patient")
    record = tmp / "record.jsonl"
    config = {
        "server": {"first_byte_timeout": 120, "idle_timeout": 120, "total_timeout": 300},
        "models": {
            "slow": {
                "engine": "vllm",
                "model": "org/slow",
                "command": standin_command("vllm"),
                "env": {"STANDIN_FAULTS": "first-token-delay=60,record-disconnects", "STANDIN_RECORD": str(record)},
                "health": {"interval": 0.5, "startup_interval": 0.1},
                "stop_grace": 2,
            }
        },
    }
    with run_gateway(config, tmp) as gateway:
        yield Patient(gateway, record)


def test_client_disconnect_during_prefill_of_a_stream_closes_upstream(patient: Patient) -> None:
    before = patient.disconnects()
    with httpx.stream(
        "POST",
        patient.gateway.url + "/v1/chat/completions",
        timeout=httpx.Timeout(5, read=1),
        json={"model": "slow", "messages": MESSAGES, "max_tokens": 3, "stream": True},
    ) as r:
        # The engine sent its headers at once, so the gateway is on its stream path, waiting for the first event.
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        with pytest.raises(httpx.ReadTimeout):
            next(r.iter_raw())
    # The gateway's own clocks would not close it for 120 s, the engine's first token is 60 s away.
    assert wait_until(lambda: patient.disconnects() > before, 10)


def test_client_disconnect_during_prefill_of_a_non_stream_request_closes_upstream(patient: Patient) -> None:
    """D3: the answer would take 60 s; the client leaves after 0.5 s."""
    before = patient.disconnects()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            patient.gateway.url + "/v1/chat/completions",
            timeout=httpx.Timeout(5, read=0.5),
            json={"model": "slow", "messages": MESSAGES, "max_tokens": 3},
        )
    assert wait_until(lambda: patient.disconnects() > before, 10)


def test_hung_upstream_gives_504_at_first_byte_timeout(env: Env) -> None:
    env.set_faults(**{"hang-before-headers": True, "record-disconnects": True})
    disconnects = len(env.events("disconnect"))
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        env.client().chat.completions.create(model="chat", messages=MESSAGES)
    elapsed = time.monotonic() - started
    assert info.value.status_code == 504
    assert info.value.body["code"] == "upstream_timeout"  # type: ignore[index]
    assert "sent nothing for 2 s" in info.value.message  # the first-byte clock, not the 6 s total
    assert elapsed >= 2
    assert_let_go(env, "chat", disconnects)


def test_hung_upstream_stream_gives_504_json_before_any_sse_byte_and_closes_upstream(env: Env) -> None:
    env.set_faults(**{"hang-before-headers": True, "record-disconnects": True})
    disconnects = len(env.events("disconnect"))
    response = httpx.post(
        env.gateway.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "chat", "messages": MESSAGES, "max_tokens": 3, "stream": True},
    )
    # The first-byte clock ran out before the engine sent headers: a plain JSON error, never a 200 SSE
    # stream with an error event in it, so a client's status check catches it.
    assert response.status_code == 504
    assert response.headers["content-type"].startswith("application/json")
    assert not response.content.startswith(b"data:")
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout" and set(error) == {"message", "type", "param", "code"}
    # The engine waits for ever for its client to leave: a record here means the gateway hung up on it.
    assert_let_go(env, "chat", disconnects)


def test_stalled_stream_ends_with_timeout_event(env: Env) -> None:
    env.set_faults(**{"stall-after-chunks": 2, "record-disconnects": True})
    disconnects = len(env.events("disconnect"))
    with httpx.stream(
        "POST",
        env.gateway.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "chat", "messages": MESSAGES, "max_tokens": 20, "stream": True},
    ) as r:
        # While it streams, this request is what the gauge counts: its return to 0 below is this request's.
        assert metric(env, "gateway_requests_in_flight", model="chat") == 1
        body = b"".join(r.iter_raw())
    last = [e for e in body.split(b"\n\n") if e][-1]
    error = json.loads(last[len(b"data: ") :])["error"]
    assert error["code"] == "upstream_timeout" and "silent for more than 1 s" in error["message"]
    assert b"[DONE]" not in body
    # The engine keeps the stalled stream open for ever: only the gateway can have closed it.
    assert_let_go(env, "chat", disconnects)


def test_drip_feed_is_stopped_by_total_deadline(env: Env) -> None:
    env.set_faults(**{"drip": 0.3, "record-disconnects": True})
    disconnects = len(env.events("disconnect"))
    with httpx.stream(
        "POST",
        env.gateway.url + "/v1/chat/completions",
        timeout=15,
        json={"model": "chat", "messages": MESSAGES, "max_tokens": 20, "stream": True},
    ) as r:
        assert metric(env, "gateway_requests_in_flight", model="chat") == 1
        body = b"".join(r.iter_raw())
    # Each byte came within the 1 s idle clock; the 6 s total one ended it.
    assert b"upstream_timeout" in body and b"within 6 s" in body and b"[DONE]" not in body
    # The drip never ends by itself: the engine sees the disconnect only if the gateway closed the upstream.
    assert_let_go(env, "chat", disconnects)


def test_garbage_non_stream_answer_is_502(env: Env) -> None:
    env.set_faults(garbage="html")
    with pytest.raises(openai.APIStatusError) as info:
        env.client().chat.completions.create(model="chat", messages=MESSAGES)
    assert info.value.status_code == 502
    assert "<html" not in info.value.message.lower()


def test_upstream_4xx_passes_through_and_429_keeps_retry_after(env: Env) -> None:
    env.set_faults(status=400)
    with pytest.raises(openai.BadRequestError) as info:
        env.client().chat.completions.create(model="chat", messages=MESSAGES)
    assert info.value.status_code == 400
    env.set_faults(status=429, **{"retry-after": "7"})
    response = httpx.post(
        env.gateway.url + "/v1/chat/completions", timeout=5, json={"model": "chat", "messages": MESSAGES}
    )
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_429_burst_is_passed_back_and_each_request_reaches_the_engine_once(env: Env) -> None:
    """C9: the gateway has no retries, so "no retry storm" means every request reached an engine exactly once."""
    env.set_faults(status=429, **{"retry-after": "7"})
    ids = [f"c9-burst-{i}" for i in range(8)]

    def send(request_id: str) -> httpx.Response:
        return httpx.post(
            env.gateway.url + "/v1/chat/completions",
            timeout=10,
            headers={"x-request-id": request_id},
            json={"model": "chat", "messages": MESSAGES, "max_tokens": 2},
        )

    with ThreadPoolExecutor(len(ids)) as pool:  # at once: a burst, as an overloaded engine would see it
        responses = list(pool.map(send, ids))
    for request_id, response in zip(ids, responses, strict=True):
        assert response.status_code == 429 and response.headers["retry-after"] == "7"
        assert response.headers["x-request-id"] == request_id
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    # The engine records a request before it answers, so every attempt is in the record by now.
    sent = [r["headers"].get("x-request-id") for r in env.events("request") if r["path"] == "/v1/chat/completions"]
    assert {request_id: sent.count(request_id) for request_id in ids} == dict.fromkeys(ids, 1)


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, "invalid_json"),
        (b"[1, 2]", {"content-type": "application/json"}, 400, "invalid_json"),
        (b'{"model": "chat", "messages": []}', {"content-type": "application/json"}, 400, "invalid_request"),
        (
            b'{"messages": [{"role": "user", "content": "x"}]}',
            {"content-type": "application/json"},
            400,
            "missing_model",
        ),
        (
            b'{"model": "chat", "messages": [{"role": "user", "content": "x"}]}',
            {"content-type": "text/plain"},
            400,
            "invalid_content_type",
        ),
        (
            b'{"model": "chat", "n": 1000000, "messages": [{"role": "user", "content": "x"}]}',
            {"content-type": "application/json"},
            400,
            "invalid_request",
        ),
        (
            b'{"model": "../../etc/passwd", "messages": [{"role": "user", "content": "x"}]}',
            {"content-type": "application/json"},
            404,
            "model_not_found",
        ),
        (b"[" * 5000 + b"]" * 5000, {"content-type": "application/json"}, 400, "invalid_json"),
        (
            b'{"model": "chat", "pad": "' + b"x" * 1_100_000 + b'"}',
            {"content-type": "application/json"},
            413,
            "request_too_large",
        ),
    ],
)
def test_bad_input_gets_error_shape(env: Env, content: bytes, headers: dict[str, str], status: int, code: str) -> None:
    response = httpx.post(env.gateway.url + "/v1/chat/completions", content=content, headers=headers, timeout=5)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("model", "status"),
    [
        ("lazy" + "x" * 10_000, 404),  # 10 kB, starting with an on-demand model's name
        ("lazy ", 404),
        ("LAZY", 404),
        ("lazy\u0000", 404),
        ("../lazy", 404),
        (12345, 400),
        (["lazy"], 400),
        ({"name": "lazy"}, 400),
        (True, 400),
        (None, 400),
    ],
    ids=["10kB", "trailing-space", "upper-case", "nul", "path", "number", "list", "object", "bool", "null"],
)
def test_hostile_model_names_are_refused_and_launch_nothing(env: Env, model: Any, status: int) -> None:
    """E1. ``lazy`` is on demand and never asked for by name in this module: a name the gateway matched to it
    loosely would launch it, which its ``launches`` count shows (the positive control is the next test)."""
    launches = {name: row["launches"] for name, row in engine_rows(env).items()}
    response = httpx.post(
        env.gateway.url + "/v1/chat/completions",
        timeout=10,
        json={"model": model, "messages": MESSAGES, "max_tokens": 1},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == "model"
    assert error["type"] == "invalid_request_error"  # OpenAI's type for an unknown model too
    assert len(error["message"]) < 200  # a 10 kB name is not echoed back whole
    assert {name: row["launches"] for name, row in engine_rows(env).items()} == launches
    assert replica(env, "lazy")["state"] == "stopped"


def test_the_on_demand_model_by_its_own_name_is_launched(env: Env) -> None:
    """The positive control of the test above: its exact name does launch ``lazy``, and ``launches`` shows it.
    Stopped again afterwards so the rest of the module runs with the engines it started with."""
    assert engine_rows(env)["lazy"]["launches"] == 0
    try:
        response = httpx.post(
            env.gateway.url + "/v1/chat/completions",
            timeout=10,
            json={"model": "lazy", "messages": MESSAGES, "max_tokens": 1},
        )
        # 503 if the start outlasts this gateway's 1 s queue_timeout; the launch happened either way.
        assert response.status_code in (200, 503), response.text
        assert wait_until(lambda: engine_rows(env)["lazy"]["launches"] == 1, 10)
    finally:
        httpx.post(env.gateway.url + "/admin/engines/lazy/stop", timeout=30)
    assert replica(env, "lazy")["state"] == "stopped"


def test_unknown_route_and_method_get_error_shape(env: Env) -> None:
    for method, path, status in (
        ("GET", "/v1/nothing", 404),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/v1/chat/completions/", 404),
    ):
        response = httpx.request(method, env.gateway.url + path, timeout=5)
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_engine_not_ready_gives_503_with_retry_after(env: Env) -> None:
    response = httpx.post(
        env.gateway.url + "/v1/chat/completions",
        timeout=5,
        json={"model": "down", "messages": MESSAGES, "max_tokens": 1},
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["code"] == "engine_unavailable"  # after queue_timeout, not the client's 5 s


class Canary:
    """Listens on 127.0.0.1 and, where the host has IPv6, [::1] (same port) and counts accepted connections."""

    def __init__(self) -> None:
        self.connections = 0
        self._lock = threading.Lock()
        self._sockets = [socket.create_server(("127.0.0.1", 0))]
        self.port = int(self._sockets[0].getsockname()[1])
        if socket.has_ipv6:
            with contextlib.suppress(OSError):  # no ::1 here: the gateway cannot reach it either
                self._sockets.append(socket.create_server(("::1", self.port), family=socket.AF_INET6))
        for sock in self._sockets:
            sock.settimeout(0.1)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, args=(s,), daemon=True) for s in self._sockets]
        for thread in self._threads:
            thread.start()

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            conn.close()

    def settle(self) -> int:
        """Stop listening and count what is left in the backlog too: a connection the gateway made just
        before it answered must not slip past the check. Safe to call again."""
        if self._stop.is_set():
            return self.connections
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        for sock in self._sockets:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                while True:
                    sock.accept()[0].close()
                    self.connections += 1
            sock.close()
        return self.connections


@pytest.fixture
def canary() -> Iterator[Canary]:
    listener = Canary()
    try:
        yield listener
    finally:
        listener.settle()


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/x.png",
        "http://169.254.169.254/latest",
        "http://[::1]:{port}/",
        "http://localhost:{port}/",
    ],
)
def test_private_image_urls_are_refused_by_default_without_connecting(env: Env, canary: Canary, template: str) -> None:
    """F1 through the gateway: this gateway's config has no ``media:`` block, so the defaults hold."""
    url = template.format(port=canary.port)
    before = len(env.events("request"))
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]
    response = httpx.post(
        env.gateway.url + "/v1/chat/completions",
        timeout=10,
        json={"model": "vl", "messages": messages, "max_tokens": 3},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "image_url_forbidden" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert canary.settle() == 0
    assert len(env.events("request")) == before  # refused before a replica was even chosen


def test_metrics_count_requests_and_tokens(env: Env) -> None:
    env.client().chat.completions.create(model="chat", messages=MESSAGES, max_tokens=2)
    text = httpx.get(env.gateway.url + "/metrics", timeout=5).text
    assert 'gateway_requests_total{endpoint="chat",model="chat",status="200"}' in text
    assert 'gateway_tokens_total{kind="completion",model="chat"}' in text
    assert 'gateway_engine_state{model="chat",replica="0",state="ready"} 1.0' in text
    assert "sk-client-secret" not in text
