"""Request validation, prompt and media handling, and deterministic output, in each engine's dialect.

The "model" echoes the last user message word by word (an ``[images=N]`` token first when images came in),
so a test can see what reached the engine. Token counts are whitespace-split words (+1 per image); no
tokenizer is involved. Stream shapes follow ENGINES.md §7: vLLM keeps explicit nulls and sends a role-only
first chunk; LMDeploy drops nulls and puts ``role`` on every delta.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import itertools
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from _cli import EngineConfig

DEFAULT_MAX_TOKENS = 16
EMBED_DIM = 16
_MISSING = object()
_TYPES: dict[str, tuple[tuple[type, ...], str, str]] = {
    "str": ((str,), "string_type", "Input should be a valid string"),
    "int": ((int,), "int_type", "Input should be a valid integer"),
    "num": ((int, float), "float_type", "Input should be a valid number"),
    "bool": ((bool,), "bool_type", "Input should be a valid boolean"),
    "list": ((list,), "list_type", "Input should be a valid list"),
    "dict": ((dict,), "dict_type", "Input should be a valid dictionary"),
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type_, headers


class Invalid(ApiError):
    """A body validation failure, rendered the way FastAPI/pydantic plus each engine's handler render it."""

    def __init__(self, errors: list[dict[str, Any]], engine: str) -> None:
        first = errors[0]
        loc = ".".join(str(p) for p in first["loc"][1:]) or None
        if engine == "vllm":
            msg = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}:\n"
            msg += "".join(f"  {e}\n" for e in errors)
            super().__init__(400, msg, loc, "Bad Request")
        else:
            text = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in errors)
            super().__init__(400, text, None)


def error_type(engine: str, status: int) -> str:
    if engine == "vllm":
        names = {
            400: "BadRequestError",
            401: "Unauthorized",
            404: "NotFoundError",
            422: "UnprocessableEntityError",
            429: "TooManyRequestsError",
            501: "NotImplementedError",
            503: "ServiceUnavailableError",
        }
        return names.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(engine: str, status: int, message: str, param: str | None = None, type_: str | None = None) -> dict:
    inner = {"message": message, "type": type_ or error_type(engine, status), "param": param, "code": status}
    if engine == "vllm":
        return {"error": inner}
    return {"message": message, "type": inner["type"], "code": status, "param": param, "object": "error"}


def check_fields(body: Any, spec: dict[str, tuple[str, bool]], engine: str) -> None:
    """``spec``: field -> (kind, required); kind may be "a|b" for a union."""
    if not isinstance(body, dict):
        raise Invalid(
            [
                {
                    "type": "model_attributes_type",
                    "loc": ("body",),
                    "msg": "Input should be a valid dictionary or object to extract fields from",
                    "input": body,
                }
            ],
            engine,
        )
    errors: list[dict[str, Any]] = []
    for name, (kinds, required) in spec.items():
        value = body.get(name, _MISSING)
        if value is _MISSING or (value is None and not required):
            if required:
                errors.append({"type": "missing", "loc": ("body", name), "msg": "Field required", "input": body})
            continue
        options = [_TYPES[k] for k in kinds.split("|")]
        # bool is an int subclass in Python; pydantic's strictness here is what the engines show
        if not any(isinstance(value, t) and not (isinstance(value, bool) and bool not in t) for t, _, _ in options):
            errors.append({"type": options[0][1], "loc": ("body", name), "msg": options[0][2], "input": value})
    if errors:
        raise Invalid(errors, engine)


CHAT_FIELDS = {
    "messages": ("list", True),
    "stream": ("bool", False),
    "stream_options": ("dict", False),
    "max_tokens": ("int", False),
    "max_completion_tokens": ("int", False),
    "n": ("int", False),
    "temperature": ("num", False),
    "top_p": ("num", False),
    "stop": ("str|list", False),
    "ignore_eos": ("bool", False),
    "tools": ("list", False),
}
COMPLETION_FIELDS = {
    **{k: v for k, v in CHAT_FIELDS.items() if k not in ("messages", "tools")},
    "prompt": ("str|list", True),
}


