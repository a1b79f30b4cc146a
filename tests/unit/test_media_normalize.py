"""MediaNormalizer without the network: content parts per dialect, data: URLs, image checks (F9-F11)."""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image

from gateway.http.errors import BadRequest
from gateway.media import MediaConfig, MediaNormalizer, images
from gateway.media.images import gif_frame_count

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def encode(fmt: str, size: tuple[int, int] = (16, 12), **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, fmt, **save)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def gif_frames(n: int) -> bytes:
    frames = [Image.new("P", (2, 2), i % 200) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=10, optimize=False)
    return buf.getvalue()


def gif_bomb(frames: int) -> bytes:
    """A GIF of ``frames`` 1x1 frames, ~14 bytes each: a million frames fit in the byte cap."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame * frames + b"\x3b"


PNG, JPEG, WEBP, GIF, BMP = (encode(f) for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def body_with(*parts: Any, role: str = "user") -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": role, "content": list(parts)}],
    }


def content(body: dict[str, Any]) -> list[Any]:
    return body["messages"][1]["content"]


@pytest.fixture
async def normalizer() -> AsyncIterator[MediaNormalizer]:
    async with MediaNormalizer(MediaConfig(max_image_bytes="1MB", max_frames=50)) as n:
        yield n


async def refused(n: MediaNormalizer, *parts: Any, dialect: str = "openai") -> BadRequest:
    with pytest.raises(BadRequest) as info:
        await n.normalize_chat(body_with(*parts), dialect)
    return info.value


# ---------------------------------------------------------------- needs_work


def test_needs_work_is_true_only_for_non_text_parts() -> None:
    assert not MediaNormalizer.needs_work({"messages": [{"role": "user", "content": "hi"}]})
    assert not MediaNormalizer.needs_work(body_with({"type": "text", "text": "a"}))
    assert not MediaNormalizer.needs_work({"messages": "garbage"})
    assert not MediaNormalizer.needs_work({})
    assert MediaNormalizer.needs_work(body_with({"type": "image_url", "image_url": {"url": "x"}}))
    assert MediaNormalizer.needs_work(body_with("a bare string part"))
    assert MediaNormalizer.needs_work(body_with({"type": "input_text", "text": "a"}))


# ---------------------------------------------------------------- shapes per dialect


@pytest.mark.parametrize("dialect", ["openai", "lmdeploy", "lightllm", "transformers"])
async def test_every_image_form_becomes_an_image_url_object(normalizer: MediaNormalizer, dialect: str) -> None:
    body = body_with(
        "describe",
        {"type": "input_text", "text": "these"},
        {"type": "image_url", "image_url": data_url(PNG, "text/plain")},  # bare string, lying MIME
        {"type": "image_url", "image_url": {"url": data_url(JPEG), "detail": "high", "max_dynamic_patch": 6}},
        {"type": "input_image", "image_url": b64(WEBP), "detail": "low"},  # Responses style, raw base64
        {"image_url": {"url": data_url(GIF), "min_pixels": 3136}, "uuid": "img-1"},  # no "type"
        {"type": "image_url", "image_url": {"data": data_url(BMP)}},  # LMDeploy's {"data": ...}
    )
    await normalizer.normalize_chat(body, dialect)
    parts = content(body)
    assert parts[0] == {"type": "text", "text": "describe"}
    assert parts[1] == {"type": "text", "text": "these"}
    images = parts[2:]
    assert all(p["type"] == "image_url" and isinstance(p["image_url"], dict) for p in images)
    urls = [p["image_url"]["url"] for p in images]
    mimes = [u.split(";")[0] for u in urls]
    assert mimes == ["data:image/png", "data:image/jpeg", "data:image/webp", "data:image/gif", "data:image/bmp"]
    assert [base64.b64decode(u.split(",", 1)[1]) for u in urls] == [PNG, JPEG, WEBP, GIF, BMP]
    assert images[1]["image_url"]["detail"] == "high" and images[1]["image_url"]["max_dynamic_patch"] == 6
    assert images[2]["image_url"]["detail"] == "low"
    assert images[3]["image_url"]["min_pixels"] == 3136 and images[3]["uuid"] == "img-1"
    assert "data" not in images[4]["image_url"]
    assert body["messages"][0]["content"] == "be brief"


async def test_audio_and_video_pass_for_openai_only(normalizer: MediaNormalizer) -> None:
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(28)
    parts = [
        {"type": "video_url", "video_url": {"url": data_url(b"\x00\x00\x00\x18ftypmp42" + bytes(100), "video/mp4")}},
        {"type": "audio_url", "audio_url": data_url(wav, "audio/wav")},
        {"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}},
        {"type": "video_url", "video_url": {"url": f"data:video/jpeg;base64,{b64(JPEG)},{b64(JPEG)}"}},
    ]
    body = body_with(*parts)
    await normalizer.normalize_chat(body, "openai")
    out = content(body)
    assert out[0]["video_url"]["url"] == parts[0]["video_url"]["url"]
    assert out[1]["audio_url"] == {"url": parts[1]["audio_url"]}
    assert out[2]["input_audio"] == {"data": b64(wav), "format": "wav"}
    for dialect in ("lmdeploy", "lightllm", "transformers"):
        for part in parts:
            error = await refused(normalizer, part, dialect=dialect)
            assert error.code == "unsupported_content" and error.status == 400


@pytest.mark.parametrize(
    ("part", "code"),
    [
        ({"type": "hologram", "hologram": {}}, "invalid_request"),
        ({"text": "no type"}, "invalid_request"),
        (42, "invalid_request"),
        ({"type": "prompt_embeds", "prompt_embeds": "AAAA"}, "unsupported_content"),
        ({"type": "image_embeds", "image_embeds": "AAAA"}, "unsupported_content"),
        ({"type": "input_image", "file_id": "file-1"}, "invalid_request"),
        ({"type": "image_url", "image_url": {"detail": "auto"}}, "invalid_image_url"),
        ({"type": "image_url", "image_url": 7}, "invalid_request"),
        ({"type": "image_url", "image_url": "data:image/png,rawbytes"}, "invalid_image_url"),
        ({"type": "image_url", "image_url": "data:image/png;base64,@@@@"}, "invalid_image"),
        ({"type": "image_url", "image_url": "not base64 and not a path?"}, "image_url_forbidden"),
    ],
)
async def test_bad_parts(normalizer: MediaNormalizer, part: Any, code: str) -> None:
    error = await refused(normalizer, part)
    assert error.code == code and error.status == 400
    assert error.param is not None and error.param.startswith("messages[1].content[0]")


async def test_too_many_images() -> None:
    async with MediaNormalizer(MediaConfig(max_images_per_request=2)) as n:
        parts = [{"type": "image_url", "image_url": data_url(PNG)}] * 3
        error = await refused(n, *parts)
        assert error.code == "too_many_images"
        body = body_with(*parts[:2])
        await n.normalize_chat(body, "openai")


async def test_text_only_bodies_are_left_alone(normalizer: MediaNormalizer) -> None:
    body = body_with({"type": "text", "text": "a"}, {"type": "refusal", "refusal": "no"}, role="assistant")
    await normalizer.normalize_chat(body, "openai")
    assert content(body)[1] == {"type": "refusal", "refusal": "no"}
    await normalizer.normalize_chat(body, "lmdeploy")
    assert content(body)[1] == {"type": "text", "text": "no"}
    with pytest.raises(ValueError):
        await normalizer.normalize_chat(body, "klingon")


# ---------------------------------------------------------------- images: F9, F10, F11 inline


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (png_header(30000, 30000), "image_too_large"),  # F9: rejected from the header, never decoded
        (png_header(100_000, 1_000), "image_too_large"),
        (gif_frames(60), "image_too_large"),  # more frames than max_frames (50)
        (gif_bomb(500_000), "image_too_large"),
        (encode("TIFF"), "unsupported_image_format"),
        (b"%PDF-1.7\n" + bytes(100), "unsupported_image_format"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported_image_format"),
        (bytes(range(256)) * 4, "invalid_image"),  # F10
        (PNG[:30], "invalid_image"),
        (PNG[:-20], "invalid_image"),
        (JPEG[: len(JPEG) // 2], "invalid_image"),
        (png_header(0, 10), "invalid_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "invalid_image"),
    ],
    ids=[
        "30000x30000",
        "100000x1000",
        "60-frames",
        "500k-frames",
        "tiff",
        "pdf",
        "svg",
        "random",
        "png-cut-in-ihdr",
        "png-no-iend",
        "jpeg-truncated",
        "zero-width",
        "png-zero-chunks",
    ],
)
async def test_bad_inline_images(normalizer: MediaNormalizer, data: bytes, code: str) -> None:
    error = await refused(normalizer, {"type": "image_url", "image_url": {"url": data_url(data)}})
    assert error.code == code
    for leak in ("BytesIO", "0x", "PIL", "Traceback", "Error"):
        assert leak not in error.message


async def test_frame_counting_stops_early(normalizer: MediaNormalizer) -> None:
    bomb = gif_bomb(2_000_000)
    assert gif_frame_count(bomb, 100) == 101  # one past the limit, not two million
    error = await refused(normalizer, {"type": "image_url", "image_url": data_url(bomb, "image/gif")})
    assert error.code == "image_too_large"
    body = body_with({"type": "image_url", "image_url": data_url(gif_bomb(50))})
    await normalizer.normalize_chat(body, "openai")
    assert content(body)[0]["image_url"]["url"].startswith("data:image/gif;base64,")


async def test_pixel_cap_is_our_own_not_pils() -> None:
    # 50 MP passes PIL's own default bomb check (89.5 MP): the gateway's cap must catch it.
    async with MediaNormalizer(MediaConfig(max_image_pixels="40M")) as n:
        assert (await refused(n, {"type": "image_url", "image_url": data_url(png_header(10000, 5000))})).code == (
            "image_too_large"
        )
    async with MediaNormalizer(MediaConfig(max_image_pixels=100)) as n:
        error = await refused(n, {"type": "image_url", "image_url": data_url(encode("PNG", (11, 10)))})
        assert error.code == "image_too_large"
        await n.normalize_chat(
            body_with({"type": "image_url", "image_url": data_url(encode("PNG", (10, 10)))}), "openai"
        )


async def test_formats_outside_the_allowlist() -> None:
    async with MediaNormalizer(MediaConfig(allowed_formats=["png"])) as n:
        assert (await refused(n, {"type": "image_url", "image_url": data_url(JPEG)})).code == "unsupported_image_format"


async def test_oversized_data_url_is_refused_before_decoding() -> None:
    async with MediaNormalizer(MediaConfig(max_image_bytes=1000)) as n:
        error = await refused(n, {"type": "image_url", "image_url": "data:image/png;base64," + "A" * 10_000})
        assert error.code == "image_too_large"
        error = await refused(n, {"type": "input_audio", "input_audio": {"data": "A" * 10_000, "format": "wav"}})
        assert error.code == "image_too_large"


async def test_lenient_base64_is_reemitted_canonically(normalizer: MediaNormalizer) -> None:
    wrapped = "\n".join(b64(PNG)[i : i + 76] for i in range(0, len(b64(PNG)), 76))
    urlsafe = base64.urlsafe_b64encode(JPEG).decode().rstrip("=")
    body = body_with(
        {"type": "image_url", "image_url": "data:image/png;base64," + wrapped},
        {"type": "image_url", "image_url": "data:image/jpeg;base64," + urlsafe},
    )
    await normalizer.normalize_chat(body, "openai")
    assert content(body)[0]["image_url"]["url"] == data_url(PNG)
    assert content(body)[1]["image_url"]["url"] == data_url(JPEG, "image/jpeg")


async def test_cache_serves_a_resent_image(normalizer: MediaNormalizer) -> None:
    part = {"type": "image_url", "image_url": data_url(PNG)}
    await normalizer.normalize_chat(body_with(part), "openai")
    hits = normalizer.cache.hits
    await normalizer.normalize_chat(body_with({"type": "input_image", "image_url": b64(PNG)}), "openai")
    assert normalizer.cache.hits == hits + 1


async def test_load_image_bytes_for_uploads(normalizer: MediaNormalizer) -> None:
    assert await normalizer.load_image_bytes(WEBP) == data_url(WEBP, "image/webp")
    with pytest.raises(BadRequest) as info:
        await normalizer.load_image_bytes(b"GIF89a" + bytes(10))
    assert info.value.code == "invalid_image"
    with pytest.raises(BadRequest) as info:
        await normalizer.load_image_bytes(bytes(2_000_000))
    assert info.value.code == "image_too_large"


async def test_big_images_are_decoded_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    noisy = Image.frombytes("RGB", (1500, 1500), os.urandom(1500 * 1500 * 3))
    buf = io.BytesIO()
    noisy.save(buf, "PNG", compress_level=0)
    part = {"type": "image_url", "image_url": data_url(buf.getvalue())}
    threads: list[int] = []
    real_inspect = images.inspect_image

    def inspect(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real_inspect(*args, **kwargs)

    monkeypatch.setattr(images, "inspect_image", inspect)
    async with MediaNormalizer(MediaConfig()) as n:
        await n.normalize_chat(body_with(part), "openai")
    assert threads and threading.get_ident() not in threads  # a worker thread did the decoding


async def test_images_under_the_models_minimum_side_are_refused_when_one_is_set() -> None:
    """F10: a 1x1 image passes by default; with min_image_side (a vision encoder's patch size) it is a 400."""
    tiny = {"type": "image_url", "image_url": {"url": data_url(encode("PNG", (1, 1)))}}
    async with MediaNormalizer(MediaConfig()) as n:
        await n.normalize_chat(body_with(tiny), "openai")
    async with MediaNormalizer(MediaConfig(min_image_side=28)) as n:
        error = await refused(n, tiny)
        assert error.code == "image_too_small" and "28" in error.message
        wide = {"type": "image_url", "image_url": {"url": data_url(encode("PNG", (300, 27)))}}
        assert (await refused(n, wide)).code == "image_too_small"
        enough = {"type": "image_url", "image_url": {"url": data_url(encode("PNG", (28, 28)))}}
        await n.normalize_chat(body_with(enough), "openai")
