"""Responses, Anthropic Messages and the engine-native endpoints through a real gateway, with the official SDKs,
to engines that serve them natively: the vLLM stand-in (as vLLM 0.32 does in docs/real-vllm/transcripts) and the
LMDeploy stand-in (its differences: ``anthropic-version`` required, ``msg_`` ids, ``response.incomplete``).

Everything goes through the endpoint table and the pipeline, so keys (``Authorization`` or ``x-api-key``),
permissions, request ids, metrics labels and the relay apply; errors on ``/v1/messages*`` come in Anthropic's
shape, the middleware's and admission's included.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.helpers import Gateway, run_gateway, standin_command, standin_model
from tests.standin.harness import read_records

KEY, EMBEDDER = "sk-all-0123456789", "sk-embed-0123456789"


def _png() -> str:
    """A 1x1 PNG, base64."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    raw += chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


class Env:
    def __init__(self, gateway: Gateway, records: dict[str, Path]) -> None:
        self.gateway = gateway
        self.records = records
        self.openai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=20)
        self.anthropic = anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0, timeout=20)

    def reached(self, model: str, path: str) -> list[dict[str, Any]]:
        return [r for r in read_records(self.records[model], "request") if r["path"] == path]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("native")
    records = {name: tmp / f"{name}.jsonl" for name in ("v", "l")}
    config = {
        "auth": {
            "api_keys": [
                {"name": "all", "key": KEY, "permissions": ["all"]},
                {"name": "embed", "key": EMBEDDER, "permissions": ["embeddings"]},
            ]
        },
        "models": {
            "v": standin_model(
                env={"STANDIN_RECORD": str(records["v"])},
                args={"enable-auto-tool-choice": True, "tool-call-parser": "pythonic"},
            ),
            "l": standin_model(
                engine="lmdeploy",
                command=standin_command("lmdeploy"),
                env={"STANDIN_RECORD": str(records["l"])},
            ),
        },
    }
    with run_gateway(config, tmp) as gateway:
        env = Env(gateway, records)
        yield env
        env.openai.close()
        env.anthropic.close()


@pytest.mark.parametrize("model", ["v", "l"])
def test_responses_with_the_openai_sdk(env: Env, model: str) -> None:
    answer = env.openai.responses.create(model=model, input="hello there gateway", max_output_tokens=8)
    assert answer.output_text == "hello there gateway" and answer.model == model and answer.status == "completed"
    assert answer.usage is not None and answer.usage.output_tokens == 3
    events = list(env.openai.responses.create(model=model, input="one two three", max_output_tokens=2, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds.count("response.output_text.delta") == 2
    last = "response.incomplete" if model == "l" else "response.completed"  # LMDeploy: cut by the limit
    assert kinds[-1] == last and events[-1].response.status == "incomplete"  # type: ignore[union-attr]
    assert env.reached(model, "/v1/responses")[-1]["body"]["stream"] is True  # native: nothing translated


@pytest.mark.parametrize("model", ["v", "l"])
def test_messages_with_the_anthropic_sdk(env: Env, model: str) -> None:
    message = env.anthropic.messages.create(
        model=model, max_tokens=16, messages=[{"role": "user", "content": "hello there gateway"}]
    )
    assert message.content[0].type == "text" and message.content[0].text == "hello there gateway"
    assert message.model == model and message.stop_reason == "end_turn" and message.usage.output_tokens == 3
    reached = env.reached(model, "/v1/messages")[-1]
    assert reached["headers"]["anthropic-version"]  # the SDK's, forwarded: LMDeploy needs it
    assert "x-api-key" not in reached["headers"] and "authorization" not in reached["headers"]  # the client's key
    with env.anthropic.messages.stream(
        model=model, max_tokens=2, messages=[{"role": "user", "content": "one two three"}]
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.content[0].text == "one two" and final.stop_reason == "max_tokens"  # type: ignore[union-attr]


def test_messages_with_tools_and_an_image(env: Env) -> None:
    tools = [{"name": "lookup", "description": "Look a word up.", "input_schema": {"type": "object"}}]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": _png()}}
    first = env.anthropic.messages.create(
        model="v",
        max_tokens=16,
        tools=tools,  # type: ignore[arg-type]
        tool_choice={"type": "tool", "name": "lookup"},
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "what is this"}]}],
    )
    assert first.stop_reason == "tool_use"
    call = first.content[0]
    assert call.type == "tool_use" and call.name == "lookup" and call.input == {"text": "[images=1] what is this"}
    media = [r for r in read_records(env.records["v"], "media") if r["path"] == "/v1/messages"]
    assert media[-1]["source"] == "data" and media[-1]["format"] == "png"
    # The tool's result goes back; the model answers in text.
    second = env.anthropic.messages.create(
        model="v",
        max_tokens=16,
        tools=tools,  # type: ignore[arg-type]
        messages=[
            {"role": "user", "content": "what is this"},
            {"role": "assistant", "content": [call.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "a red dot"}]},
        ],
    )
    assert second.stop_reason == "end_turn" and second.content[0].text == "a red dot"  # type: ignore[union-attr]


