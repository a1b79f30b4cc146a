"""F5: local files are refused unless ``local_media_dir`` is set, and then read only from inside it."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gateway.http.errors import BadRequest
from gateway.media import MediaConfig, MediaNormalizer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


PNG = png()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "a.png").write_bytes(PNG)
    (media / "sub" / "b.png").write_bytes(PNG)
    outside = tmp_path / "secret.png"
    outside.write_bytes(PNG)
    (media / "escape.png").symlink_to(outside)
    (media / "inner.png").symlink_to(media / "a.png")
    (media / "dirlink").symlink_to(tmp_path)
    os.mkfifo(media / "fifo.png")
    return {"media": media, "outside": outside}


@pytest.fixture
async def local(tree: dict[str, Path]) -> AsyncIterator[MediaNormalizer]:
    async with MediaNormalizer(MediaConfig(local_media_dir=str(tree["media"]), max_image_bytes=100_000)) as n:
        yield n


def chat(ref: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}}]}]}


async def test_inside_the_directory_is_read(local: MediaNormalizer, tree: dict[str, Path]) -> None:
    media = tree["media"]
    expected = "data:image/png;base64," + base64.b64encode(PNG).decode()
    for ref in ("a.png", "sub/b.png", str(media / "a.png"), f"file://{media}/sub/b.png", "inner.png", "sub/../a.png"):
        assert await local.resolve_image(ref) == expected, ref


async def test_escapes_are_refused(local: MediaNormalizer, tree: dict[str, Path]) -> None:
    media = tree["media"]
    for ref in (
        "../secret.png",
        str(tree["outside"]),
        f"file://{tree['outside']}",
        "escape.png",  # symlink to outside
        "dirlink/secret.png",  # through a directory symlink
        "sub",  # a directory
        "fifo.png",  # not a regular file (and must not hang)
        "missing.png",
        f"file://otherhost{media}/a.png",
        "/etc/passwd",
        "a.png\x00.txt",
    ):
        with pytest.raises(BadRequest) as info:
            await local.normalize_chat(chat(ref), "lmdeploy")
        assert info.value.code == "image_url_forbidden", ref
        assert str(media) not in info.value.message and "secret" not in info.value.message


async def test_large_local_files_are_capped(local: MediaNormalizer, tree: dict[str, Path]) -> None:
    (tree["media"] / "big.png").write_bytes(PNG + bytes(200_000))
    with pytest.raises(BadRequest) as info:
        await local.resolve_image("big.png")
    assert info.value.code == "image_too_large"


async def test_without_a_directory_nothing_local_is_read(tree: dict[str, Path]) -> None:
    async with MediaNormalizer(MediaConfig()) as n:
        for ref in ("a.png", str(tree["media"] / "a.png"), f"file://{tree['media']}/a.png"):
            with pytest.raises(BadRequest) as info:
                await n.resolve_image(ref)
            assert info.value.code == "image_url_forbidden"
