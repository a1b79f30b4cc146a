"""Real vLLM (the CPU build of 0.32, ``scripts/install-vllm.sh``) launched, supervised and routed to by the gateway.

One gateway serves the whole module (two vLLM servers: a tiny chat model and a tiny LLaVA): each start costs
40-70 s on two cores, so the tests share it, and the fault tests that restart or stop the chat model come
last. What real vLLM does is in docs/real-vllm/README.md; the stand-ins (tests/standin/) imitate it for the
fast suite. Skipped, with the install script's reason, where the CPU build cannot be installed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import VLLM_ENV
from tests.helpers import Gateway, run_gateway, tagged_pids, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(420)]

CHAT, VL = "tiny-chat", "tiny-vl"
START_TIMEOUT = 300  # a cold start (compile caches empty) on two busy cores
MAX_LEN = 2048  # long enough that a stream outlives a client that leaves after a few events


def _png(size: int = 28) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _vllm_model(venv: Path, model: Path, **args: Any) -> dict[str, Any]:
    return {
        "engine": "vllm",
        "model": str(model),
        # nice execs vLLM in place: the pid the gateway holds is the API server's.
        "command": ["nice", "-n", "10", str(venv / "bin" / "vllm")],
        "args": {"max-model-len": MAX_LEN, "dtype": "bfloat16", **args},
        "env": VLLM_ENV,
        "startup_timeout": START_TIMEOUT,
        "health": {"startup_interval": 0.5, "interval": 1},
        "restart": {"initial_delay": 0, "jitter": 0},
        "stop_grace": 5,
    }


@pytest.fixture(scope="module")
def gateway(
    vllm_venv: Path, tiny_chat_model: Path, tiny_vl_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    config = {
        "media": {"allow_private_networks": True},  # the test's image server is on 127.0.0.1
        "models": {
            CHAT: {
                **_vllm_model(
                    vllm_venv,
                    tiny_chat_model,
                    # The gateway adds no tool flags of its own: without these vLLM answers 400 to any `tools`.
                    **{"enable-auto-tool-choice": True, "tool-call-parser": "pythonic"},
                    # Only with this does vLLM log "Aborted request(s) ..." (a client that left mid-stream).
                    **{"enable-log-requests": True},
                ),
                "aliases": ["gpt-4o-mini"],
                # VLLM_SERVER_DEV_MODE=1 and no --enable-sleep-mode (no gpus): vLLM's CPU platform refuses the
                # flag, and its sleep endpoints still pause the engine (freeing nothing: docs/real-vllm).
                "sleep": {"level": 1},
            },
            # vLLM's own LLaVA imports an image processor that needs torchvision (not installable here).
            VL: _vllm_model(vllm_venv, tiny_vl_model, **{"model-impl": "transformers"}),
        },
    }
    with run_gateway(config, tmp_path_factory.mktemp("gw-vllm"), ready_timeout=START_TIMEOUT) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _engine(gw: Gateway, model: str) -> dict[str, Any]:
    rows = httpx.get(f"{gw.url}/admin/engines/{model}", timeout=10).json()["data"]
    assert len(rows) == 1
    return dict(rows[0])


def _engine_log(gw: Gateway, model: str, tail: int = 400) -> list[str]:
    data = httpx.get(f"{gw.url}/admin/engines/{model}/logs", params={"tail": tail}, timeout=10).json()["data"]
    return [str(line) for line in data[0]["lines"]]


def _live(pids: list[int]) -> list[int]:
    """The pids that still run (zombies waiting for PID 1 to reap them are gone for our purpose)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _tree(gw: Gateway) -> dict[int, str]:
    """Every live process the gateway launched (tagged in its environment), with its comm."""
    return {pid: _comm(pid) for pid in _live(gw.engine_pids())}


# ---- serving ----------------------------------------------------------------------------------------------------


