"""Reshaping chat content parts into the form an engine dialect accepts (pure: no I/O).

``plan_messages`` rewrites every list ``content`` in place into canonical parts — text parts as
``{"type": "text", ...}``, images as ``{"type": "image_url", "image_url": {"url": ...}}`` whatever the
client sent (bare string, ``input_image``, no ``type``) — and returns one ``MediaJob`` per media
reference; the normalizer resolves the jobs and writes each result into its ``target``. Keys it
does not know (``detail``, ``uuid``, LMDeploy's ``max_dynamic_patch``, Qwen's ``min_pixels``) stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.media import failures

Dialect = Literal["openai", "lmdeploy", "lightllm", "transformers"]
DIALECTS: frozenset[str] = frozenset({"openai", "lmdeploy", "lightllm", "transformers"})
MediaKind = Literal["image", "video", "audio", "input_audio"]

_TEXT = frozenset({"text", "input_text", "output_text"})
_OPENAI_ONLY_TEXT = frozenset({"refusal", "thinking"})
_AV: dict[str, MediaKind] = {"video_url": "video", "audio_url": "audio"}
# Known, deliberately refused: embeddings (vLLM's prompt_embeds went through torch.load),
# engine-private forms, and file references the gateway cannot resolve.
_REFUSED = {
    "image_embeds": "image embeddings",
    "audio_embeds": "audio embeddings",
    "video_embeds": "video embeddings",
    "prompt_embeds": "prompt embeddings",
    "image_pil": "PIL images",
    "image": "'image' parts (use image_url)",
    "image_data": "'image_data' parts (use image_url)",
    "video": "'video' parts (use video_url)",
    "audio": "'audio' parts (use audio_url)",
    "time_series": "time series input",
    "time_series_url": "time series input",
    "file": "file parts",
    "input_file": "file parts",
    "tool_reference": "tool_reference parts",
}
_SHORTHAND = ("image_url", "video_url", "audio_url", "input_audio")


@dataclass
class MediaJob:
    kind: MediaKind
    source: str  # URL, data: URL, raw base64 or path (input_audio: base64)
    target: dict[str, Any]  # the dict whose ``key`` receives the result
    key: str  # "url" (or "data" for input_audio)
    param: str


def _part_type(part: dict[str, Any], param: str) -> str:
    kind = part.get("type")
    if kind is None:
        for key in _SHORTHAND:  # vLLM accepts a part without "type" that has one of these keys
            if key in part:
                return key
        raise failures.bad_part("a content part has no 'type'", param)
    if not isinstance(kind, str):
        raise failures.bad_part("a content part's 'type' must be a string", param)
    return kind


def _url_object(value: object, param: str) -> tuple[dict[str, Any], str]:
    """``{"url": ...}`` (extra keys kept) from an object or a bare string; also LMDeploy's ``{"data": ...}``."""
    if isinstance(value, str):
        return {"url": value}, value
    if not isinstance(value, dict):
        raise failures.bad_part("a media value must be an object with a 'url' or a string", param)
    target = dict(value)
    source = target.get("url")
    if source is None and "data" in target:
        source = target.pop("data")
        target["url"] = source
    if not isinstance(source, str) or not source:
        raise failures.invalid_url(param, "'url' must be a non-empty string")
    return target, source


def _image(part: dict[str, Any], kind: str, param: str, jobs: list[MediaJob]) -> dict[str, Any]:
    extras = {k: v for k, v in part.items() if k not in ("type", "image_url")}
    if kind == "input_image":  # Responses API: {"type": "input_image", "image_url": "...", "detail": ...}
        if "image_url" not in part:
            raise failures.bad_part("input_image needs an 'image_url' (file_id is not supported)", param)
        target, source = _url_object(part["image_url"], param + ".image_url")
        if "detail" in extras:
            target.setdefault("detail", extras.pop("detail"))
        extras.pop("file_id", None)
    else:
        target, source = _url_object(part.get("image_url"), param + ".image_url")
    jobs.append(MediaJob("image", source, target, "url", param + ".image_url"))
    return {**extras, "type": "image_url", "image_url": target}


def _text(part: dict[str, Any], kind: str, dialect: str, param: str) -> dict[str, Any]:
    """``input_text``/``output_text`` become ``text`` everywhere; ``refusal`` only for non-openai dialects."""
    if kind == "text" or (kind == "refusal" and dialect == "openai"):
        return part
    field = "text" if kind in _TEXT else kind  # refusal parts carry their text under "refusal"
    text = part.get(field)
    if not isinstance(text, str):
        raise failures.bad_part(f"a {kind} part needs a string '{field}'", param)
    extras = {k: v for k, v in part.items() if k not in ("type", field)}
    return {**extras, "type": "text", "text": text}


def _part(part: object, dialect: str, param: str, jobs: list[MediaJob]) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise failures.bad_part("content parts must be objects", param)
    kind = _part_type(part, param)
    if kind in _TEXT or kind == "refusal":
        return _text(part, kind, dialect, param)
    if kind in ("image_url", "input_image"):
        return _image(part, kind, param, jobs)
    if kind in _OPENAI_ONLY_TEXT:
        if dialect == "openai":
            return part
        raise failures.unsupported_content(f"'{kind}' parts", param)
    if kind in _AV or kind == "input_audio":
        what = "audio input" if kind != "video_url" else "video input"
        if dialect != "openai":
            raise failures.unsupported_content(what, param)
        if kind == "input_audio":
            value = part.get("input_audio")
            if not isinstance(value, dict) or not isinstance(value.get("data"), str):
                raise failures.bad_part("input_audio needs an object with base64 'data'", param)
            target = dict(value)
            jobs.append(MediaJob("input_audio", value["data"], target, "data", param + ".input_audio"))
            return {**part, "type": "input_audio", "input_audio": target}
        target, source = _url_object(part.get(kind), f"{param}.{kind}")
        jobs.append(MediaJob(_AV[kind], source, target, "url", f"{param}.{kind}"))
        return {**part, "type": kind, kind: target}
    if kind in _REFUSED:
        raise failures.unsupported_content(_REFUSED[kind], param)
    raise failures.bad_part(f"unknown content part type '{kind[:40]}'", param)


def plan_messages(messages: object, dialect: str) -> list[MediaJob]:
    """Rewrite ``messages`` in place into canonical parts; return the media references to resolve."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}")
    jobs: list[MediaJob] = []
    if not isinstance(messages, list):
        return jobs
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if not isinstance(content, list):
            continue
        message["content"] = [_part(p, dialect, f"messages[{i}].content[{j}]", jobs) for j, p in enumerate(content)]
    return jobs


def needs_work(body: object) -> bool:
    """True if some message has list content with a part other than ``{"type": "text"}``. Cheap."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return False
    for message in messages:
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        return True
    return False