def check_sampling(body: dict, cfg: EngineConfig) -> None:
    engine = cfg.engine
    if body.get("stream_options") is not None and not body.get("stream"):
        if engine == "vllm":  # 0.32: its own check, not pydantic's
            raise ApiError(
                400,
                "Stream options can only be defined when `stream=True`. (parameter=stream_options)",
                "stream_options",
            )
        raise Invalid(
            [
                {
                    "type": "value_error",
                    "loc": ("body",),
                    "input": body,
                    "msg": "Value error, Stream options can only be defined when `stream=True`.",
                }
            ],
            engine,
        )
    mt = body.get("max_completion_tokens") if body.get("max_completion_tokens") is not None else body.get("max_tokens")
    if mt is not None and mt < 1:
        if engine == "vllm":
            raise ApiError(
                400, f"max_tokens must be at least 1, got {mt}. (parameter=max_tokens, value={mt})", "max_tokens"
            )
        raise ApiError(400, f"The max_tokens `{mt}` must be a positive integer.")
    if engine == "vllm" and mt is not None and mt > cfg.max_model_len:
        # 0.32: max_tokens alone above the context is a 400; prompt + max_tokens above it is clamped (plan()).
        raise ApiError(
            400,
            f"max_tokens={mt} cannot be greater than max_model_len={cfg.max_model_len}. Please request fewer output "
            f"tokens. (parameter=max_tokens, value={mt})",
            "max_tokens",
        )
    if engine == "vllm" and body.get("tools"):
        choice = body.get("tool_choice", "auto")
        if choice == "auto" and not (cfg.tool_parser and cfg.auto_tool_choice):
            raise ApiError(
                400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            )
        if choice == "required" and not cfg.tool_parser:
            raise ApiError(400, 'tool_choice="required" requires --tool-call-parser to be set')
        if isinstance(choice, dict) and not cfg.tool_parser:
            name = (choice.get("function") or {}).get("name")
            raise ApiError(400, f'tool_choice=function "{name}" requires --tool-call-parser to be set')
    if engine == "lmdeploy":
        top_p, temp, n = body.get("top_p"), body.get("temperature"), body.get("n")
        if top_p is not None and not 0 < top_p <= 1:
            raise ApiError(400, f"The top_p `{top_p}` must be in (0, 1].")
        if temp is not None and not 0 <= temp <= 2:
            raise ApiError(400, f"The temperature `{temp}` must be in [0, 2].")
        if n is not None and not 0 < n <= 128:
            raise ApiError(400, f"The n `{n}` must be in [1, 128].")
        if body.get("tools") and not cfg.tool_parser:
            raise ApiError(400, "Please launch the api_server with --tool-call-parser if you want to use tools.")


@dataclass
class Prompt:
    words: list[str]
    tokens: int
    images: int = 0
    media: list[dict[str, Any]] = field(default_factory=list)


_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((fmt for magic, fmt in _IMAGE_MAGIC if data.startswith(magic)), None)