def test_ready_and_models(gateway: Gateway, client: openai.OpenAI) -> None:
    assert httpx.get(gateway.url + "/ready", timeout=5).status_code == 200
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
    ids = {m.id for m in client.models.list().data}
    assert {CHAT, VL} <= ids
    tree = _tree(gateway)
    # The process tree the stand-in imitates: API server -> EngineCore -> Worker, per model.
    assert sum(1 for c in tree.values() if c.startswith("VLLM::EngineCor")) == 2, tree
    assert sum(1 for c in tree.values() if c.startswith("VLLM::Worker")) == 2, tree


def test_chat_by_alias_and_stream_with_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=6)  # type: ignore[arg-type]
    assert reply.model == CHAT  # the served name, never the alias or the engine's path
    assert reply.id.startswith("chatcmpl-")
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    assert reply.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            model=CHAT,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.model == CHAT for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stream_by_alias_ends_with_done(gateway: Gateway) -> None:
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        timeout=60,
        json={"model": "gpt-4o-mini", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        assert response.status_code == 200
        body = b"".join(response.iter_raw())
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in body
    events = [json.loads(e[6:]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    assert all(e["model"] == CHAT for e in events)


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="gpt-4o-mini", prompt="once upon a time", max_tokens=5)
    assert reply.model == CHAT
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    chunks = list(client.completions.create(model=CHAT, prompt="once upon a time", max_tokens=5, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_tools_with_the_configured_parser(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    auto = client.chat.completions.create(model=CHAT, messages=messages, tools=tools, max_tokens=8)  # type: ignore[arg-type]
    assert auto.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # "required": vLLM constrains the output to a JSON list of calls (guided decoding). Random weights may
    # never close it (whitespace is valid JSON), so only the answer's shape is checked.
    required = client.chat.completions.create(
        model=CHAT,
        messages=messages,  # type: ignore[arg-type]
        tools=tools,  # type: ignore[arg-type]
        tool_choice="required",
        max_tokens=16,
    )
    assert required.choices[0].finish_reason in ("length", "stop", "tool_calls")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    turn = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    after = client.chat.completions.create(model=CHAT, messages=turn, tools=tools, max_tokens=4)  # type: ignore[arg-type]
    assert after.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_vllm_errors_reach_the_client_in_the_gateway_shape(gateway: Gateway, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as over:
        client.completions.create(model=CHAT, prompt="hello", max_tokens=5000)
    body = over.value.response.json()
    assert over.value.status_code == 400
    assert body["error"]["param"] == "max_tokens", body
    assert f"max_model_len={MAX_LEN}" in body["error"]["message"], body
    assert over.value.response.headers.get("x-request-id")
    # An over-long prompt: vLLM's 400, its message kept.
    long = " ".join(["word"] * (MAX_LEN + 100))
    too_long = httpx.post(
        gateway.url + "/v1/chat/completions",
        timeout=60,
        json={"model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": long}]},
    )
    assert too_long.status_code == 400, too_long.text
    assert too_long.json()["error"]["message"], too_long.text
    # Clamped silently: prompt + max_tokens above the limit is still a 200.
    clamp = client.completions.create(
        model=CHAT, prompt="hello " * 10, max_tokens=MAX_LEN - 2, extra_body={"ignore_eos": True}
    )
    assert clamp.choices[0].finish_reason == "length"
    assert clamp.usage is not None and clamp.usage.total_tokens == MAX_LEN, clamp.usage


def test_x_request_id_reaches_vllm(client: openai.OpenAI) -> None:
    rid = "h6-e2e-" + os.urandom(4).hex()
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_headers={"x-request-id": rid},
    )
    assert raw.headers.get("x-request-id") == rid
    # vLLM names the completion after the request id it was given.
    assert raw.parse().id == f"chatcmpl-{rid}"


def test_images_through_the_gateway(client: openai.OpenAI) -> None:
    png = _png()

    class Images(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/red.png"
        data_url = "data:image/png;base64," + base64.b64encode(_png(64)).decode()
        content: list[Any] = [
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": url}},  # fetched and inlined by the gateway
            {"type": "image_url", "image_url": {"url": data_url}},  # 64 px, resized by vLLM's processor
        ]
        reply = client.chat.completions.create(model=VL, messages=[{"role": "user", "content": content}], max_tokens=3)
        text_only = client.chat.completions.create(
            model=VL, messages=[{"role": "user", "content": "describe"}], max_tokens=3
        )
    finally:
        server.shutdown()
        server.server_close()
    assert reply.usage is not None and text_only.usage is not None
    # Each 28 px image is 4 patch tokens in this model.
    assert reply.usage.prompt_tokens >= text_only.usage.prompt_tokens + 8, (reply.usage, text_only.usage)
    stream = list(
        client.chat.completions.create(
            model=VL,
            messages=[{"role": "user", "content": content[:1] + content[2:]}],
            max_tokens=3,
            stream=True,
        )
    )
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"


# ---- the other dialects vLLM serves natively (issue 16): passed through, not translated -----------------------


def test_responses_api_natively_stream_and_not(client: openai.OpenAI) -> None:
    reply = client.responses.create(model="gpt-4o-mini", input="hello there", max_output_tokens=6)
    assert reply.model == CHAT  # the served name, never the alias or the engine's path
    assert reply.output and reply.output[0].type == "message"
    assert reply.usage is not None and reply.usage.output_tokens == 6
    events = list(client.responses.create(model=CHAT, input="hello there", max_output_tokens=6, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert "response.output_text.delta" in kinds
    final = events[-1].response  # type: ignore[union-attr]
    assert final.model == CHAT and final.usage is not None and final.usage.output_tokens == 6


def test_anthropic_messages_natively_stream_and_not_with_a_tool(gateway: Gateway) -> None:
    import anthropic

    with anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=120) as claude:
        reply = claude.messages.create(
            model="gpt-4o-mini", max_tokens=6, messages=[{"role": "user", "content": "hello there"}]
        )
        assert reply.model == CHAT and reply.type == "message"
        assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 6
        tool = {
            "name": "get_weather",
            "description": "The weather in a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
        with claude.messages.stream(
            model=CHAT, max_tokens=8, tools=[tool], messages=[{"role": "user", "content": "weather in Paris?"}]
        ) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
        assert final.model == CHAT and final.stop_reason in ("max_tokens", "end_turn", "tool_use")
        # vLLM counts prompt tokens for Anthropic clients too, through the gateway's keys and routing.
        counted = claude.messages.count_tokens(model=CHAT, messages=[{"role": "user", "content": "hello there"}])
        assert counted.input_tokens > 0


def test_tokenize_and_detokenize_through_the_gateway(gateway: Gateway) -> None:
    tokens = httpx.post(gateway.url + "/tokenize", json={"model": "gpt-4o-mini", "prompt": "hello there"}, timeout=30)
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert ids and tokens.json()["count"] == len(ids)
    text = httpx.post(gateway.url + "/detokenize", json={"model": CHAT, "tokens": ids}, timeout=30)
    assert text.status_code == 200, text.text
    assert text.json()["prompt"] == "hello there"


def test_an_operator_puts_vllm_to_sleep_and_the_next_request_wakes_it(gateway: Gateway, client: openai.OpenAI) -> None:
    before = _engine(gateway, CHAT)
    asked = httpx.post(f"{gateway.url}/admin/engines/{CHAT}/sleep", timeout=120)
    assert asked.status_code == 200, asked.text
    assert wait_until(
        lambda: httpx.get(gateway.url + "/health", timeout=5).json()["models"][CHAT]["state"] == "sleeping", 60
    )
    row = _engine(gateway, CHAT)
    assert row["state"] == "sleeping" and row["engine_pid"] == before["engine_pid"]  # the same process, asleep
    engine = f"http://127.0.0.1:{row['port']}"
    assert httpx.get(engine + "/is_sleeping", timeout=10).json() == {"is_sleeping": True}  # vLLM's own word
    answer = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "wake up"}], max_tokens=4, temperature=0
    )
    assert answer.choices[0].message.content is not None  # woken for it, then answered
    row = _engine(gateway, CHAT)
    assert (
        row["state"] == "ready" and row["engine_pid"] == before["engine_pid"] and row["restarts"] == before["restarts"]
    )
    assert httpx.get(engine + "/is_sleeping", timeout=10).json() == {"is_sleeping": False}
    assert any("wake up the engine" in line for line in _engine_log(gateway, CHAT))


def test_client_that_leaves_mid_stream_aborts_the_vllm_request(gateway: Gateway) -> None:
    rid = "h6-leave-" + os.urandom(4).hex()
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        headers={"x-request-id": rid},
        timeout=60,
        json={
            "model": CHAT,
            "stream": True,
            "max_tokens": MAX_LEN - 100,  # seconds of tokens: still running when the gateway lets go
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "go on"}],
        },
    ) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break  # leave: the context manager closes the connection

    # vLLM logs the abort (with --enable-log-requests; it counts no metric for it) under the gateway's request id.
    def aborted() -> bool:
        return any(rid in line and "aborted" in line for line in _engine_log(gateway, CHAT))

    assert wait_until(aborted, 10, 0.2), (
        [line for line in _engine_log(gateway, CHAT) if rid in line],
        gateway.log().count("socket.send() raised exception"),  # writes to the gone client after it left
    )
    # Tokens come in bursts: none of a burst may go to the socket of a client that left (tests/integration/
    # test_client_gone_burst.py shows it with the stand-in).
    assert gateway.log().count("socket.send() raised exception") == 0


