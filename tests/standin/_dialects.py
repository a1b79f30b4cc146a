"""The client dialects vLLM 0.32 serves itself (docs/real-vllm/transcripts: responses*.txt, messages*.txt):
OpenAI Responses and Anthropic Messages, with LMDeploy's differences (ids ``msg_…``, the ``anthropic-version``
header required, a Responses stream cut by the token limit ends with ``response.incomplete``).

A request is read as the chat request it amounts to (``*_as_chat``: text, images as data URLs, tool results as
text), so the "model" and its checks are chat's (_openai.py); the answer and the stream are the dialect's,
field for field as in the transcripts. Stream events are named (``event:`` lines); Messages streams end at
``message_stop``, Responses streams at ``response.completed``, neither with ``[DONE]``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from _openai import ApiError, Plan

Event = tuple[str | None, Any]
FIRST, TOKEN = "first", "token"

_STOP = {"length": "max_tokens", "stop": "end_turn", "abort": "end_turn"}


def named(event: str, data: dict[str, Any]) -> bytes:
    text = json.dumps(
        {"type": event, **data} if "type" not in data else data, separators=(",", ":"), ensure_ascii=False
    )
    return f"event: {event}\ndata: {text}\n\n".encode()


# ---- Anthropic Messages --------------------------------------------------------------------------------------


def _anthropic_part(block: Any) -> dict[str, Any]:
    if isinstance(block, str):
        return {"type": "text", "text": block}
    if not isinstance(block, dict):
        raise ApiError(400, "content blocks must be objects")
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": str(block.get("text", ""))}
    if kind == "image":
        source = block.get("source") or {}
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
        else:
            url = str(source.get("url", ""))
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "tool_use":
        return {"type": "text", "text": f"{block.get('name')} {json.dumps(block.get('input'))}"}
    if kind == "tool_result":
        inner = block.get("content")
        text = inner if isinstance(inner, str) else " ".join(str(b.get("text", "")) for b in inner or [])
        return {"type": "text", "text": text}
    raise ApiError(400, f"Unsupported content block type: {kind}")


def messages_as_chat(body: dict[str, Any], *, count: bool = False) -> dict[str, Any]:
    """An Anthropic Messages request as the chat request it amounts to (``count``: a count_tokens request,
    which has no ``max_tokens``)."""
    if not isinstance(body.get("messages"), list):
        raise ApiError(400, "messages: Field required", "messages")
    if not count and not isinstance(body.get("max_tokens"), int):
        raise ApiError(400, "max_tokens: Field required", "max_tokens")
    chat: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        chat.append(
            {"role": "system", "content": system if isinstance(system, str) else [_anthropic_part(b) for b in system]}
        )
    for msg in body["messages"]:
        content = msg.get("content") if isinstance(msg, dict) else None
        parts = content if isinstance(content, str) else [_anthropic_part(b) for b in content or []]
        chat.append({"role": msg.get("role") if isinstance(msg, dict) else None, "content": parts})
    out = {"messages": chat, "max_tokens": body.get("max_tokens")}
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    return out


def forced_tool(body: dict[str, Any]) -> str | None:
    """The tool the model "calls": when ``tool_choice`` is ``any`` or names one (the stand-in makes no choices)."""
    tools, choice = body.get("tools") or [], body.get("tool_choice") or {}
    if not tools or not isinstance(choice, dict):
        return None
    if choice.get("type") == "tool":
        return str(choice.get("name"))
    if choice.get("type") == "any":
        return str(tools[0].get("name"))
    return None


def message_id(engine: str, rid: str) -> str:
    return rid if engine == "vllm" else f"msg_{os.urandom(11).hex()}"


def message_body(engine: str, mid: str, model: str, plan: Plan, prompt_tokens: int, tool: str | None) -> dict:
    text = "".join(plan.tokens)
    if tool is not None:
        content: list[dict[str, Any]] = [
            {"type": "tool_use", "id": f"toolu_{os.urandom(8).hex()}", "name": tool, "input": {"text": text}}
        ]
        stop = "tool_use"
    else:
        content, stop = [{"type": "text", "text": text}], _STOP.get(plan.finish, "end_turn")
    if plan.stop_reason is not None:
        stop = "stop_sequence"
    out: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant", "content": content, "model": model}
    out["stop_reason"] = stop
    if engine != "vllm":
        out["stop_sequence"] = plan.stop_reason
    out["usage"] = {"input_tokens": prompt_tokens, "output_tokens": len(plan.tokens)}
    return out


def message_events(mid: str, model: str, plan: Plan, prompt_tokens: int, tool: str | None) -> list[Event]:
    start = {
        "message": {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
        }
    }
    events: list[Event] = [(FIRST, named("message_start", start))]
    if tool is not None:
        block = {"type": "tool_use", "id": f"toolu_{os.urandom(8).hex()}", "name": tool, "input": {}}
        events.append(
            (None, named("content_block_start", {"type": "content_block_start", "content_block": block, "index": 0}))
        )
        arguments = json.dumps({"text": "".join(plan.tokens)})
        for i in range(0, len(arguments), 8):
            delta = {"type": "input_json_delta", "partial_json": arguments[i : i + 8]}
            events.append(
                (TOKEN, named("content_block_delta", {"type": "content_block_delta", "delta": delta, "index": 0}))
            )
        stop = "tool_use"
    else:
        block = {"type": "text", "text": ""}
        events.append(
            (None, named("content_block_start", {"type": "content_block_start", "content_block": block, "index": 0}))
        )
        for tok in plan.tokens:
            delta = {"type": "text_delta", "text": tok}
            events.append(
                (TOKEN, named("content_block_delta", {"type": "content_block_delta", "delta": delta, "index": 0}))
            )
        stop = "stop_sequence" if plan.stop_reason is not None else _STOP.get(plan.finish, "end_turn")
    events.append((None, named("content_block_stop", {"type": "content_block_stop", "index": 0})))
    delta = {"stop_reason": stop, "stop_sequence": plan.stop_reason}
    usage = {"input_tokens": prompt_tokens, "output_tokens": len(plan.tokens)}
    events.append((None, named("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})))
    events.append((None, named("message_stop", {"type": "message_stop"})))
    return events


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
    return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}


# ---- OpenAI Responses ----------------------------------------------------------------------------------------


def _response_part(part: Any) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise ApiError(400, "content parts must be objects", "input")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "input_image":
        return {"type": "image_url", "image_url": {"url": str(part.get("image_url", ""))}}
    raise ApiError(400, f"Unsupported content part type: {kind}", "input")


def responses_as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI Responses request as the chat request it amounts to."""
    items = body.get("input")
    chat: list[dict[str, Any]] = []
    if body.get("instructions"):
        chat.append({"role": "system", "content": str(body["instructions"])})
    if isinstance(items, str):
        chat.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                raise ApiError(400, "input items must be objects", "input")
            if item.get("type") == "function_call_output":
                chat.append({"role": "tool", "content": str(item.get("output", ""))})
            elif item.get("type") == "function_call":
                chat.append({"role": "assistant", "content": f"{item.get('name')} {item.get('arguments')}"})
            else:
                content = item.get("content")
                parts = content if isinstance(content, str) else [_response_part(p) for p in content or []]
                chat.append({"role": item.get("role", "user"), "content": parts})
    else:
        raise ApiError(400, "input: Field required", "input")
    out: dict[str, Any] = {"messages": chat}
    if body.get("max_output_tokens"):
        out["max_tokens"] = body["max_output_tokens"]
    return out


