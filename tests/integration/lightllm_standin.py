"""A LightLLM stand-in for the gateway's ``/generate`` tests (docs/ENGINES.md §10), run as a ``lightllm`` engine.

It takes the command line the adapter builds (``--model_dir --model_name --host --port --tp``, anything
else ignored), serves ``/health``, ``/generate`` and ``/generate_stream`` in LightLLM's shapes and errors
(HTTP 417 ``{"message"}``), and echoes ``inputs`` word by word (``[images=N]`` first). It fetches
nothing: a ``url`` image is a 417, so a test sees whether the gateway inlined it. With ``STANDIN_RECORD``
set, each request body is appended to that file as one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
from typing import Any

from aiohttp import web

_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM")


class Refused(Exception):
    """LightLLM answers a bad request with HTTP 417 and ``{"message": ...}``."""


def _record(path: str, body: Any) -> None:
    target = os.environ.get("STANDIN_RECORD")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": "request", "path": path, "body": body}) + "\n")


def _images(body: dict[str, Any]) -> int:
    images = (body.get("multimodal_params") or {}).get("images") or []
    for item in images:
        if item.get("type") == "url":
            raise Refused("stand-in: url images are never fetched here")
        if item.get("type") == "base64":
            try:
                data = base64.b64decode(item.get("data", ""), validate=True)
            except (binascii.Error, ValueError):
                raise Refused("image decode failed") from None
            if not data.startswith(_MAGIC):
                raise Refused("cannot identify image file")
    return sum(1 for item in images if item.get("type") == "base64")


def _plan(body: Any) -> tuple[list[str], str, int]:
    """The output words, the finish reason and the prompt token count, or ``Refused``."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
        raise Refused("inputs is required")
    params = body.get("parameters") or {}
    max_new = params.get("max_new_tokens", 16)
    if not isinstance(max_new, int) or max_new < 1:
        raise Refused(f"max_new_tokens must be at least 1, got {max_new}")
    images = _images(body)
    words = ([f"[images={images}]"] if images else []) + body["inputs"].split() or ["ok"]
    finish = "length" if len(words) > max_new else "stop"
    return words[:max_new], finish, len(body["inputs"].split()) + images


async def _body(request: web.Request) -> Any:
    try:
        body = await request.json()
    except ValueError:
        raise Refused("request body is not JSON") from None
    _record(request.path, body)
    return body


def _refused(exc: Refused) -> web.Response:
    return web.json_response({"message": str(exc)}, status=417)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"message": "Ok"})


async def generate(request: web.Request) -> web.Response:
    try:
        words, finish, prompt_tokens = _plan(await _body(request))
    except Refused as exc:
        return _refused(exc)
    return web.json_response(
        {
            "generated_text": [" ".join(words)],
            "count_output_tokens": len(words),
            "finish_reason": finish,
            "prompt_tokens": prompt_tokens,
        }
    )


async def generate_stream(request: web.Request) -> web.StreamResponse:
    try:
        words, finish, prompt_tokens = _plan(await _body(request))
    except Refused as exc:
        return _refused(exc)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i, word in enumerate(words):
        last = i == len(words) - 1
        event = {
            "token": {
                "id": i,
                "text": word if i == 0 else " " + word,
                "logprob": -0.1,
                "special": False,
                "count_output_tokens": i + 1,
                "prompt_tokens": prompt_tokens,
            },
            "generated_text": None,
            "finished": last,
            "finish_reason": finish if last else None,
            "details": None,
        }
        # LightLLM writes "data:" with no space and never sends [DONE].
        await response.write(b"data:" + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
    await response.write_eof()
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--model_dir", "--model_name", "--host"):
        parser.add_argument(flag, default="127.0.0.1" if flag == "--host" else "")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1)
    args, _unknown = parser.parse_known_args()
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    # run_app ends cleanly on SIGTERM, which is how the gateway stops its engines.
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