def _host_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address literal in any form a resolver accepts (``127.1``, ``2130706433``, ``0x7f000001``); no DNS."""
    if host.lower().rstrip(".") in ("localhost",) or host.lower().endswith(".localhost"):
        return ipaddress.ip_address("127.0.0.1")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def load_media(url: str, kind: str, cfg: EngineConfig) -> dict[str, Any]:
    """What the engine would load for one media URL; nothing is ever fetched from the network."""
    vllm = cfg.engine == "vllm"
    fail = "Failed to load image." if vllm else "Request preprocessing failed."
    info: dict[str, Any] = {"kind": kind, "url": url[:120]}
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, _, payload = url[5:].partition(",")
        if ";base64" not in header:
            raise ApiError(501, "Only base64 data URLs are supported for now.") if vllm else ApiError(400, fail)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, fail) from None
        info.update(
            source="data", mime=header.split(";")[0], bytes=len(data), sha256=hashlib.sha256(data).hexdigest()[:16]
        )
    elif scheme in ("http", "https"):
        host = urlsplit(url).hostname or ""
        if cfg.allowed_media_domains is not None and host not in cfg.allowed_media_domains:
            raise ApiError(
                400,
                f"The URL must be from one of the allowed domains: {cfg.allowed_media_domains}. "
                f"Input URL domain: {host}"
                if vllm
                else f"URL is blocked for security reasons: domain {host!r} is not in --allowed-media-domains",
            )
        ip = _host_ip(host)
        if not vllm and ip is not None and not ip.is_global:
            raise ApiError(400, f"URL is blocked for security reasons: Blocked non-global IP detected: {ip}")
        info.update(source="http", fetched=False, host=host)
        return info
    elif scheme == "file" or (not vllm and not scheme and os.path.exists(url)):
        path = urlsplit(url).path if scheme == "file" else url
        if vllm:
            root = cfg.allowed_local_media_path
            if not root:
                raise ApiError(400, "Cannot load local files without `--allowed-local-media-path`.")
            if not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
                raise ApiError(400, f"The file path {path} must be a subpath of `--allowed-local-media-path` {root}.")
        try:
            with open(path, "rb") as fh:
                data = fh.read(1 << 20)
        except OSError:
            raise ApiError(400, fail) from None
        info.update(source="file", path=path, bytes=len(data))
    else:
        raise ApiError(400, "The URL must be either a HTTP, data or file URL." if vllm else fail)
    if kind == "image":
        info["format"] = _sniff(data)
        if info["format"] is None:
            raise ApiError(400, fail)
    return info


_TEXT_PARTS = {"vllm": ("text", "input_text", "output_text", "refusal", "thinking"), "lmdeploy": ("text",)}
_MEDIA_PARTS = {
    "vllm": {
        "image_url": "image",
        "input_image": "image",
        "video_url": "video",
        "audio_url": "audio",
        "input_audio": "audio",
    },
    "lmdeploy": {
        "image_url": "image",
        "image": "image",
        "image_data": "image",
        "video_url": "video",
        "video": "video",
        "audio_url": "audio",
        "audio": "audio",
        "time_series_url": "time_series",
        "time_series": "time_series",
    },
}


def _part_url(part: dict, ptype: str, engine: str) -> str:
    value = part.get(ptype)
    if ptype == "input_audio" and isinstance(value, dict):
        return f"data:audio/{value.get('format', 'wav')};base64,{value.get('data', '')}"
    if isinstance(value, dict):
        url = value.get("url") if engine == "vllm" else value.get("url", value.get("data"))
        if isinstance(url, str):
            return url
    if isinstance(value, str) and (engine == "lmdeploy" or ptype == "input_image"):
        return value
    raise Invalid(
        [
            {
                "type": "dict_type",
                "loc": ("body", "messages", ptype),
                "msg": "Input should be a valid dictionary",
                "input": value,
            }
        ],
        engine,
    )


def chat_prompt(body: dict, cfg: EngineConfig) -> Prompt:
    engine = cfg.engine
    words_total, last_user, media = 0, "", []
    for i, msg in enumerate(body["messages"]):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise Invalid(
                [{"type": "missing", "loc": ("body", "messages", i, "role"), "msg": "Field required", "input": msg}],
                engine,
            )
        content, texts = msg.get("content"), []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise ApiError(
                        400,
                        "Request preprocessing failed."
                        if engine == "lmdeploy"
                        else f"Invalid content part: {part!r:.40}",
                    )
                ptype = part.get("type")
                if ptype is None and engine == "vllm":  # vLLM's shorthand: the key names the kind
                    ptype = next((k for k in ("image_url", "audio_url", "video_url") if k in part), None)
                if ptype in _TEXT_PARTS[engine]:
                    texts.append(str(part.get("text", part.get(ptype, ""))))
                elif ptype in _MEDIA_PARTS[engine]:
                    url = _part_url(part, ptype, engine)
                    media.append(load_media(url, _MEDIA_PARTS[engine][ptype], cfg))
                else:
                    raise ApiError(
                        400, "Request preprocessing failed." if engine == "lmdeploy" else f"Unknown part type: {ptype}"
                    )
        elif content is not None:
            raise Invalid(
                [
                    {
                        "type": "string_type",
                        "loc": ("body", "messages", i, "content"),
                        "msg": "Input should be a valid string",
                        "input": content,
                    }
                ],
                engine,
            )
        text = " ".join(texts)
        words_total += len(text.split())
        if msg["role"] == "user" or not last_user:
            last_user = text
    images = sum(1 for m in media if m["kind"] == "image")
    if engine == "vllm" and images > cfg.image_limit:
        raise ApiError(
            400,
            f"At most {cfg.image_limit} image(s) may be provided in one prompt. "
            "Set `--limit-mm-per-prompt` to increase this limit.",
        )
    return Prompt(last_user.split(), words_total + len(media), images, media)


def completion_prompts(body: dict, engine: str) -> list[Prompt]:
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [Prompt(prompt.split(), len(prompt.split()))]
    if prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [Prompt([f"t{p}" for p in prompt], len(prompt))]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(Prompt(p.split(), len(p.split())))
        elif isinstance(p, list) and all(isinstance(t, int) for t in p):
            out.append(Prompt([f"t{t}" for t in p], len(p)))
        else:
            raise Invalid(
                [
                    {
                        "type": "string_type",
                        "loc": ("body", "prompt"),
                        "msg": "Input should be a valid string",
                        "input": p,
                    }
                ],
                engine,
            )
    if not out:
        raise ApiError(
            400, "Prompt cannot be empty." if engine == "vllm" else "prompt: List should have at least 1 item"
        )
    return out


def too_long_message(max_model_len: int) -> str:
    """vLLM 0.32's words for a prompt over the context (it tokenizes one token past the limit, no further)."""
    n = max_model_len + 1
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains at least "
        f"{n} input tokens, which exceeds this limit even without any output tokens. Please reduce the length of "
        f"the input prompt. (parameter=input_tokens, value={n})"
    )