def _response(rid: str, model: str, body: dict, created: int, status: str, output: list, usage: Any, reason: Any):
    return {
        "id": rid,
        "created_at": created,
        "incomplete_details": reason,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata"),
        "model": model,
        "object": "response",
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature", 1.0),
        "tool_choice": body.get("tool_choice", "none" if not body.get("tools") else "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "background": False,
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "previous_response_id": body.get("previous_response_id"),
        "prompt": None,
        "reasoning": None,
        "service_tier": "auto",
        "status": status,
        "text": None,
        "top_logprobs": None,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


def _usage(prompt_tokens: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output,
    }


def _finish(plan: Plan) -> tuple[str, Any]:
    if plan.finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def response_id() -> str:
    return f"resp_{os.urandom(8).hex()}"


def response_body(rid: str, model: str, body: dict, plan: Plan, prompt_tokens: int) -> dict[str, Any]:
    text = "".join(plan.tokens)
    item = _message_item(f"msg_{os.urandom(8).hex()}", text, "completed", None)
    status, reason = _finish(plan)
    usage = _usage(prompt_tokens, len(plan.tokens))
    return _response(rid, model, body, int(time.time()), status, [item], usage, reason)


def _message_item(item_id: str, text: str | None, status: str, logprobs: Any) -> dict[str, Any]:
    content = [] if text is None else [{"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}]
    return {"id": item_id, "content": content, "role": "assistant", "status": status, "type": "message"}


def response_events(engine: str, rid: str, model: str, body: dict, plan: Plan, prompt_tokens: int) -> list[Event]:
    created, item_id, seq = int(time.time()), f"msg_{os.urandom(8).hex()}", iter(range(1 << 30))
    text = "".join(plan.tokens)

    def ev(name: str, **data: Any) -> bytes:
        return named(name, {**data, "sequence_number": next(seq), "type": name})

    start = _response(rid, model, body, created, "in_progress", [], None, None)
    events: list[Event] = [(FIRST, ev("response.created", response=start))]
    events.append((None, ev("response.in_progress", response=start)))
    events.append(
        (None, ev("response.output_item.added", item=_message_item(item_id, None, "in_progress", None), output_index=0))
    )
    part = {"annotations": [], "text": "", "type": "output_text", "logprobs": []}
    events.append(
        (None, ev("response.content_part.added", content_index=0, item_id=item_id, output_index=0, part=part))
    )
    for tok in plan.tokens:
        events.append(
            (
                TOKEN,
                ev(
                    "response.output_text.delta",
                    content_index=0,
                    delta=tok,
                    item_id=item_id,
                    logprobs=[],
                    output_index=0,
                ),
            )
        )
    events.append(
        (
            None,
            ev("response.output_text.done", content_index=0, item_id=item_id, logprobs=[], output_index=0, text=text),
        )
    )
    done_part = {"annotations": [], "text": text, "type": "output_text", "logprobs": None}
    events.append(
        (None, ev("response.content_part.done", content_index=0, item_id=item_id, output_index=0, part=done_part))
    )
    item = _message_item(item_id, text, "completed", None)
    events.append((None, ev("response.output_item.done", item=item, output_index=0)))
    status, reason = _finish(plan)
    final = _response(rid, model, body, created, status, [item], _usage(prompt_tokens, len(plan.tokens)), reason)
    # vLLM 0.32 ends every stream with response.completed (its status may say incomplete); LMDeploy ends a
    # stream cut by the token limit with response.incomplete.
    last = "response.incomplete" if engine == "lmdeploy" and status == "incomplete" else "response.completed"
    events.append((None, ev(last, response=final)))
    return events
