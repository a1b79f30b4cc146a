"""Anthropic Messages ↔ chat completions (gateway/dialects/anthropic.py), checked by the anthropic SDK's types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from gateway.dialects.anthropic import MessagesTranslation
from gateway.http.errors import BadRequest, error_body

EVENT: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **kw}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]
    return b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": choices}).encode() + b"\n\n"


def usage_chunk(prompt: int = 7, completion: int = 3) -> bytes:
    data = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Each SSE event as (its event: name, its data), checked against the SDK's event union."""
    out = []
    for block in raw.strip().split(b"\n\n"):
        name_line, data_line = block.split(b"\n")
        assert name_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        data = json.loads(data_line[6:])
        name = name_line[7:].decode()
        assert data["type"] == name
        if name != "error":
            EVENT.validate_python(data)
        out.append((name, data))
    return out


def test_request_system_images_tools_and_results() -> None:
    t = MessagesTranslation(
        body(
            system=[
                {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Really."},
            ],
            stop_sequences=["END"],
            temperature=0.2,
            tools=[{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
            tool_choice={"type": "tool", "name": "f", "disable_parallel_tool_use": True},
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"}},
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                        {"type": "text", "text": "look"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm", "signature": "s"},
                        {"type": "text", "text": "calling"},
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "42"}]},
                        {"type": "text", "text": "and?"},
                    ],
                },
            ],
        ),
        "served",
    )
    chat = t.chat_body
    assert chat["messages"][0] == {"role": "system", "content": "Be brief.\n\nReally."}
    assert chat["messages"][1]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "text", "text": "look"},
    ]
    assistant = chat["messages"][2]
    assert assistant["content"] == "calling"
    assert assistant["tool_calls"] == [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "42"}
    assert chat["messages"][4] == {"role": "user", "content": "and?"}
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "description": "d"}}
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["stop"] == ["END"] and chat["max_tokens"] == 16 and chat["temperature"] == 0.2
    assert "stream" not in chat and "model" not in chat


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"mcp_servers": []}, "mcp_servers"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document"),
    ],
)
def test_what_a_chat_model_cannot_carry_is_a_400_naming_it(kw: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequest) as caught:
        MessagesTranslation(body(**kw), "m")
    assert named in caught.value.message and caught.value.status == 400


def test_answer_text_and_tool_call() -> None:
    t = MessagesTranslation(body(), "served")
    chat = {
        "model": "engine-name",
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": "y"}'}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4},
    }
    message = Message.model_validate(t.answer(chat))
    assert message.model == "served" and message.stop_reason == "tool_use"
    assert message.content[0].type == "text" and message.content[0].text == "Let me check."
    assert (
        message.content[1].type == "tool_use"
        and message.content[1].input == {"x": "y"}
        and message.content[1].id == "c1"
    )
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 4)


@pytest.mark.parametrize(
    ("finish", "stop_reason", "expected"),
    [
        ("stop", None, ("end_turn", None)),
        ("length", None, ("max_tokens", None)),
        ("stop", "END", ("stop_sequence", "END")),
    ],
)
def test_stop_reasons(finish: str, stop_reason: str | None, expected: tuple[str, str | None]) -> None:
    t = MessagesTranslation(body(stop_sequences=["END"]), "m")
    chat = {"choices": [{"message": {"content": "a"}, "finish_reason": finish, "stop_reason": stop_reason}]}
    answer = t.answer(chat)
    assert (answer["stop_reason"], answer["stop_sequence"]) == expected


def test_answer_with_broken_tool_arguments_is_an_unexpected_shape() -> None:
    t = MessagesTranslation(body(), "m")
    chat = {
        "choices": [
            {
                "message": {"tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
                "finish_reason": "tool_calls",
            }
        ]
    }
    with pytest.raises(ValueError):
        t.answer(chat)


def test_stream_text_then_tool_call_in_pieces() -> None:
    t = MessagesTranslation(body(stream=True), "served")
    assert t.chat_body["stream"] is True and t.chat_body["stream_options"] == {"include_usage": True}
    out = t.feed(chunk({"role": "assistant", "content": ""}) + chunk({"content": "Hel"}))
    out += t.feed(chunk({"content": "lo"}))
    head = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    out += t.feed(chunk({"tool_calls": [head]}))
    out += t.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}))
    out += t.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}))
    out += t.feed(chunk({}, "tool_calls") + usage_chunk() + b"data: [DONE]\n\n")
    out += t.end()
    seen = events(out)
    assert [n for n, _ in seen] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert seen[0][1]["message"]["model"] == "served"
    assert seen[5][1]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f", "input": {}}
    assert (
        "".join(d["delta"]["partial_json"] for n, d in seen if d.get("index") == 1 and n == "content_block_delta")
        == '{"a": 1}'
    )
    assert seen[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert seen[-2][1]["usage"] == {"input_tokens": 7, "output_tokens": 3}


def test_stream_length_and_an_empty_stream() -> None:
    t = MessagesTranslation(body(stream=True), "m")
    out = t.feed(chunk({"content": "a"}, "length") + usage_chunk()) + t.end()
    assert events(out)[-2][1]["delta"]["stop_reason"] == "max_tokens"
    empty = MessagesTranslation(body(stream=True), "m")
    assert [n for n, _ in events(empty.end())] == ["message_start", "message_delta", "message_stop"]


def test_broken_stream_ends_with_an_error_event_never_message_stop() -> None:
    t = MessagesTranslation(body(stream=True), "m")
    out = t.feed(chunk({"content": "a"})) + t.error_event("The engine stalled.", "timeout_error", "upstream_timeout")
    seen = events(out)
    assert seen[-1] == (
        "error",
        {"type": "error", "error": {"type": "timeout_error", "message": "The engine stalled."}},
    )
    assert all(n != "message_stop" for n, _ in seen)


def test_malformed_chat_event_is_a_value_error() -> None:
    t = MessagesTranslation(body(stream=True), "m")
    with pytest.raises(ValueError):
        t.feed(b"data: {not json\n\n")


@pytest.mark.parametrize(
    ("status", "type_", "expected"),
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (404, "invalid_request_error", "not_found_error"),
        (503, "service_unavailable", "overloaded_error"),
        (502, "upstream_error", "api_error"),
    ],
)
def test_error_bodies_in_anthropic_shape(status: int, type_: str, expected: str) -> None:
    data = json.loads(MessagesTranslation(body(), "m").error_body(status, error_body("nope", type_, "x")))
    assert data == {"type": "error", "error": {"type": expected, "message": "nope"}}