def test_an_admin_stop_with_a_stream_in_flight_is_an_explicit_end(gateway: Gateway) -> None:
    """vLLM ends what it runs on SIGTERM with finish_reason "abort" (+ usage, [DONE]): the gateway makes that an
    error event a client can tell from success, or the answer finishes whole before the stop. (The non-stream
    case, a 503, is tests/integration/test_stop_is_explicit_end.py's, against the stand-in that aborts as vLLM
    does.) The VLM is not needed after this, so stopping it costs no restart."""
    long = {
        "model": VL,
        "max_tokens": MAX_LEN - 100,
        "ignore_eos": True,
        "stream": True,
        "messages": [{"role": "user", "content": "go on"}],
    }
    # Stopped right after its first events: ~2,000 tokens are seconds of work, the stop is milliseconds away.
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=long, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(3)]
        stopped = httpx.post(f"{gateway.url}/admin/engines/{VL}/stop", timeout=120)
        assert stopped.status_code == 200, stopped.text
        seen += list(lines)
    events = [line for line in seen if line.startswith("data: ")]
    print(f"stopped mid-answer: stream ends {events[-1][:200]!r}")
    # Never vLLM's "abort" chunk, which reads like a finished answer; never a silent cut.
    assert '"abort"' not in "".join(events), events[-3:]
    if events[-1] == "data: [DONE]":
        # The stop let this answer finish first (on a fresh machine vLLM wrote all ~2,000 tokens before the
        # stop reached it, twice): then it must be whole, its last chunk saying why it ended.
        finish = [c["choices"][0]["finish_reason"] for c in map(_chunk, events[:-1]) if c.get("choices")]
        assert finish[-1] == "length", events[-3:]
    else:
        # Cut: an "abort" chunk becomes engine_unavailable; this VLM (transformers impl) has also ended with
        # vLLM's own error event ("EngineCore encountered an issue"), relayed in the gateway's shape.
        assert "error" in _chunk(events[-1]), events[-3:]


