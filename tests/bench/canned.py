"""The canned answers every benchmark upstream serves: one chat completion and one 64-event SSE stream.

Shaped like an OpenAI-compatible engine's (vLLM's) answers, so a proxy that peeks at them does the work
it does in production: the completion is 573 bytes, the stream 64 ``chat.completion.chunk`` events (the
last one carries ``usage``) then ``data: [DONE]``, 16 KB in all.
"""

from __future__ import annotations

import orjson

MODEL = "bench"  # the upstream's own name for the model
COMPLETION_BYTES = 573
STREAM_EVENTS = 64
_ID = "chatcmpl-bench0123456789abcdef0123456789ab"
_CREATED = 1_700_000_000


def _completion() -> bytes:
    def build(content: str) -> bytes:
        return orjson.dumps(
            {
                "id": _ID,
                "object": "chat.completion",
                "created": _CREATED,
                "model": MODEL,
                "system_fingerprint": "fp_bench",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 12,
                    "completion_tokens": 28,
                    "total_tokens": 40,
                    "prompt_tokens_details": {"cached_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                },
                "service_tier": "default",
            }
        )

    text = "Hello! This is the benchmark upstream's canned answer, as long as a short reply from a model"
    body = build(text)
    pad = COMPLETION_BYTES - len(body)
    if pad < 0:
        raise AssertionError(f"canned completion is {len(body)} bytes, over {COMPLETION_BYTES}")
    return build(text + "." * pad)


def _events() -> list[bytes]:
    def chunk(delta: dict[str, str], finish: str | None) -> dict[str, object]:
        return {
            "id": _ID,
            "object": "chat.completion.chunk",
            "created": _CREATED,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": f" token{i:02d}"}, None) for i in range(1, STREAM_EVENTS - 2)]
    events.append(chunk({}, "stop"))
    last = chunk({}, None)
    last["choices"] = []
    last["usage"] = {"prompt_tokens": 12, "completion_tokens": STREAM_EVENTS - 2, "total_tokens": STREAM_EVENTS + 10}
    events.append(last)
    assert len(events) == STREAM_EVENTS
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


COMPLETION: bytes = _completion()
# SSE events, each one ``data: ...\n\n``; the last is ``data: [DONE]\n\n``.
EVENTS: list[bytes] = _events()
STREAM: bytes = b"".join(EVENTS)
MODELS: bytes = orjson.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": _CREATED, "owned_by": "bench"}]}
)


def request_body(model: str, stream: bool) -> bytes:
    """What the load generators POST: a small chat request."""
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello in one sentence."}],
            "max_tokens": 64,
            "stream": stream,
        }
    )
