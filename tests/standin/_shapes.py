"""Response bodies and SSE event sequences, field for field as each engine writes them (ENGINES.md §7).

vLLM dumps chunks with ``exclude_unset``: explicitly set nulls stay (``finish_reason: null``), and the stream
opens with a role-only chunk whose content is ``""``. LMDeploy dumps with ``exclude_none``: nulls vanish, and
``role`` rides on every delta. Both end a usage request with a ``choices: []`` chunk and ``data: [DONE]``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from _cli import VLLM_VERSION
from _openai import Plan, usage

DONE = "[DONE]"
FINGERPRINT = f"vllm-{VLLM_VERSION}-{os.urandom(4).hex()}"  # vLLM 0.32: version and 8 hex digits, per server
# Before an event: wait the first-token delay, the inter-token interval, or nothing.
FIRST, TOKEN = "first", "token"
Event = tuple[str | None, Any]


def _completion_tokens(plans: list[Plan]) -> int:
    return sum(len(p.tokens) for p in plans)


def chat_body(engine: str, rid: str, model: str, plans: list[Plan], prompt_tokens: int) -> dict[str, Any]:
    created = int(time.time())
    use = usage(prompt_tokens, _completion_tokens(plans), vllm_full=engine == "vllm")
    if engine == "vllm":
        choices = [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": "".join(p.tokens),
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": p.finish,
                "stop_reason": p.stop_reason,
                "token_ids": None,
            }
            for i, p in enumerate(plans)
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": FINGERPRINT,
            "usage": use,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "kv_transfer_params": None,
        }
    choices = [
        {
            "index": i,
            "message": {
                "role": "assistant",
                "content": "".join(p.tokens),
                "reasoning_content": None,
                "tool_calls": None,
            },
            "logprobs": None,
            "finish_reason": p.finish,
        }
        for i, p in enumerate(plans)
    ]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }


def completion_body(engine: str, rid: str, model: str, plans: list[Plan], prompt_tokens: int) -> dict[str, Any]:
    created = int(time.time())
    use = usage(prompt_tokens, _completion_tokens(plans), vllm_full=engine == "vllm")
    if engine == "vllm":
        choices = [
            {
                "index": i,
                "text": "".join(p.tokens),
                "logprobs": None,
                "finish_reason": p.finish,
                "stop_reason": p.stop_reason,
                "prompt_logprobs": None,
            }
            for i, p in enumerate(plans)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": FINGERPRINT,
            "usage": use,
            "kv_transfer_params": None,
        }
    choices = [
        {"index": i, "text": "".join(p.tokens), "logprobs": None, "finish_reason": p.finish}
        for i, p in enumerate(plans)
    ]
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }


def _steps(plans: list[Plan]) -> Iterator[tuple[int, int, str, Plan | None]]:
    """(step, choice, token text, plan when this is the choice's last token) in engine output order."""
    for t in range(max((len(p.tokens) for p in plans), default=0) or 1):
        for i, p in enumerate(plans):
            if t < len(p.tokens) or (t == 0 and not p.tokens):
                last = t >= len(p.tokens) - 1
                yield t, i, p.tokens[t] if p.tokens else "", p if last else None


def stream_events(
    kind: str,
    engine: str,
    rid: str,
    model: str,
    plans: list[Plan],
    prompt_tokens: int,
    opts: dict[str, Any],
    force_usage: bool = False,
) -> list[Event]:
    """``kind``: "chat" or "completion". ``opts``: the request's ``stream_options``."""
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    include_usage = bool(opts.get("include_usage")) or force_usage
    continuous = engine == "vllm" and include_usage and bool(opts.get("continuous_usage_stats"))
    vllm = engine == "vllm"
    events: list[Event] = []
    made = [0] * len(plans)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage and not vllm:
            out["usage"] = None
        if continuous:
            out["usage"] = usage(prompt_tokens, sum(made))
        return {**out, **extra}

    if vllm and kind == "chat":
        for i in range(len(plans)):
            role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            events.append((FIRST if i == 0 else None, chunk([role], prompt_token_ids=None, prompt_text=None)))
    for t, i, tok, done in _steps(plans):
        made[i] += 1 if tok else 0
        wait = (FIRST if not events else None) if t == 0 else (TOKEN if i == 0 else None)
        if kind == "chat":
            delta: dict[str, Any] = {"content": tok} if vllm else {"role": "assistant", "content": tok}
            choice: dict[str, Any] = {"index": i, "delta": delta}
        else:
            choice = {"index": i, "text": tok}
        if vllm:
            choice.update(logprobs=None, finish_reason=done.finish if done else None)
            if kind == "chat":
                choice["token_ids"] = None
            if done or kind == "completion":
                choice["stop_reason"] = done.stop_reason if done else None
        elif done:
            choice["finish_reason"] = done.finish
        events.append((wait, chunk([choice])))
    if include_usage:
        use = usage(prompt_tokens, _completion_tokens(plans))
        events.append(
            (None, {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use})
        )
    events.append((None, DONE))
    return events


def error_event(engine: str, status: int, message: str, type_: str) -> dict[str, Any]:
    inner: dict[str, Any] = {"message": message, "type": type_, "param": None, "code": status}
    if engine == "lmdeploy":
        inner["object"] = "error"
    return {"error": inner}


GARBAGE_CHUNK = (
    '{"id":"chatcmpl-garbage","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}]}'
)


def garbage_body(kind: str, stream: bool) -> tuple[str, list[bytes]]:
    """The garbage= fault: (content type, body pieces); one piece means "send with a Content-Length".

    html: a proxy's error page with status 200; badjson: JSON cut short (or SSE events whose JSON is cut short);
    badsse: valid JSON in broken framing (no space after ``data:``, a bare JSON line, an ``event:`` line, CR
    line ends, a non-JSON payload), whatever ``stream`` the request asked for.
    """
    if kind == "html":
        page = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
        return "text/html; charset=utf-8", [page]
    if kind == "badjson" and not stream:
        return "application/json", [b'{"id": "chatcmpl-garbage", "object": "chat.completion", "choices": [{"in']
    if kind == "badjson":
        parts = [b'data: {"id": "chatcmpl-garbage", "choices": [{"delta": {"content": "x"}\n\n'] * 3
    else:
        good = GARBAGE_CHUNK
        parts = [
            f"data:{good}\n".encode(),
            b"event: weird\n\n",
            f"{good}\n\n".encode(),
            f"data: {good}\r".encode(),
            b"data: {not json}\n\n",
        ]
    return "text/event-stream; charset=utf-8", [*parts, b"data: [DONE]\n\n"]


def abort_tail(events: list[Event], sent: int) -> list[Any]:
    """What vLLM 0.32 sends when its shutdown aborts a stream after ``sent`` events: a chunk whose
    ``finish_reason`` is ``"abort"`` (no error event), the usage chunk if one was asked for, and ``[DONE]``."""
    template = next(
        (p for _, p in events[sent:] if isinstance(p, dict) and p.get("choices")),
        next(p for _, p in events if isinstance(p, dict)),
    )
    choices = []
    for choice in template.get("choices") or [{"index": 0}]:
        out = {k: v for k, v in choice.items() if k not in ("finish_reason", "stop_reason", "token_ids")}
        if "delta" in out:
            out["delta"] = {"content": ""}
        elif "text" in out:
            out["text"] = ""
        out.update(logprobs=None, finish_reason="abort", stop_reason=None)
        choices.append(out)
    head = {k: template[k] for k in ("id", "object", "created", "model")}
    tail: list[Any] = [{**head, "choices": choices, "system_fingerprint": FINGERPRINT}]
    use = next((p for _, p in events if isinstance(p, dict) and p.get("choices") == [] and p.get("usage")), None)
    if use is not None:
        tokens = sum(
            1
            for _, p in events[:sent]
            if isinstance(p, dict)
            and any((c.get("delta") or {}).get("content") or c.get("text") for c in p.get("choices") or [])
        )
        prompt = use["usage"]["prompt_tokens"]
        tail.append({**use, "usage": usage(prompt, tokens)})
    return [*tail, DONE]
