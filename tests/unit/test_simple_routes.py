"""The pure parts of the simple endpoints and /generate: field checks, the answer transform, image inlining."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import pytest
from PIL import Image

from gateway.http.errors import BadRequest, MediaError, UpstreamError
from gateway.media import MediaConfig, MediaNormalizer
from gateway.proxy.relay import _transformed
from gateway.proxy.sse import Outcome
from gateway.routes.generate import inline_images
from gateway.routes.simple import TASKS, analyze_instruction, chat_request, check_known, form_value, simple_answer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), "blue").save(out, format="PNG")
    return out.getvalue()


COMPLETION = {
    "id": "chatcmpl-1",
    "model": "engine-name",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "prompt_tokens_details": None},
}


def test_simple_answer_shape() -> None:
    assert simple_answer(COMPLETION, model="chat", task=None) == {
        "id": "chatcmpl-1",
        "model": "chat",
        "text": "hi",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    assert simple_answer(COMPLETION, model="chat", task="ocr")["task"] == "ocr"
    no_content = {"choices": [{"message": {"content": None}, "finish_reason": "tool_calls"}]}
    assert simple_answer(no_content, model="m", task=None)["text"] == ""


@pytest.mark.parametrize(
    "data",
    [{"choices": []}, {"object": "x"}, ["not", "an", "object"], {"choices": [{"message": {"content": ["parts"]}}]}],
)
def test_unexpected_answer_shape_is_502(data: Any) -> None:
    outcome = Outcome()
    with pytest.raises(UpstreamError) as info:
        _transformed(lambda d: simple_answer(d, model="m", task=None), data, outcome)
    assert info.value.status == 502 and outcome.error_kind == "bad_response"


def test_analyze_instruction() -> None:
    assert analyze_instruction({}) == ("describe", TASKS["describe"])
    assert analyze_instruction({"task": "objects"}) == ("objects", TASKS["objects"])
    assert analyze_instruction({"question": "how many?"}) == ("question", "how many?")
    assert analyze_instruction({"task": "question", "question": "why?"}) == ("question", "why?")
    for bad in (
        {"task": "ocr", "question": "q"},
        {"task": "question"},
        {"task": "paint"},
        {"task": 3},
        {"question": "  "},
    ):
        with pytest.raises(BadRequest):
            analyze_instruction(bad)


def test_chat_request_and_field_checks() -> None:
    body = chat_request({"system": "s", "temperature": 0, "top_p": 0.9, "max_tokens": 4, "stream": True}, "go")
    assert body == {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "go"}]}],
        "temperature": 0,
        "top_p": 0.9,
        "max_tokens": 4,
        "stream": True,
    }
    with pytest.raises(BadRequest) as info:
        chat_request({"temperature": True}, "go")
    assert info.value.param == "temperature"
    with pytest.raises(BadRequest) as info:
        check_known({"prompt": "x", "promt": "y"}, frozenset({"prompt"}))
    assert info.value.code == "unknown_field" and info.value.param == "promt"


def test_form_values() -> None:
    assert form_value("max_tokens", " 12 ") == 12
    assert form_value("temperature", "0.5") == 0.5
    assert form_value("stream", "TRUE") is True and form_value("stream", "0") is False
    assert form_value("prompt", " keep spaces ") == " keep spaces "
    for name, value in (("max_tokens", "1.5"), ("top_p", "high"), ("stream", "maybe")):
        with pytest.raises(BadRequest) as info:
            form_value(name, value)
        assert info.value.param == name


class FakeMedia:
    """``resolve_image`` for URLs without a network; the first URL containing "slow" never finishes."""

    def __init__(self, limit: int = 16) -> None:
        self.config = MediaConfig(max_images_per_request=limit)
        self.cancelled = 0

    async def resolve_image(self, ref: str, *, param: str | None = None) -> str:
        if "slow" in ref:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if "bad" in ref:
            await asyncio.sleep(0.01)
            raise MediaError("refused", param=param)
        return "data:image/png;base64,QUJD"


async def test_inline_images_rewrites_urls_and_keeps_sizes() -> None:
    params: dict[str, Any] = {
        "images": [
            {"type": "url", "data": "https://example.com/a.png", "uuid": 1},
            {"type": "image_size", "data": [4, 4]},
        ]
    }
    await inline_images(params, FakeMedia())  # type: ignore[arg-type]
    assert params["images"] == [{"type": "base64", "data": "QUJD", "uuid": 1}, {"type": "image_size", "data": [4, 4]}]


async def test_inline_images_first_refusal_cancels_the_rest() -> None:
    media = FakeMedia()
    params = {
        "images": [
            {"type": "url", "data": "https://example.com/slow.png"},
            {"type": "url", "data": "https://example.com/bad.png"},
        ]
    }
    with pytest.raises(MediaError) as info:
        await asyncio.wait_for(inline_images(params, media), 5)  # type: ignore[arg-type]
    assert info.value.param == "multimodal_params.images[1].data" and media.cancelled == 1


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"images": [{"type": "url", "data": "/etc/passwd"}]}, "image_url_forbidden"),
        ({"images": [{"type": "file", "data": "x"}]}, "invalid_request"),
        ({"images": [{"type": "url"}]}, "invalid_request"),
        ({"images": "https://example.com/a.png"}, "invalid_request"),
        ({"audios": [{"type": "url", "data": "https://example.com/a.wav"}]}, "unsupported_content"),
        ({"images": [{"type": "url", "data": "https://example.com/a.png"}] * 3}, "too_many_images"),
    ],
)
async def test_inline_images_refusals(params: dict[str, Any], code: str) -> None:
    with pytest.raises(BadRequest) as info:
        await inline_images(params, FakeMedia(limit=2))  # type: ignore[arg-type]
    assert info.value.code == code


async def test_inline_images_checks_base64_for_real() -> None:
    async with MediaNormalizer(MediaConfig()) as media:
        raw = base64.b64encode(png()).decode()
        params: dict[str, Any] = {
            "images": [{"type": "base64", "data": raw}, {"type": "base64", "data": "data:image/png;base64," + raw}]
        }
        await inline_images(params, media)
        assert [base64.b64decode(i["data"]) for i in params["images"]] == [png(), png()]
        for data in ("bm90IGFuIGltYWdlIGF0IGFsbA==", "/etc/passwd"):
            with pytest.raises(MediaError):
                await inline_images({"images": [{"type": "base64", "data": data}]}, media)
