"""The simple endpoints (seed 004): a prompt and at most one image in, one text out.

``POST /infer`` and ``/analyze`` take JSON, ``/infer/upload`` and ``/analyze/upload`` multipart with a
``file``. Each builds one chat completion request and sends it down the pipeline's own pieces as the
endpoint table's CHAT row (``route`` → image through ``MediaNormalizer`` → ``relay``). A non-stream
answer is reshaped by the relay's transform hook into ``{"id", "model", "text", "finish_reason",
"usage"}`` (+ ``"task"``); a stream is the engine's chat completion SSE, unchanged.

``model`` is optional: the default is the first model in the config (in config order) whose engine
serves chat completions.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from engines.adapters import Capability
from gateway.deps import GatewayState, StateDep
from gateway.http.endpoints import CHAT
from gateway.http.errors import BadRequest, MediaError
from gateway.media import failures
from gateway.proxy.admission import while_connected
from gateway.proxy.body import check_fields, model_name, parse_json_object, read_body
from gateway.proxy.claim import claim_for
from gateway.proxy.pipeline import relay, route
from gateway.proxy.relay import Relay

router = APIRouter()

# The instruction sent for each /analyze task; a free ``question`` is sent as it is.
TASKS: dict[str, str] = {
    "describe": "Describe this image in detail: the main subject, the setting, and anything notable.",
    "ocr": "Transcribe all text visible in this image exactly as written, keeping its line breaks. "
    "If there is no text, answer: No text found.",
    "objects": "List the distinct objects visible in this image, one per line, each with a few words on "
    "where it is in the image.",
}
_OPTIONS = frozenset({"model", "max_tokens", "temperature", "top_p", "system", "stream"})
INFER_FIELDS = _OPTIONS | {"prompt", "image"}
ANALYZE_FIELDS = _OPTIONS | {"image", "task", "question"}
_FORM_TYPES: dict[str, Callable[[str], Any]] = {"max_tokens": int, "temperature": float, "top_p": float}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# Room for the text fields of an upload beyond the image itself: a long prompt fits, a second image does not.
FORM_SLACK = 1 << 20

ImageLoader = Callable[[], Awaitable[str]]


def default_model(state: GatewayState, capability: Capability) -> str:
    """The first configured model (config order) whose engine serves ``capability``."""
    for entry in state.pool.entries():
        if capability in entry.adapter.capabilities:
            return entry.spec.name
    raise BadRequest(
        "No configured model serves this endpoint; name one with 'model'.", param="model", code="missing_model"
    )


def chosen_model(state: GatewayState, fields: Mapping[str, Any], capability: Capability) -> str:
    if fields.get("model") in (None, ""):
        return default_model(state, capability)
    return model_name(dict(fields))


def check_known(fields: Mapping[str, Any], allowed: frozenset[str]) -> None:
    # A misspelt option silently ignored is worse than a 400 naming it.
    for name in fields:
        if name not in allowed:
            raise BadRequest(
                f"Unknown field '{str(name)[:40]}'; accepted: {', '.join(sorted(allowed))}.",
                param=str(name)[:40],
                code="unknown_field",
            )


def text_field(fields: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = fields.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required.", param=name, code="missing_field")
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'{name}' must be a non-empty string.", param=name)
    return value


def analyze_instruction(fields: Mapping[str, Any]) -> tuple[str, str]:
    """``(task, instruction)``: a known task's fixed instruction, or the client's ``question``."""
    task = fields.get("task")
    question = text_field(fields, "question")
    if question is not None:
        if task not in (None, "question"):
            raise BadRequest("Send either a 'task' or a 'question', not both.", param="question")
        return "question", question
    task = "describe" if task is None else task
    if task == "question":
        raise BadRequest("Task 'question' needs a 'question'.", param="question", code="missing_field")
    if not isinstance(task, str) or task not in TASKS:
        raise BadRequest(f"'task' must be one of: {', '.join(TASKS)}, question.", param="task")
    return task, TASKS[task]


def chat_request(fields: Mapping[str, Any], text: str) -> dict[str, Any]:
    """The chat completion body, text only (the image part is added once it is resolved)."""
    system = text_field(fields, "system")
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
    body: dict[str, Any] = {"messages": messages}
    for name in ("temperature", "top_p"):
        value = fields.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise BadRequest(f"'{name}' must be a number.", param=name)
    for name in ("max_tokens", "temperature", "top_p", "stream"):
        if fields.get(name) is not None:
            body[name] = fields[name]
    return body


def simple_answer(data: dict[str, Any], *, model: str, task: str | None) -> dict[str, Any]:
    """The transform hook: a chat completion → the simple answer. Raises on an unexpected shape (502)."""
    choice = data["choices"][0]
    text = (choice.get("message") or {}).get("content") or ""
    if not isinstance(text, str):
        raise TypeError("content is not text")
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    answer: dict[str, Any] = {
        "id": data.get("id"),
        "model": model,
        "text": text,
        "finish_reason": choice.get("finish_reason"),
        "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage},
    }
    if task is not None:
        answer["task"] = task
    return answer


async def ask(
    request: Request,
    state: GatewayState,
    fields: Mapping[str, Any],
    *,
    text: str,
    task: str | None,
    image: ImageLoader | None,
    image_param: str,
) -> Relay:
    body = chat_request(fields, text)
    entry = route(request, state, chosen_model(state, fields, "chat"), CHAT)
    stream = check_fields(body, CHAT.body)
    claim = claim_for(request, entry, body, CHAT.capability)  # a bad X-Priority before any image is fetched
    if image is not None:
        if state.media.config.max_images_per_request < 1:
            raise MediaError("This gateway accepts no images.", code=failures.TOO_MANY, param=image_param)
        # Resolved before a replica is chosen, as in forward(): a slow fetch must not hold an engine's slot.
        # The part is already canonical and checked, so normalize_chat has nothing left to do.
        part = {"type": "image_url", "image_url": {"url": await while_connected(request, image())}}
        body["messages"][-1]["content"].insert(0, part)
    body["model"] = entry.request_model
    transform = None if stream else partial(simple_answer, model=entry.spec.name, task=task)
    return await relay(
        request, state, entry, body, path=CHAT.upstream_path, stream=stream, transform=transform, claim=claim
    )


# -- reading the two kinds of body ------------------------------------------------------------------------


async def read_json(request: Request, state: GatewayState, allowed: frozenset[str]) -> dict[str, Any]:
    settings = state.config.server
    raw = await read_body(request, limit=settings.max_body_bytes, body_timeout=settings.body_timeout)
    fields = parse_json_object(request, raw)
    check_known(fields, allowed)
    return fields


def form_value(name: str, value: str) -> Any:
    """A multipart text field as the JSON value it stands for."""
    if name == "stream":
        lowered = value.strip().lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise BadRequest("'stream' must be true or false.", param="stream")
    convert = _FORM_TYPES.get(name)
    if convert is None:
        return value
    try:
        return convert(value.strip())
    except ValueError:
        kind = "an integer" if convert is int else "a number"
        raise BadRequest(f"'{name}' must be {kind}.", param=name) from None


async def read_upload(
    request: Request, state: GatewayState, allowed: frozenset[str]
) -> tuple[dict[str, Any], bytes | None]:
    """The text fields and the ``file`` bytes of a multipart body, capped near ``media.max_image_bytes``.

    The cap applies while reading (Content-Length first), so an oversized upload is a 413 before it is
    all received; a file under the cap but over ``max_image_bytes`` is the media error (400).
    """
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        raise BadRequest(
            "The request body must be multipart/form-data with a 'file' part.", code="invalid_content_type"
        )
    settings, media = state.config.server, state.media.config
    limit = min(settings.max_body_bytes, media.max_image_bytes + FORM_SLACK)
    raw = await read_body(request, limit=limit, body_timeout=settings.body_timeout)

    async def once() -> AsyncGenerator[bytes, None]:
        yield raw

    parser = MultiPartParser(request.headers, once(), max_files=1, max_fields=len(allowed))
    parser.spool_max_size = len(raw) + 1  # the body is in memory already: no temporary file on disk
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"The multipart body could not be read: {exc.message}", code="invalid_multipart") from None
    try:
        fields: dict[str, Any] = {}
        data: bytes | None = None
        for name, value in form.multi_items():
            if name == "file":
                if not isinstance(value, UploadFile):
                    raise BadRequest("'file' must be a file part (an image).", param="file")
                if value.size is not None and value.size > media.max_image_bytes:
                    raise failures.too_large_bytes(media.max_image_bytes, "file")
                data = await value.read()
                continue
            if isinstance(value, UploadFile):
                raise BadRequest(f"Only 'file' may be a file part, not '{name[:40]}'.", param=name[:40])
            check_known({name: value}, allowed)
            if name in fields:
                raise BadRequest(f"'{name}' is given twice.", param=name)
            fields[name] = form_value(name, value)
        return fields, data
    finally:
        await form.close()


def missing_image(param: str) -> BadRequest:
    what = "a 'file' part" if param == "file" else "'image' (an http(s) URL, a data: URL or base64)"
    return BadRequest(f"An image is required: send {what}.", param=param, code="missing_image")


# -- the endpoints ---------------------------------------------------------------------------------------


@router.post("/infer")
async def infer(request: Request, state: StateDep) -> Response:
    fields = await read_json(request, state, INFER_FIELDS)
    prompt = text_field(fields, "prompt", required=True)
    assert prompt is not None
    ref = text_field(fields, "image")
    image = None if ref is None else partial(state.media.resolve_image, ref, param="image")
    return await ask(request, state, fields, text=prompt, task=None, image=image, image_param="image")


@router.post("/infer/upload")
async def infer_upload(request: Request, state: StateDep) -> Response:
    fields, data = await read_upload(request, state, INFER_FIELDS - {"image"})
    prompt = text_field(fields, "prompt", required=True)
    assert prompt is not None
    if data is None:
        raise missing_image("file")
    image = partial(state.media.load_image_bytes, data, param="file")
    return await ask(request, state, fields, text=prompt, task=None, image=image, image_param="file")


@router.post("/analyze")
async def analyze(request: Request, state: StateDep) -> Response:
    fields = await read_json(request, state, ANALYZE_FIELDS)
    task, instruction = analyze_instruction(fields)
    ref = text_field(fields, "image")
    if ref is None:
        raise missing_image("image")
    image = partial(state.media.resolve_image, ref, param="image")
    return await ask(request, state, fields, text=instruction, task=task, image=image, image_param="image")


@router.post("/analyze/upload")
async def analyze_upload(request: Request, state: StateDep) -> Response:
    fields, data = await read_upload(request, state, ANALYZE_FIELDS - {"image"})
    task, instruction = analyze_instruction(fields)
    if data is None:
        raise missing_image("file")
    image = partial(state.media.load_image_bytes, data, param="file")
    return await ask(request, state, fields, text=instruction, task=task, image=image, image_param="file")
