"""Responses and Anthropic Messages through a real gateway in front of chat-only engines, with the official SDKs.

Two engines, both reached as ``engine: openai`` remotes (an adapter that lists chat but neither dialect, so
the gateway translates): the stand-in vLLM (tests/standin), for text and images as vLLM checks them; and
``ChatScript``, a small chat completions server in this process that answers as vLLM does but can also call
a tool (its arguments streamed in pieces, as vLLM's tool parsers send them), stall, or break its stream: the
stand-ins never call tools. Each test is a user's call through ``openai.OpenAI().responses`` or
``anthropic.Anthropic().messages``; the engine's record shows what the gateway sent it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from tests.helpers import Gateway, free_port, run_gateway
from tests.standin.harness import launch, serve_args, standin_env

# A 2x2 PNG (what the stand-in vLLM decodes and counts).
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="
)
WEATHER_ARGS = '{"city": "Paris", "unit": "celsius"}'


class ChatScript:
    """A chat completions engine on a thread's event loop. The last user text picks the answer: ``stall``
    (one event, then silence), ``break`` (two events, then the connection drops), ``long`` (an event every
    50 ms for 20 s; ``left`` is set when the client's connection went away); else a tool call when tools are
    offered and no tool result is in, else text ("The weather is fine.")."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.left = threading.Event()
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=1)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "script", "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        messages = body["messages"]
        last = next((m for m in reversed(messages) if m["role"] == "user"), {"content": ""})
        text = (
            last["content"]
            if isinstance(last["content"], str)
            else " ".join(p.get("text", "") for p in last["content"] if p.get("type") == "text")
        )
        answered = any(m["role"] == "tool" for m in messages)
        usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
        if body.get("tools") and not answered and "stall" not in text and "break" not in text:
            head = {
                "index": 0,
                "id": "call_w1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
            pieces: list[dict[str, Any]] = [{"role": "assistant", "tool_calls": [head]}]
            for i in range(0, len(WEATHER_ARGS), 12):
                pieces.append({"tool_calls": [{"index": 0, "function": {"arguments": WEATHER_ARGS[i : i + 12]}}]})
            finish = "tool_calls"
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_w1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": WEATHER_ARGS},
                    }
                ],
            }
        else:
            words = ["The", " weather", " is", " fine."]
            limit = body.get("max_tokens") or 100
            finish = "length" if limit < len(words) else "stop"
            words = words[:limit]
            pieces = [{"role": "assistant", "content": ""}] + [{"content": w} for w in words]
            message = {"role": "assistant", "content": "".join(words)}
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": "script",
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "script",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        try:
            if "stall" in text:
                await event(pieces[0])
                await asyncio.sleep(3)  # silent past the gateway's idle clock (1 s)
                return resp
            if "break" in text:
                await event(pieces[0])
                await event({"content": "The"})
                assert request.transport is not None
                request.transport.close()
                return resp
            if "long" in text:
                for _ in range(400):
                    await event({"content": " la"})
                    await asyncio.sleep(0.05)
            for piece in pieces:
                await event(piece)
            await event({}, finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                chunk = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "script",
                    "choices": [],
                    "usage": usage,
                }
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:  # the gateway closed the connection: its client left
            self.left.set()
        return resp


class Env:
    def __init__(self, gateway: Gateway, script: ChatScript) -> None:
        self.gateway = gateway
        self.script = script
        self.openai = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-unused", max_retries=0)
        self.anthropic = anthropic.Anthropic(base_url=gateway.url, api_key="sk-unused", max_retries=0)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("translated")
    script = ChatScript()
    vllm_port = free_port()
    vllm = launch("vllm", serve_args("vllm", vllm_port, "vl-remote"), env=standin_env(), port=vllm_port)
    probe = {"interval": 0.5, "startup_interval": 0.1}
    config = {
        "server": {"first_byte_timeout": 5, "idle_timeout": 1, "total_timeout": 30},
        "models": {
            "script": {"engine": "openai", "url": f"http://127.0.0.1:{script.port}/v1", "health": probe},
            "standin": {
                "engine": "openai",
                "url": f"http://127.0.0.1:{vllm_port}/v1",
                "model": "vl-remote",
                "health": probe,
            },
        },
    }
    try:
        with run_gateway(config, tmp) as gateway:
            yield Env(gateway, script)
    finally:
        vllm.kill()
        script.close()


WEATHER_TOOL_ANTHROPIC: Any = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_TOOL_RESPONSES: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


# -- Anthropic Messages --