def _chunk(event: str) -> dict[str, Any]:
    return dict(json.loads(event.removeprefix("data: ")))


# ---- real faults (last: they restart and finally stop the chat model) --------------------------------------------


def test_sigkill_of_enginecore_takes_the_replica_out_of_rotation_at_once_and_restarts(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    """vLLM's /health is 503 within 0.1 s of its EngineCore's death, and a request that meets it gets 500 and
    makes the server exit: the gateway's prompt probe (and the reaper's exit notice) take the replica out of
    rotation at once; /health and /ready tell the truth meanwhile; the replica is restarted."""
    row = _engine(gateway, CHAT)
    assert row["reaper_pid"] == row["pid"] and row["engine_pid"] not in (None, row["pid"]), row
    group = os.getpgid(row["engine_pid"])
    cores = [p for p in _live(gateway.engine_pids()) if _pgid(p) == group and _comm(p).startswith("VLLM::EngineCor")]
    assert len(cores) == 1, _tree(gateway)
    os.kill(cores[0], signal.SIGKILL)
    met = httpx.post(
        gateway.url + "/v1/chat/completions",
        timeout=60,
        json={"model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert met.status_code in (500, 502, 503), met.text  # vLLM's 500, or the gateway's once it knew
    assert wait_until(lambda: _engine(gateway, CHAT)["state"] != "ready", 10, 0.1), _engine(gateway, CHAT)
    ready = httpx.get(gateway.url + "/ready", timeout=5)
    assert ready.status_code == 503 and CHAT in ready.json()["waiting_for"], ready.text
    health = httpx.get(gateway.url + "/health", timeout=5).json()
    assert health["models"][CHAT]["state"] != "ready", health["models"][CHAT]
    assert wait_until(lambda: _engine(gateway, CHAT)["state"] == "ready", START_TIMEOUT, 1), _engine(gateway, CHAT)
    reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    print(
        "engine death to out of rotation, gateway log:\n"
        + "\n".join(line for line in gateway.log().splitlines() if "supervisor" in line and CHAT in line)
    )


def test_sigkill_of_the_api_server_removes_enginecore_and_worker_and_restarts(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    row = _engine(gateway, CHAT)
    api_pid = row["engine_pid"]  # "pid" is the gateway's reaper, the session leader above vLLM
    others = [pid for pid in _live(gateway.engine_pids()) if pid != api_pid]
    ours = [pid for pid in others if _pgid(pid) == os.getpgid(api_pid)]  # the chat model's tree, not the VLM's
    assert {_comm(p)[:15] for p in ours} >= {"VLLM::EngineCor", "VLLM::Worker"}, {p: _comm(p) for p in ours}
    os.kill(api_pid, signal.SIGKILL)
    # Left alone, EngineCore and Worker would live on under PID 1 holding their (GPU) memory.
    assert wait_until(lambda: not _live(ours), 30, 0.2), {p: _comm(p) for p in _live(ours)}
    assert wait_until(lambda: _engine(gateway, CHAT)["state"] == "ready", START_TIMEOUT, 1), _engine(gateway, CHAT)
    again = _engine(gateway, CHAT)
    assert again["engine_pid"] != api_pid and again["restarts"] >= 1
    reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens == 2


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def test_sigterm_while_loading_escalates_and_leaves_nothing(gateway: Gateway) -> None:
    """vLLM swallows a SIGTERM late in its load (README); the stop escalates to SIGKILL after ``stop_grace``."""
    assert httpx.post(f"{gateway.url}/admin/engines/{CHAT}/restart", timeout=60).status_code == 200
    assert wait_until(lambda: _engine(gateway, CHAT)["engine_pid"] is not None, 30, 0.1)
    api_pid = _engine(gateway, CHAT)["engine_pid"]
    group = os.getpgid(api_pid)
    # Late in the load: EngineCore and its Worker are up, the API server is not listening yet.
    assert wait_until(
        lambda: any(
            _comm(p).startswith("VLLM::Worker") for p in _live(tagged_pids(str(gateway.proc.pid))) if _pgid(p) == group
        ),
        START_TIMEOUT,
        0.2,
    )
    time.sleep(3)
    assert _engine(gateway, CHAT)["state"] != "ready"
    members = [p for p in _live(gateway.engine_pids()) if _pgid(p) == group]
    started = time.monotonic()
    stopped = httpx.post(f"{gateway.url}/admin/engines/{CHAT}/stop", timeout=120)
    took = time.monotonic() - started
    assert stopped.status_code == 200, stopped.text
    assert not _live(members), {p: _comm(p) for p in _live(members)}
    assert _engine(gateway, CHAT)["state"] == "stopped"
    print(f"stop while loading took {took:.1f}s; gateway log tail:\n" + "\n".join(gateway.log().splitlines()[-15:]))
