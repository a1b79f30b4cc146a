"""The refusals media raises: one ``MediaError`` (400) per reason, with a fixed, generic message.

Messages never carry the URL (its query may hold a signature), a resolved address, a file path or
an exception's text (PIL's can hold ``BytesIO`` reprs with heap addresses).
"""

from __future__ import annotations

from gateway.http.errors import BadRequest, MediaError

FORBIDDEN = "image_url_forbidden"
INVALID_URL = "invalid_image_url"
FETCH_FAILED = "image_fetch_failed"
FETCH_TIMEOUT = "image_fetch_timeout"
TOO_LARGE = "image_too_large"
TOO_SMALL = "image_too_small"
UNSUPPORTED_FORMAT = "unsupported_image_format"
INVALID_IMAGE = "invalid_image"
TOO_MANY = "too_many_images"
UNSUPPORTED_CONTENT = "unsupported_content"


def forbidden(param: str | None = None, what: str = "image URL") -> MediaError:
    """Policy refusals (scheme, host, address, allowlist): one message, nothing about why, for the client."""
    return MediaError(
        f"The {what} is not allowed: only http(s) URLs of permitted public hosts, and data: URLs, are accepted.",
        code=FORBIDDEN,
        param=param,
    )


def local_forbidden(param: str | None = None) -> MediaError:
    return MediaError(
        "Local files are not accepted here (or the path is outside the media directory, or missing).",
        code=FORBIDDEN,
        param=param,
    )


def invalid_url(param: str | None = None, detail: str = "it could not be parsed") -> MediaError:
    return MediaError(f"The image URL is not valid: {detail}.", code=INVALID_URL, param=param)


def fetch_failed(param: str | None = None, detail: str | None = None) -> MediaError:
    message = "The image could not be fetched" + (f" ({detail})." if detail else ".")
    return MediaError(message, code=FETCH_FAILED, param=param)


def fetch_timeout(seconds: float, param: str | None = None) -> MediaError:
    return MediaError(f"Fetching the image took longer than {seconds:g} s.", code=FETCH_TIMEOUT, param=param)


def too_large_bytes(limit: int, param: str | None = None) -> MediaError:
    return MediaError(f"The media item is larger than the allowed {limit} bytes.", code=TOO_LARGE, param=param)


def too_many_pixels(limit: int, param: str | None = None) -> MediaError:
    return MediaError(f"The image has more than the allowed {limit} pixels.", code=TOO_LARGE, param=param)


def too_small(limit: int, param: str | None = None) -> MediaError:
    return MediaError(
        f"The image is smaller than {limit} pixels on a side; the models here need at least that.",
        code=TOO_SMALL,
        param=param,
    )


def too_many_frames(limit: int, param: str | None = None) -> MediaError:
    return MediaError(f"The image has more than the allowed {limit} frames.", code=TOO_LARGE, param=param)


def unsupported_format(fmt: str | None, allowed: list[str], param: str | None = None) -> MediaError:
    name = f"'{fmt}' " if fmt else ""
    return MediaError(
        f"The image format {name}is not accepted; use one of: {', '.join(allowed)}.",
        code=UNSUPPORTED_FORMAT,
        param=param,
    )


def invalid_image(param: str | None = None) -> MediaError:
    return MediaError("The image data could not be read as an image.", code=INVALID_IMAGE, param=param)


def invalid_media(param: str | None = None) -> MediaError:
    return MediaError("The media data is not valid base64.", code=INVALID_IMAGE, param=param)


def too_many(count: int, limit: int) -> MediaError:
    return MediaError(
        f"The request has {count} images or other media items; at most {limit} are accepted.",
        code=TOO_MANY,
        param="messages",
    )


def unsupported_content(what: str, param: str | None = None) -> MediaError:
    return MediaError(f"This model does not accept {what}.", code=UNSUPPORTED_CONTENT, param=param)


def bad_part(detail: str, param: str | None = None) -> BadRequest:
    return BadRequest(f"Invalid message content: {detail}.", code="invalid_request", param=param)
