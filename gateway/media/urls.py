"""Parsing media references with one parser: yarl, the one aiohttp connects with.

The host checked is ``URL.raw_host``, exactly what aiohttp resolves and connects to, so the check
and the connection cannot disagree about a URL (vLLM CVE-2026-24779 was two parsers disagreeing
about a backslash). Strings a browser-style parser would "repair" are refused instead.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from yarl import URL

from gateway.media import failures
from gateway.media.settings import normalize_host

MAX_URL_LENGTH = 8192
RefKind = Literal["http", "data", "file", "scheme", "other"]

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):")


def reference_kind(ref: str) -> RefKind:
    """What a media reference is, by its scheme: ``other`` is raw base64 or a bare path."""
    match = _SCHEME_RE.match(ref.lstrip())
    if match is None:
        return "other"
    scheme = match.group(1).lower()
    if scheme in ("http", "https"):
        return "http"
    if scheme == "data":
        return "data"
    if scheme == "file":
        return "file"
    return "scheme"


def _has_bad_chars(text: str) -> bool:
    return any(c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def _parse(raw: str, param: str | None) -> URL:
    if len(raw) > MAX_URL_LENGTH:
        raise failures.invalid_url(param, f"it is longer than {MAX_URL_LENGTH} characters")
    if "\\" in raw:
        raise failures.forbidden(param)
    if _has_bad_chars(raw):
        raise failures.invalid_url(param, "it contains whitespace or control characters")
    try:
        return URL(raw)
    except (ValueError, TypeError, UnicodeError):
        raise failures.invalid_url(param) from None


def check_http_url(url: URL, allowed_domains: list[str], param: str | None = None) -> URL:
    """Refuse anything but an absolute http(s) URL to a permitted host; drop the fragment."""
    if url.scheme not in ("http", "https"):
        raise failures.forbidden(param)
    try:
        host = url.raw_host
        authority = url.raw_authority
        _ = url.port
    except (ValueError, TypeError, UnicodeError):
        raise failures.invalid_url(param) from None
    if not host:
        raise failures.invalid_url(param, "it has no host")
    if "@" in authority:
        raise failures.forbidden(param)  # userinfo: never sent, and a classic host-confusion trick
    if allowed_domains and normalize_host(host) not in allowed_domains:
        raise failures.forbidden(param)
    return url.with_fragment(None)


def parse_http_url(raw: str, allowed_domains: list[str], param: str | None = None) -> URL:
    """A client's http(s) URL, parsed and checked (no network)."""
    return check_http_url(_parse(raw, param), allowed_domains, param)


def redirect_target(current: URL, location: str, allowed_domains: list[str], param: str | None = None) -> URL:
    """Where a ``Location`` header points, checked like a client URL (scheme, userinfo, allowlist)."""
    url = _parse(location, param)
    if not url.scheme:  # relative, or scheme-relative ("//host/path")
        url = current.join(url)
    return check_http_url(url, allowed_domains, param)


def safe_for_logs(url: URL) -> str:
    """Scheme, host and port only: queries may carry signatures and tokens."""
    try:
        return f"{url.scheme}://{url.raw_host}:{url.port}"
    except ValueError:
        return "<unparsable>"
