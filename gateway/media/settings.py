"""The ``media:`` section of the config: what the gateway fetches, from where, and how much."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

# Formats the gateway can check from the header (images.py knows their magic numbers and layouts).
KNOWN_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp", "gif", "bmp")
_FORMAT_ALIASES = {"jpg": "jpeg"}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}  # fmt: skip
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "mp": 10**6, "kp": 10**3, "gp": 10**9}


def _parse_amount(value: object, units: dict[str, int], what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number")
    if isinstance(value, int):
        amount = value
    elif isinstance(value, float) and value.is_integer():
        amount = int(value)
    elif isinstance(value, str):
        match = _SIZE_RE.match(value.replace("_", ""))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in units:
            raise ValueError(f"{what} must be a number with an optional unit ({', '.join(u for u in units if u)})")
        amount = int(float(match.group(1)) * units[unit])
    else:
        raise ValueError(f"{what} must be a number")
    if amount <= 0:
        raise ValueError(f"{what} must be positive")
    return amount


def parse_bytes(value: object) -> int:
    """``20MB`` → 20_000_000, ``512KiB`` → 524_288, ``1000`` → 1000."""
    return _parse_amount(value, _BYTE_UNITS, "a byte size")


def parse_count(value: object) -> int:
    """``40M`` → 40_000_000 (also ``40MP``, ``2.5k``, plain integers)."""
    return _parse_amount(value, _COUNT_UNITS, "a count")


ByteSize = Annotated[int, BeforeValidator(parse_bytes)]
Count = Annotated[int, BeforeValidator(parse_count)]


def normalize_host(name: str) -> str:
    """How hosts are compared: lower case, no trailing dot, IDNA (punycode) for non-ASCII names."""
    host = name.strip().lower().rstrip(".")
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    return host


class MediaConfig(BaseModel):
    """``media:`` in the gateway config. Defaults are safe: public hosts only, 20 MB, 40 MP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_private_networks: bool = False
    allowed_domains: list[str] = Field(default_factory=list)
    max_image_bytes: ByteSize = 20_000_000
    max_image_pixels: Count = 40_000_000
    fetch_timeout: float = Field(default=10.0, gt=0)
    max_redirects: int = Field(default=3, ge=0, le=20)
    max_images_per_request: int = Field(default=16, ge=0)
    max_concurrent_fetches: int = Field(default=16, ge=1)
    # Of those, at most this many to one host (default: a quarter of them, at least 1): a slow image server
    # cannot take every slot and starve the fetches from other hosts.
    max_concurrent_fetches_per_host: int | None = Field(default=None, ge=1)
    local_media_dir: str | None = None
    cache_entries: int = Field(default=256, ge=0)
    cache_max_bytes: ByteSize = 256 * 2**20
    url_cache_ttl: float = Field(default=600.0, ge=0)
    max_frames: int = Field(default=100, ge=1)
    # Vision encoders refuse images under their patch size (Qwen2-VL: 28 px a side) with an engine error the
    # client cannot act on; set this to the smallest side the models here accept. 1: any image.
    min_image_side: int = Field(default=1, ge=1)
    allowed_formats: list[str] = Field(default_factory=lambda: list(KNOWN_FORMATS))

    @property
    def per_host_fetches(self) -> int:
        if self.max_concurrent_fetches_per_host is not None:
            return min(self.max_concurrent_fetches_per_host, self.max_concurrent_fetches)
        return max(1, self.max_concurrent_fetches // 4)

    @field_validator("allowed_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for entry in value:
            host = normalize_host(entry)
            if not host or any(c in host for c in "/:@*?#\\ "):
                raise ValueError(
                    f"allowed_domains entry {entry!r} is not a host name (no schemes, ports, paths or wildcards)"
                )
            out.append(host)
        return out

    @field_validator("allowed_formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for entry in value:
            fmt = _FORMAT_ALIASES.get(entry.strip().lower(), entry.strip().lower())
            if fmt not in KNOWN_FORMATS:
                raise ValueError(f"unknown image format {entry!r}; known: {', '.join(KNOWN_FORMATS)}")
            if fmt not in out:
                out.append(fmt)
        return out
