"""``data:`` URLs and base64: parse, size-check before decoding, decode leniently, build."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from gateway.media import failures

_WHITESPACE = re.compile(r"[\t\n\r\f\v ]+")
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_\-]*=*$")


@dataclass(frozen=True)
class DataURL:
    mime: str  # as declared by the client (lower case, maybe empty): never trusted for images
    payload: str  # the base64 text after the comma


def parse_data_url(ref: str, param: str | None = None) -> DataURL:
    """``data:<mime>[;params];base64,<payload>``; only base64 is accepted (as vLLM and LMDeploy)."""
    header, sep, payload = ref.strip().partition(",")
    if not sep or not header[:5].lower() == "data:":
        raise failures.invalid_url(param, "a data: URL needs a comma before its data")
    fields = [f.strip().lower() for f in header[5:].split(";")]
    if fields[-1] != "base64":
        raise failures.invalid_url(param, "only base64 data: URLs are accepted")
    return DataURL(mime=fields[0] if len(fields) > 1 else "", payload=payload)


def decoded_size_bound(payload: str) -> int:
    """An upper bound on the decoded size, for refusing before decoding."""
    return (len(payload) * 3) // 4 + 3


def decode_base64(payload: str, param: str | None = None) -> tuple[bytes, bool]:
    """The bytes, and whether ``payload`` was already canonical (standard alphabet, padded, no spaces).

    Accepts what clients commonly send: line breaks, the URL-safe alphabet, missing padding.
    """
    try:
        return base64.b64decode(payload, validate=True), True
    except (binascii.Error, ValueError):
        pass
    text = _WHITESPACE.sub("", payload)
    if not _B64_CHARS.match(text):
        raise failures.invalid_media(param)
    text = text.rstrip("=").replace("-", "+").replace("_", "/")
    if len(text) % 4 == 1:
        raise failures.invalid_media(param)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True), False
    except (binascii.Error, ValueError):
        raise failures.invalid_media(param) from None


def looks_like_base64(ref: str) -> bool:
    """Cheap test on the first characters of a scheme-less reference."""
    head = _WHITESPACE.sub("", ref[:96])
    return len(head) >= 8 and _B64_CHARS.match(head.rstrip("=")) is not None


def decode_head(ref: str, n_chars: int = 64) -> bytes:
    """The first bytes a base64 string decodes to (for sniffing), or b"" if it does not decode."""
    head = _WHITESPACE.sub("", ref[: n_chars * 2])[:n_chars]
    head = head[: len(head) - len(head) % 4].replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(head, validate=True)
    except (binascii.Error, ValueError):
        return b""


def build_data_url(mime: str, data: bytes | None = None, *, payload: str | None = None) -> str:
    """``data:<mime>;base64,...`` from bytes, or from an already canonical base64 ``payload``."""
    if payload is None:
        assert data is not None
        payload = base64.b64encode(data).decode("ascii")
    return f"data:{mime};base64,{payload}"
