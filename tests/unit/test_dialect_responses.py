"""OpenAI Responses ↔ chat completions (gateway/dialects/responses.py), shapes checked by the openai SDK's types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.dialects.responses import ResponsesTranslation
from gateway.http.errors import BadRequest

EVENT: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return b"data: " + json.dumps({"choices": choices}).encode() + b"\n\n"


def usage_chunk() -> bytes:
    return (
        b"data: "
        + json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()
        + b"\n\n"
    )


def events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.strip().split(b"\n\n"):
        name_line, data_line = block.split(b"\n")
        data = json.loads(data_line[6:])
        assert name_line == b"event: " + data["type"].encode()
        EVENT.validate_python(data)
        out.append(data)
    assert [e["sequence_number"] for e in out] == list(
        range(out[0]["sequence_number"], out[0]["sequence_number"] + len(out))
    )
    return out


def test_request_items_images_tools_and_format() -> None:
    t = ResponsesTranslation(
        {
            "model": "m",
            "instructions": "Be brief.",
            "max_output_tokens": 20,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
            "store": True,
            "include": ["reasoning.encrypted_content"],
            "input": [
                {"role": "developer", "content": "Rules."},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "see"},
                        {"type": "input_image", "image_url": "data:image/png;base64,QUJD", "detail": "low"},
                    ],
                },
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "calling"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": '{"a":2}'},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
            ],
        },
        "served",
    )
    messages = t.chat_body["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "system", "content": "Rules."}
    assert messages[2]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,QUJD", "detail": "low"},
    }
    assert messages[3]["content"] == "calling" and [c["id"] for c in messages[3]["tool_calls"]] == ["c1", "c2"]
    assert messages[4:] == [
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert t.chat_body["max_tokens"] == 20
    assert t.chat_body["tools"][0]["function"] == {"name": "f", "parameters": {"type": "object"}, "strict": True}
    assert t.chat_body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert t.chat_body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}},
    }


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"tools": [{"type": "web_search"}]}, "web_search"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
        ({"background": True}, "background"),
    ],
)
def test_what_a_chat_model_cannot_carry_is_a_400_naming_it(kw: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequest) as caught:
        ResponsesTranslation({"model": "m", "input": "hi", **kw}, "m")
    assert named in caught.value.message


def test_previous_response_id_says_why() -> None:
    with pytest.raises(BadRequest) as caught:
        ResponsesTranslation({"model": "m", "input": "hi", "previous_response_id": "resp_1"}, "m")
    assert "keeps no responses" in caught.value.message and "whole conversation" in caught.value.message


def test_answer_text_tool_call_status_and_usage() -> None:
    t = ResponsesTranslation({"model": "m", "input": "hi", "max_output_tokens": 5}, "served")
    chat = {
        "choices": [
            {
                "message": {
                    "content": "Hi",
                    "tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": "{}"}}],
                },
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 2}},
    }
    response = Response.model_validate(t.answer(chat))
    assert response.model == "served" and response.output_text == "Hi"
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    call = response.output[1]
    assert call.type == "function_call" and call.call_id == "call_1" and call.name == "f"
    assert response.usage is not None and (
        response.usage.input_tokens,
        response.usage.output_tokens,
        response.usage.total_tokens,
    ) == (7, 5, 12)
    assert response.usage.input_tokens_details.cached_tokens == 2
    completed = t.answer({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]})
    assert completed["status"] == "completed" and completed["incomplete_details"] is None


def test_stream_text_then_tool_calls_in_pieces() -> None:
    t = ResponsesTranslation({"model": "m", "input": "hi", "stream": True}, "served")
    out = t.feed(chunk({"role": "assistant", "content": ""}) + chunk({"content": "Hel"}) + chunk({"content": "lo"}))
    out += t.feed(chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]}))
    out += t.feed(chunk({"tool_calls": [{"index": 1, "id": "call_2", "function": {"name": "g", "arguments": "{}"}}]}))
    out += t.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}))
    out += t.feed(chunk({}, "tool_calls") + usage_chunk() + b"data: [DONE]\n\n") + t.end()
    seen = events(out)
    kinds = [e["type"] for e in seen]
    assert kinds[:6] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
    ]
    assert kinds[6:9] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == "response.completed" and seen[0]["sequence_number"] == 0
    done = {e["item_id"]: e["arguments"] for e in seen if e["type"] == "response.function_call_arguments.done"}
    final = Response.model_validate(seen[-1]["response"])
    assert final.output_text == "Hello" and final.status == "completed" and final.model == "served"
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.call_id, c.arguments) for c in calls] == [("call_1", '{"a": 1}'), ("call_2", "{}")]
    assert set(done.values()) == {'{"a": 1}', "{}"}
    assert final.usage is not None and final.usage.output_tokens == 3


def test_stream_cut_by_the_token_limit_is_completed_with_status_incomplete() -> None:
    t = ResponsesTranslation({"model": "m", "input": "hi", "stream": True}, "m")
    seen = events(t.feed(chunk({"content": "a"}, "length") + usage_chunk()) + t.end())
    assert seen[-1]["type"] == "response.completed" and seen[-1]["response"]["status"] == "incomplete"
    assert seen[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_broken_stream_fails_never_completes() -> None:
    t = ResponsesTranslation({"model": "m", "input": "hi", "stream": True}, "m")
    seen = events(
        t.feed(chunk({"content": "a"})) + t.error_event("The engine stalled.", "timeout_error", "upstream_timeout")
    )
    assert seen[-1]["type"] == "response.failed"
    failed = Response.model_validate(seen[-1]["response"])
    assert failed.status == "failed" and failed.error is not None and failed.error.message == "The engine stalled."
    assert all(e["type"] != "response.completed" for e in seen)
