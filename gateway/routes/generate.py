"""``POST /generate`` and ``/generate_stream``: LightLLM's own API (seed 001), relayed to a ``lightllm`` engine.

The body reaches the engine as LightLLM reads it (``inputs``, ``parameters``, ``multimodal_params``) with
three changes: ``model`` (optional; default the first model in config order whose engine serves
``generate``) and ``stream`` (or the ``/generate_stream`` path) are taken out, and every image is fetched or
decoded and checked here and sent as ``{"type": "base64"}`` — the engine never fetches a URL. Answers pass
through unchanged; LightLLM's streams have no ``[DONE]``, and its HTTP 417 ``{"message"}`` errors are
reshaped into ours by the relay, keeping 417.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response

from gateway.deps import GatewayState, StateDep
from gateway.http.endpoints import GENERATE, GENERATE_STREAM
from gateway.http.errors import BadRequest, MediaError
from gateway.media import MediaNormalizer, failures
from gateway.media.urls import reference_kind
from gateway.proxy.admission import while_connected
from gateway.proxy.body import parse_json_object, read_body
from gateway.proxy.claim import claim_for
from gateway.proxy.pipeline import relay, route
from gateway.proxy.relay import Relay
from gateway.routes.simple import chosen_model

router = APIRouter()

_IMAGES = "multimodal_params.images"


def _image_ref(item: Any, param: str) -> str | None:
    """What to resolve for one LightLLM image item, or None for one that carries no image (``image_size``)."""
    if not isinstance(item, dict) or not isinstance(item.get("type"), str):
        raise BadRequest("Each image must be an object with a 'type' and 'data'.", param=param)
    kind, data = item["type"], item.get("data")
    if kind == "image_size":
        return None
    if kind not in ("url", "base64"):
        raise BadRequest("An image 'type' must be url, base64 or image_size.", param=param + ".type")
    if not isinstance(data, str) or not data:
        raise BadRequest("An image needs its 'data' as a non-empty string.", param=param + ".data")
    if kind == "url":
        # Only what LightLLM itself would fetch: a URL here is never read as a local path.
        if reference_kind(data) not in ("http", "data"):
            raise failures.forbidden(param + ".data")
        return data
    # Raw base64 resolved as a data: URL, so that it is decoded and checked, never taken for a path.
    return data if reference_kind(data) == "data" else "data:;base64," + data


async def inline_images(multimodal: Any, media: MediaNormalizer) -> None:
    """Rewrite ``multimodal_params`` in place: every image a checked ``{"type": "base64", "data": ...}``."""
    if not isinstance(multimodal, dict):
        raise BadRequest("'multimodal_params' must be an object.", param="multimodal_params")
    for key, value in multimodal.items():
        if key != "images" and value:
            # Audio and anything newer would reach the engine unchecked (and its URLs fetched by it).
            raise failures.unsupported_content(f"'multimodal_params.{key[:40]}'", f"multimodal_params.{key[:40]}")
    images = multimodal.get("images")
    if images is None:
        return
    if not isinstance(images, list):
        raise BadRequest(f"'{_IMAGES}' must be a list.", param=_IMAGES)
    jobs = [
        (item, ref, f"{_IMAGES}[{i}]")
        for i, item in enumerate(images)
        if (ref := _image_ref(item, f"{_IMAGES}[{i}]")) is not None
    ]
    limit = media.config.max_images_per_request
    if len(jobs) > limit:
        raise MediaError(
            f"The request has {len(jobs)} images; at most {limit} are accepted.", code=failures.TOO_MANY, param=_IMAGES
        )
    try:
        # TaskGroup: the first refusal cancels the other fetches.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(media.resolve_image(ref, param=param + ".data")) for _, ref, param in jobs]
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None
    for (item, _, _), task in zip(jobs, tasks, strict=True):
        item["type"] = "base64"
        item["data"] = task.result().partition(",")[2]


async def generate_request(request: Request, state: GatewayState, *, stream_path: bool) -> Relay:
    settings = state.config.server
    raw = await read_body(request, limit=settings.max_body_bytes, body_timeout=settings.body_timeout)
    body = parse_json_object(request, raw)
    entry = route(request, state, chosen_model(state, body, "generate"), GENERATE)
    body.pop("model", None)
    stream = body.pop("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream")
    stream = stream or stream_path
    if not isinstance(body.get("inputs"), str):
        raise BadRequest(
            "'inputs' is required: the raw prompt string (no chat template is applied).",
            param="inputs",
            code="missing_field",
        )
    if not isinstance(body.get("parameters", {}), dict):
        raise BadRequest("'parameters' must be an object.", param="parameters")
    claim = claim_for(request, entry, body, GENERATE.capability)  # a bad X-Priority before any image is fetched
    if body.get("multimodal_params") is not None:
        # Before a replica is chosen: a slow image must not hold an engine's slot.
        await while_connected(request, inline_images(body["multimodal_params"], state.media))
    row = GENERATE_STREAM if stream else GENERATE
    return await relay(
        request, state, entry, body, path=row.upstream_path, stream=stream, stream_end=row.stream_end, claim=claim
    )


@router.post("/generate")
async def generate(request: Request, state: StateDep) -> Response:
    return await generate_request(request, state, stream_path=False)


@router.post("/generate_stream")
async def generate_stream(request: Request, state: StateDep) -> Response:
    return await generate_request(request, state, stream_path=True)