def test_messages_text_and_image_on_the_standin(env: Env) -> None:
    image: Any = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()},
    }
    message = env.anthropic.messages.create(
        model="standin",
        max_tokens=8,
        system="Be brief.",
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "what is this"}]}],
    )
    assert message.model == "standin"
    assert message.type == "message" and message.role == "assistant"
    assert message.content and message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_messages_stream_on_the_standin(env: Env) -> None:
    with env.anthropic.messages.stream(
        model="standin", max_tokens=3, messages=[{"role": "user", "content": "one two three four five"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].type == "text" and final.content[0].text == text
    assert final.model == "standin"
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3


def test_messages_tool_use_loop(env: Env) -> None:
    """The Anthropic tool-use loop as a user writes it: the model calls the tool, the result goes back."""
    history: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = env.anthropic.messages.create(
        model="script", max_tokens=64, tools=[WEATHER_TOOL_ANTHROPIC], messages=history
    )
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input == json.loads(WEATHER_ARGS) and call.id == "call_w1"
    history += [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C, sunny"}]},
    ]
    second = env.anthropic.messages.create(
        model="script", max_tokens=64, tools=[WEATHER_TOOL_ANTHROPIC], messages=history
    )
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"
    assert second.content[0].text == "The weather is fine."
    sent = env.script.requests[-1]
    assert sent["tools"][0]["function"]["parameters"] == WEATHER_TOOL_ANTHROPIC["input_schema"]
    assert sent["messages"][-2]["tool_calls"][0]["id"] == "call_w1"
    assert json.loads(sent["messages"][-2]["tool_calls"][0]["function"]["arguments"]) == json.loads(WEATHER_ARGS)
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": "call_w1", "content": "18 C, sunny"}


def test_messages_tool_use_streamed(env: Env) -> None:
    with env.anthropic.messages.stream(
        model="script",
        max_tokens=64,
        tools=[WEATHER_TOOL_ANTHROPIC],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "weather?"}],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.stop_reason == "tool_use"
    call = final.content[-1]
    assert call.type == "tool_use" and call.input == json.loads(WEATHER_ARGS)
    assert env.script.requests[-1]["tool_choice"] == "required"
    assert final.usage.input_tokens == 11 and final.usage.output_tokens == 5


def test_messages_broken_stream_ends_with_an_error_event(env: Env) -> None:
    with httpx.stream(
        "POST",
        env.gateway.url + "/v1/messages",
        json={"model": "script", "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "break"}]},
        timeout=20,
    ) as response:
        body = response.read()
    assert response.status_code == 200
    assert body.startswith(b"event: message_start\n")
    assert b"event: error\n" in body and b"message_stop" not in body
    last = body.strip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ")
    assert json.loads(last.split(b"data: ", 1)[1])["type"] == "error"
    with pytest.raises(anthropic.APIStatusError):
        with env.anthropic.messages.stream(
            model="script", max_tokens=9, messages=[{"role": "user", "content": "stall"}]
        ) as stream:
            for _ in stream:
                pass


def test_messages_refuses_what_a_chat_model_cannot_carry(env: Env) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        env.anthropic.messages.create(
            model="script",
            max_tokens=8,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
            messages=[{"role": "user", "content": "hi"}],
        )
    assert "web_search_20250305" in str(caught.value)


# -- Responses --


def test_responses_text_and_image_on_the_standin(env: Env) -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    response = env.openai.responses.create(
        model="standin",
        instructions="Be brief.",
        max_output_tokens=4,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this"},
                    {"type": "input_image", "image_url": url, "detail": "auto"},
                ],
            }
        ],
    )
    assert response.model == "standin" and response.object == "response"
    assert response.output_text
    assert response.status in ("completed", "incomplete")
    assert response.usage is not None and response.usage.output_tokens > 0


def test_responses_stream_on_the_standin(env: Env) -> None:
    events = list(
        env.openai.responses.create(
            model="standin", input="one two three four five six", max_output_tokens=4, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]  # the last event is response.completed (checked above)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == deltas and final.status == "incomplete"
    assert final.incomplete_details is not None and final.incomplete_details.reason == "max_output_tokens"
    assert final.model == "standin"


def test_responses_agent_loop_with_a_tool(env: Env) -> None:
    """A Responses agent loop as a user writes it: function_call out, function_call_output back, stateless."""
    history: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = env.openai.responses.create(model="script", input=history, tools=[WEATHER_TOOL_RESPONSES])
    calls = [item for item in first.output if item.type == "function_call"]
    assert (
        len(calls) == 1
        and calls[0].name == "get_weather"
        and json.loads(calls[0].arguments) == json.loads(WEATHER_ARGS)
    )
    history += [item.model_dump(exclude_none=True) for item in first.output]
    history.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C, sunny"})
    second = env.openai.responses.create(model="script", input=history, tools=[WEATHER_TOOL_RESPONSES])
    assert second.output_text == "The weather is fine." and second.status == "completed"
    sent = env.script.requests[-1]["messages"]
    assert sent[-2]["tool_calls"][0]["id"] == calls[0].call_id
    assert sent[-1] == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "18 C, sunny"}


def test_responses_tool_call_streamed(env: Env) -> None:
    with env.openai.responses.stream(
        model="script", input="weather?", tools=[WEATHER_TOOL_RESPONSES], tool_choice="required"
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    call = final.output[-1]
    assert call.type == "function_call" and json.loads(call.arguments) == json.loads(WEATHER_ARGS)
    assert final.usage is not None and final.usage.input_tokens == 11


def test_responses_broken_stream_fails(env: Env) -> None:
    for trigger in ("break", "stall"):
        events = list(env.openai.responses.create(model="script", input=trigger, stream=True))
        kinds = [e.type for e in events]
        assert kinds[-1] == "response.failed" and "response.completed" not in kinds, kinds
        failed = events[-1].response  # type: ignore[union-attr]  # the last event is response.failed (checked above)
        assert failed.status == "failed" and failed.error is not None and failed.error.message


def test_responses_refuses_previous_response_id(env: Env) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        env.openai.responses.create(model="script", input="hi", previous_response_id="resp_1")
    assert "previous_response_id" in str(caught.value) and "whole conversation" in str(caught.value)


def test_client_leaving_a_translated_stream_lets_the_engine_go(env: Env) -> None:
    env.script.left.clear()
    with httpx.stream(
        "POST",
        env.gateway.url + "/v1/messages",
        json={"model": "script", "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "long"}]},
        timeout=20,
    ) as response:
        seen = b""
        for chunk in response.iter_bytes():
            seen += chunk
            if seen.count(b"text_delta") >= 3:
                break
    # The long answer takes 20 s; the engine sees its connection close well before (no bound asserted).
    assert env.script.left.wait(15), "the engine's stream was not closed after the client left"