def test_count_tokens_tokenize_and_detokenize(env: Env) -> None:
    counted = env.anthropic.messages.count_tokens(model="v", messages=[{"role": "user", "content": "a b c"}])
    assert counted.input_tokens == 3
    headers = {"authorization": f"Bearer {KEY}", "x-request-id": "tok-1"}
    tokens = httpx.post(env.gateway.url + "/tokenize", json={"model": "v", "prompt": "a b"}, headers=headers)
    assert tokens.status_code == 200 and tokens.json()["count"] == 2 and tokens.headers["x-request-id"] == "tok-1"
    text = httpx.post(env.gateway.url + "/detokenize", json={"model": "v", "tokens": [1, 2]}, headers=headers)
    assert text.status_code == 200 and text.json() == {"prompt": "<1> <2>"}
    # A client without anthropic-version (curl): the gateway sends the default, which LMDeploy requires.
    plain = httpx.post(
        env.gateway.url + "/v1/messages",
        json={"model": "l", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": KEY},
    )
    assert plain.status_code == 200, plain.text
    assert env.reached("l", "/v1/messages")[-1]["headers"]["anthropic-version"] == "2023-06-01"
    # LMDeploy has no /tokenize: the gateway says so, naming the model and the path.
    refused = httpx.post(env.gateway.url + "/tokenize", json={"model": "l", "prompt": "a"}, headers=headers)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_endpoint"
    assert "'l'" in refused.json()["error"]["message"] and "/tokenize" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"model": "v", "prompt": "a"}),
        ("/detokenize", {"model": "v", "tokens": [1]}),
        ("/v1/responses", {"model": "v", "input": "a"}),
        ("/v1/messages", {"model": "v", "max_tokens": 1, "messages": []}),
        ("/v1/messages/count_tokens", {"model": "v", "messages": []}),
        ("/v1/score", {"model": "v", "text_1": "a", "text_2": "b"}),
        ("/v1/classify", {"model": "v", "input": "a"}),
        ("/pooling", {"model": "v", "input": "a"}),
        ("/v1/audio/speech", {"model": "v", "input": "a"}),
        ("/v1/images/generations", {"model": "v", "prompt": "a"}),
    ],
)
def test_the_gateways_keys_guard_every_new_path(env: Env, path: str, body: dict[str, Any]) -> None:
    # vLLM's own --api-key would not cover /tokenize: the gateway's keys do, before anything reaches an engine.
    before = len(env.reached("v", path))
    for headers in ({}, {"authorization": "Bearer sk-wrong-0123456789"}, {"x-api-key": "sk-wrong-0123456789"}):
        response = httpx.post(env.gateway.url + path, json=body, headers=headers, timeout=10)
        assert response.status_code == 401, (path, response.text)
    other = httpx.post(env.gateway.url + path, json=body, headers={"x-api-key": EMBEDDER}, timeout=10)
    if path in ("/v1/classify", "/pooling"):
        # The embeddings permission: relayed to the engine, whose generative model has no such route (404).
        assert other.status_code == 404 and len(env.reached("v", path)) == before + 1, other.text
    else:
        assert other.status_code == 403, (path, other.text)
        assert len(env.reached("v", path)) == before


def test_anthropic_errors_in_anthropics_shape(env: Env) -> None:
    with (
        anthropic.Anthropic(base_url=env.gateway.url, api_key="sk-wrong-0123456789", max_retries=0) as bad_key,
        pytest.raises(anthropic.AuthenticationError) as caught,
    ):
        bad_key.messages.create(model="v", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": caught.value.body["error"]["message"]},
    }  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as missing:
        env.anthropic.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "'nope'" in missing.value.body["error"]["message"]  # type: ignore[index]
    with (
        anthropic.Anthropic(base_url=env.gateway.url, api_key=EMBEDDER, max_retries=0) as embedder,
        pytest.raises(anthropic.PermissionDeniedError) as denied,
    ):
        embedder.messages.create(model="v", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    # A 400 of the gateway's own (a missing field) and one of the engine (tools on LMDeploy without a parser).
    raw = httpx.post(
        env.gateway.url + "/v1/messages",
        json={"model": "v", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": KEY},
    )
    assert raw.status_code == 400 and raw.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'max_tokens' is required."},
    }
    with pytest.raises(anthropic.BadRequestError) as engine_400:
        env.anthropic.messages.create(
            model="l",
            max_tokens=4,
            tools=[{"name": "t", "input_schema": {"type": "object"}}],
            messages=[{"role": "user", "content": "hi"}],
        )
    assert engine_400.value.body["type"] == "error"  # type: ignore[index]
    # Below /v1/messages, the paths FastAPI answers itself are Anthropic's too.
    for method, path in (("GET", "/v1/messages"), ("POST", "/v1/messages/batches")):
        response = httpx.request(method, env.gateway.url + path, headers={"x-api-key": KEY})
        assert response.status_code in (404, 405) and response.json()["type"] == "error", (path, response.text)
    # The OpenAI paths keep OpenAI's shape.
    chat = httpx.post(env.gateway.url + "/v1/chat/completions", json={"model": "nope", "messages": []})
    assert chat.status_code == 401 and set(chat.json()["error"]) == {"message", "type", "param", "code"}


def test_a_broken_native_messages_stream_ends_with_an_anthropic_error_event(env: Env, tmp_path: Path) -> None:
    config = {"models": {"m": standin_model(env={"STANDIN_FAULTS": "crash-after-chunks=3"})}}
    with run_gateway(config, tmp_path) as gateway:
        seen: list[str] = []
        with (
            anthropic.Anthropic(base_url=gateway.url, api_key="none", max_retries=0, timeout=20) as client,
            pytest.raises(anthropic.APIStatusError) as caught,
        ):
            with client.messages.stream(
                model="m", max_tokens=8, messages=[{"role": "user", "content": "a b c d e f"}]
            ) as stream:
                seen.extend(e.type for e in stream)
        assert "message_stop" not in seen
        assert caught.value.body["type"] == "error"  # type: ignore[index]


def test_stored_responses_are_not_routed_and_say_why(env: Env) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        env.openai.responses.retrieve("resp_0123")
    assert "does not keep or route stored responses" in str(caught.value)
    assert env.openai.responses.with_raw_response  # the client stays usable
