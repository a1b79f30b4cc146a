"""``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: a multipart form whose ``model`` is a field.

The body is read once, under the same size limit and clock as a JSON body (gateway/proxy/body.py); the
``model`` and ``stream`` fields are found by scanning the form in place (the audio part is never copied or
decoded), and the form goes to the engine byte for byte, only the ``model`` field's value replaced when the
engine names the model otherwise. Then it is a passthrough like any other: routing, capability
(``transcription``), admission, the relay's clocks and cancellation.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response

from gateway.deps import StateDep
from gateway.http.endpoints import TRANSCRIPTIONS, TRANSLATIONS, Endpoint
from gateway.http.errors import BadRequest
from gateway.proxy.body import read_body
from gateway.proxy.claim import claim_for
from gateway.proxy.pipeline import relay, route

router = APIRouter()

_BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)
_NAME = re.compile(rb'(?im)^content-disposition:[^\r\n]*?;\s*name="([^"]*)"')
_FIELDS = (b"model", b"stream")


def form_fields(raw: bytes, boundary: bytes) -> dict[bytes, tuple[int, int]]:
    """Where the values of the form's ``model`` and ``stream`` fields lie in ``raw`` (start, end), found in place."""
    delimiter = b"--" + boundary
    found: dict[bytes, tuple[int, int]] = {}
    at = raw.find(delimiter)
    while at >= 0:
        head = at + len(delimiter)
        if raw[head : head + 2] == b"--":
            break  # the closing delimiter
        head_end = raw.find(b"\r\n\r\n", head)
        if head_end < 0:
            break
        end = raw.find(b"\r\n" + delimiter, head_end)
        if end < 0:
            break
        name = _NAME.search(raw, head, head_end)
        if name is not None and name.group(1) in _FIELDS and name.group(1) not in found:
            found[name.group(1)] = (head_end + 4, end)
        at = end + 2
    return found


async def _forward_form(request: Request, state: StateDep, endpoint: Endpoint) -> Response:
    settings = state.config.server
    content_type = request.headers.get("content-type", "")
    boundary = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith("multipart/form-data") or boundary is None:
        raise BadRequest(
            "The request body must be a multipart form (multipart/form-data).", code="invalid_content_type"
        )
    raw = await read_body(request, limit=settings.max_body_bytes, body_timeout=settings.body_timeout)
    fields = form_fields(raw, boundary.group(1).encode("latin-1"))
    if b"model" not in fields:
        raise BadRequest("You must provide a model parameter.", param="model", code="missing_model")
    start, end = fields[b"model"]
    try:
        name = raw[start:end].decode()
    except UnicodeDecodeError:
        raise BadRequest("'model' must be text.", param="model", code="invalid_model") from None
    entry = route(request, state, name, endpoint)
    stream = False
    if b"stream" in fields:
        s, e = fields[b"stream"]
        stream = raw[s:e].strip().lower() == b"true"
    if entry.request_model != name:
        raw = raw[:start] + entry.request_model.encode() + raw[end:]
    return await relay(
        request,
        state,
        entry,
        raw,
        path=endpoint.upstream_path,
        stream=stream,
        stream_end=endpoint.stream_end,
        errors=endpoint.errors,
        content_type=content_type,
        claim=claim_for(request, entry),  # no JSON body, no prompt: the priority, and an X-Session-ID if any
    )


@router.post(TRANSCRIPTIONS.path, name="audio_transcriptions")
async def transcriptions(request: Request, state: StateDep) -> Response:
    return await _forward_form(request, state, TRANSCRIPTIONS)


@router.post(TRANSLATIONS.path, name="audio_translations")
async def translations(request: Request, state: StateDep) -> Response:
    return await _forward_form(request, state, TRANSLATIONS)