def check_length(prompt: Prompt, cfg: EngineConfig) -> None:
    if cfg.engine == "vllm" and prompt.tokens > cfg.max_model_len:
        raise ApiError(400, too_long_message(cfg.max_model_len), "input_tokens")
    if cfg.engine == "lmdeploy" and prompt.tokens >= cfg.max_model_len:
        raise ApiError(
            400, f"Input length ({prompt.tokens}) must be smaller than the model context length ({cfg.max_model_len})."
        )


@dataclass
class Plan:
    tokens: list[str]
    finish: str
    stop_reason: str | None = None


def plan(prompt: Prompt, body: dict, cfg: EngineConfig) -> Plan:
    """The tokens one choice produces: the echo, cut by ``max_tokens`` (default 16) or a ``stop`` word."""
    mt = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    mt = max(1, min(mt, cfg.max_model_len - prompt.tokens))  # 0.33 clamps instead of failing
    words = ([f"[images={prompt.images}]"] if prompt.images else []) + prompt.words or ["ok"]
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    if body.get("ignore_eos"):
        words = list(itertools.islice(itertools.cycle(words), mt))
    finish, stop_reason = "stop", None
    for i, word in enumerate(words):
        if word in stops:
            words, stop_reason = words[:i], word
            break
    if len(words) > mt or (body.get("ignore_eos") and len(words) == mt):
        words, finish = words[:mt], "length"
    return Plan([w if i == 0 else " " + w for i, w in enumerate(words)], finish, stop_reason)


def new_id(prefix: str, request_id: str | None = None) -> str:
    return f"{prefix}-{request_id or os.urandom(8).hex()}"  # vLLM 0.32: 16 hex digits


def usage(prompt_tokens: int, completion: int, vllm_full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens": completion,
    }
    if vllm_full:
        out["prompt_tokens_details"] = None
    return out


def embed(text: str, dim: int) -> list[float]:
    """A unit vector from SHA-256 of the input: equal inputs give equal vectors, across runs and processes."""
    raw = b"".join(hashlib.sha256(f"{text}#{i}".encode()).digest() for i in range(dim * 4 // 32 + 1))
    vals = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dim}I", raw[: dim * 4])]
    norm = sum(v * v for v in vals) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in vals]


def embeddings_body(body: dict, model: str) -> dict[str, Any]:
    inp = body["input"]
    if isinstance(inp, str):
        items = [inp]
    elif inp and all(isinstance(t, int) for t in inp):
        items = [" ".join(f"t{t}" for t in inp)]
    else:
        items = [x if isinstance(x, str) else " ".join(f"t{t}" for t in x) for x in inp]
    if not items:
        raise ApiError(400, "Input cannot be empty.")
    dim = body.get("dimensions") or EMBED_DIM
    data = []
    for i, text in enumerate(items):
        vec = embed(text, dim)
        value: Any = vec
        if body.get("encoding_format") == "base64":
            value = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
        data.append({"index": i, "object": "embedding", "embedding": value})
    tokens = sum(len(t.split()) for t in items)
    return {
        "id": new_id("embd"),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": usage(tokens, 0, vllm_full=True),
    }


def rerank_body(body: dict, model: str) -> dict[str, Any]:
    query = set(str(body["query"]).lower().split())
    docs = [d if isinstance(d, str) else str(d.get("text", "")) for d in body["documents"]]
    results = []
    for i, doc in enumerate(docs):
        words = set(doc.lower().split())
        jitter = int(hashlib.sha256(doc.encode()).hexdigest()[:6], 16) / 2**24 / 100
        score = (len(query & words) + jitter) / (len(query) + 1)
        results.append({"index": i, "document": {"text": doc}, "relevance_score": round(score, 6)})
    results.sort(key=lambda r: -r["relevance_score"])
    if body.get("top_n"):
        results = results[: body["top_n"]]
    tokens = len(query) * len(docs) + sum(len(d.split()) for d in docs)
    return {"id": new_id("rerank"), "model": model, "usage": {"total_tokens": tokens}, "results": results}
