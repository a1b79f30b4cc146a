"""Checking image bytes before anything decodes them, and turning them into ``data:`` URLs.

Order of checks: magic number → format allowlist → dimensions from the header → pixel cap → frame
cap → a cheap structural check (PNG chunk CRCs; a JPEG decoded at 1/8 scale catches truncation).
Pillow is only ever handed the one plugin the magic number named, and its header parser is called
without ``Image.open``'s decompression-bomb check, whose warning/limit is process-global state:
our own cap (``max_image_pixels``) runs first. Callers run this in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

from PIL import Image, ImageFile

from gateway.http.errors import MediaError
from gateway.media import failures
from gateway.media.datauri import build_data_url
from gateway.media.settings import MediaConfig
from gateway.media.sniff import IMAGE_MIME, SNIFF_BYTES, sniff_image

log = logging.getLogger(__name__)

_PIL_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}
_plugins_ready = False


@dataclass(frozen=True)
class ImageInfo:
    format: str
    mime: str
    width: int
    height: int
    frames: int


def _open_header(fmt: str, data: bytes) -> ImageFile.ImageFile:
    """Parse only the header with the plugin for ``fmt`` (lazy: no pixel data is decoded)."""
    global _plugins_ready
    if not _plugins_ready:
        Image.init()
        _plugins_ready = True
    factory, _accept = Image.OPEN[_PIL_NAMES[fmt]]
    return factory(io.BytesIO(data), "")


def gif_frame_count(data: bytes, stop_after: int) -> int:
    """Frames in a GIF, counted from its block structure, stopping past ``stop_after``.

    Pillow's ``n_frames`` walks every frame (a 1-byte-per-frame GIF of 20 MB has millions), and
    seeking decodes each one; this walk only skips sub-blocks.
    """
    n = len(data)
    if n < 13:
        raise ValueError("short GIF")
    pos = 13 + (3 * (2 << (data[10] & 7)) if data[10] & 0x80 else 0)
    frames = 0
    while pos < n:
        block = data[pos]
        if block == 0x2C:  # image descriptor
            frames += 1
            if frames > stop_after or pos + 10 > n:
                break
            flags = data[pos + 9]
            pos += 10 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0) + 1  # + LZW minimum code size
        elif block == 0x21:  # extension: introducer, label
            pos += 2
        else:  # trailer (0x3B) or garbage: Pillow judges validity
            break
        while pos < n:  # data sub-blocks, up to the empty one
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
    return frames


def _structure_check(fmt: str, im: ImageFile.ImageFile) -> None:
    if fmt == "png":
        im.verify()  # every chunk's CRC, up to IEND: truncated or corrupt files fail here
    elif fmt == "jpeg":
        width, height = im.size
        im.draft(None, (math.ceil(width / 8), math.ceil(height / 8)))
        im.load()  # at 1/8 scale: cheap, and a truncated scan fails ("image file is truncated")


def inspect_image(data: bytes, config: MediaConfig, param: str | None = None) -> ImageInfo:
    """Raise ``MediaError`` unless ``data`` is an allowed, not too large, well-formed image."""
    fmt = sniff_image(data[:SNIFF_BYTES])
    if fmt is None:
        raise failures.invalid_image(param)
    if fmt not in config.allowed_formats:
        raise failures.unsupported_format(fmt, config.allowed_formats, param)
    try:
        im = _open_header(fmt, data)
    except Exception as exc:
        log.debug("image header rejected (%s): %s", fmt, type(exc).__name__)
        raise failures.invalid_image(param) from None
    try:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise failures.invalid_image(param)
        if width * height > config.max_image_pixels:
            raise failures.too_many_pixels(config.max_image_pixels, param)
        if min(width, height) < config.min_image_side:
            raise failures.too_small(config.min_image_side, param)
        if fmt == "gif":
            frames = gif_frame_count(data, config.max_frames)
        else:
            frames = int(getattr(im, "n_frames", 1) or 1)  # from the header (APNG acTL, WebP ANIM)
        if frames > config.max_frames:
            raise failures.too_many_frames(config.max_frames, param)
        _structure_check(fmt, im)
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise failures.too_many_pixels(config.max_image_pixels, param) from None
    except Exception as exc:  # any decoder failure on hostile input is the client's 400, not our 500
        log.debug("image rejected (%s): %s", fmt, type(exc).__name__)
        raise failures.invalid_image(param) from None
    finally:
        im.close()
    return ImageInfo(format=fmt, mime=IMAGE_MIME[fmt], width=width, height=height, frames=frames)


def image_data_url(data: bytes, config: MediaConfig, param: str | None = None, *, payload: str | None = None) -> str:
    """Check ``data`` and return it as ``data:<sniffed mime>;base64,...``.

    ``payload`` is the canonical base64 of ``data`` when the caller already has it (saves re-encoding).
    """
    if len(data) > config.max_image_bytes:
        raise failures.too_large_bytes(config.max_image_bytes, param)
    info = inspect_image(data, config, param)
    return build_data_url(info.mime, data, payload=payload)
