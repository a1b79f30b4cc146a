"""Reading and checking an OpenAI request body before anything is sent to an engine. No engine I/O here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from gateway.http.errors import BadRequest, PayloadTooLarge, RequestTimeout

# Fields that steer a proxy elsewhere or inject credentials (LiteLLM-style; CVE-2024-6587) and a
# client-supplied chat template: never forwarded.
_STRIPPED_FIELDS = ("api_base", "base_url", "api_key", "extra_headers", "chat_template", "custom_llm_provider")
# chat_template_kwargs that turn a chat request into something else (vLLM GHSA-3mwp-wvh9-7528).
_STRIPPED_TEMPLATE_KWARGS = ("tokenize", "chat_template", "return_dict", "return_assistant_tokens_mask")
MAX_N = 128
MAX_TOKENS = 10_000_000


async def read_body(request: Request, *, limit: int, body_timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length is not a number.")
        if int(declared) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout("The request body was not received in time.") from None
    except ClientDisconnect:
        raise
    return b"".join(chunks)


def parse_json_object(request: Request, raw: bytes) -> dict[str, Any]:
    content_type = request.headers.get("content-type")
    if content_type is not None and content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise BadRequest("The request body must be JSON (Content-Type: application/json).", code="invalid_content_type")
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson also refuses nesting deeper than 1024 levels here, so a JSON bomb is a 400 too.
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return data


def model_name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise BadRequest("You must provide a model parameter.", param="model", code="missing_model")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string.", param="model", code="invalid_model")
    return model


def messages_are_objects(body: dict[str, Any]) -> None:
    messages = body["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("'messages' must be a non-empty list of message objects.", param="messages")


def prompt_or_messages(body: dict[str, Any]) -> None:
    """/tokenize: a completion's ``prompt`` or a chat's ``messages``."""
    if "prompt" not in body and "messages" not in body:
        raise BadRequest("'prompt' or 'messages' is required.", param="prompt", code="missing_field")


def documents_are_a_list(body: dict[str, Any]) -> None:
    if not isinstance(body.get("documents"), list):
        raise BadRequest("'documents' must be a list.", param="documents", code="missing_field")


@dataclass(frozen=True)
class BodyRule:
    """What an endpoint's JSON body must hold besides ``model``: fields that must be present, then checks
    run in order once they are (each raises ``BadRequest``)."""

    required: tuple[str, ...] = ()
    checks: tuple[Callable[[dict[str, Any]], None], ...] = ()


def check_fields(body: dict[str, Any], rule: BodyRule) -> bool:
    """Validate what the gateway relies on; strip what must not pass. Returns the ``stream`` flag."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream")
    for required in rule.required:
        if required not in body:
            raise BadRequest(f"'{required}' is required.", param=required, code="missing_field")
    for check in rule.checks:
        check(body)
    _check_int(body, "n", 1, MAX_N)
    _check_int(body, "max_tokens", 1, MAX_TOKENS)
    _check_int(body, "max_completion_tokens", 1, MAX_TOKENS)
    for name in _STRIPPED_FIELDS:
        body.pop(name, None)
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict):
        for name in _STRIPPED_TEMPLATE_KWARGS:
            kwargs.pop(name, None)
    return stream


def _check_int(body: dict[str, Any], name: str, low: int, high: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer from {low} to {high}.", param=name)
