"""Every error the gateway answers with, in one place, in the OpenAI shape.

The tree::

    GatewayError                      status  type                     code
    ├── BadRequest                    400     invalid_request_error    (varies)
    │   └── MediaError                400     invalid_request_error    image_* (media/)
    ├── Unauthorized                  401     authentication_error     invalid_api_key
    ├── PermissionDenied              403     permission_error         permission_denied
    ├── NotFound                      404     invalid_request_error    not_found
    │   └── ModelNotFound             404     invalid_request_error    model_not_found
    ├── RequestTimeout                408     invalid_request_error    request_timeout
    ├── PayloadTooLarge               413     invalid_request_error    request_too_large
    ├── QueueFull                     429     rate_limit_error         queue_full         (+ Retry-After)
    ├── UpstreamError                 502     upstream_error           upstream_error
    ├── EngineUnavailable             503     service_unavailable      engine_unavailable (+ Retry-After)
    └── UpstreamTimeout               504     timeout_error            upstream_timeout

Messages are written for clients: they never carry a stack trace, an engine's address, its command
line or an environment value. Catch broad (``GatewayError``) or narrow, as httpx's tree allows.

Two error dialects (``ErrorDialect``), chosen by the endpoint row a path belongs to (gateway/http/endpoints.py):
``OPENAI``, the shape above, everywhere but the Anthropic paths; ``ANTHROPIC`` on ``/v1/messages*``, where
every error, the middleware's and admission's included, is ``{"type": "error", "error": {"type", "message"}}``
with the same status, and a broken stream ends with ``event: error``. Anthropic's types by status: 400
invalid_request_error, 401 authentication_error, 403 permission_error, 404 not_found_error, 408 and 504
timeout_error, 413 request_too_large, 429 rate_limit_error, 500 and 502 api_error, 503 and 529
overloaded_error (the anthropic SDK picks its exception class by the status alone).
"""

from __future__ import annotations

from typing import Final

import orjson


class GatewayError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param
        self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, round(self.retry_after)))}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class MediaError(BadRequest):
    """An image or other media part the gateway refused (codes ``image_*``, ``unsupported_content``...)."""

    code = "invalid_image"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": "Bearer"}


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        # The body was cut off part way, so the connection cannot carry another request; and uvicorn, left
        # to itself, keeps it open for as long as the client trickles the rest (each byte cancels its
        # keep-alive timer): one slow client would hold a socket for ever. ``Connection: close`` makes
        # uvicorn close it once the 408 is sent.
        return {**super().headers(), "connection": "close"}


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"

    def headers(self) -> dict[str, str]:
        # Refused before the body was read to its end: the rest is still on its way, so the connection cannot
        # carry another request, and uvicorn would go on reading (and dropping) all the client sends, with its
        # keep-alive timer cancelled by the first byte that came in: the socket stayed open for ever.
        # ``Connection: close`` makes uvicorn close it once the 413 is sent.
        return {**super().headers(), "connection": "close"}


class QueueFull(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class EngineUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "engine_unavailable"


class ShuttingDown(EngineUnavailable):
    code = "server_shutting_down"

    def headers(self) -> dict[str, str]:
        # A keep-alive connection to a gateway on its way out would only carry the next request to the
        # same refusal: closing it sends the client's pool to another instance.
        return {**super().headers(), "connection": "close"}


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


def error_body(message: str, type_: str, code: str | int | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def sse_error_event(message: str, type_: str, code: str) -> bytes:
    """The one event that ends a broken stream (no ``[DONE]`` follows it)."""
    return b"data: " + error_body(message, type_, code) + b"\n\n"


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def reshape_upstream_error(status: int, body: bytes) -> bytes:
    """An engine's error body in the OpenAI shape, keeping its message.

    vLLM answers in the right shape already (kept byte for byte); LMDeploy sends a flat
    ``{message, type, code, object: "error"}``; vLLM's 401 is ``{"error": "Unauthorized"}``;
    FastAPI-based engines send ``{"detail": ...}``; LightLLM ``{"message": ...}``.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    default_type = _TYPE_BY_STATUS.get(status, "upstream_error" if status >= 500 else "invalid_request_error")
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return body
        if isinstance(inner, str):
            return error_body(inner, default_type, status)
        message = data.get("message")
        if isinstance(message, str):
            given_type, code, given_param = data.get("type"), data.get("code"), data.get("param")
            type_ = given_type if isinstance(given_type, str) else default_type
            param = given_param if isinstance(given_param, str) else None
            return error_body(message, type_, code if isinstance(code, str | int) else status, param)
        detail = data.get("detail")
        if detail is not None:
            text = detail if isinstance(detail, str) else "The request was not valid for this model."
            return error_body(text, default_type, status)
    reason = "The engine rejected the request." if status < 500 else "The engine failed to answer."
    return error_body(reason, default_type, status)


class ErrorDialect:
    """How a client reads an error: the body of an error answer, and the event that ends a broken stream.

    This one is OpenAI's (the gateway's own shape); ``AnthropicErrors`` overrides all three.
    """

    name = "openai"

    def body(self, exc: GatewayError) -> bytes:
        """The body of an error answer for ``exc``."""
        return exc.body()

    def reshape(self, status: int, body: bytes) -> bytes:
        """An error body already in the gateway's OpenAI shape (its own, or an engine's reshaped) in this dialect."""
        return body

    def event(self, message: str, type_: str, code: str) -> bytes:
        """The one event that ends a broken stream; ``type_`` is the gateway's (OpenAI) error type."""
        return sse_error_event(message, type_, code)


_ANTHROPIC_BY_STATUS: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# A mid-stream error has no status of its own: its type says which it would have had.
_ANTHROPIC_BY_TYPE: Final = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "rate_limit_error": "rate_limit_error",
    "service_unavailable": "overloaded_error",
    "timeout_error": "timeout_error",
}


def anthropic_type(status: int) -> str:
    return _ANTHROPIC_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error(message: str, type_: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": type_, "message": message}})


class AnthropicErrors(ErrorDialect):
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``; ``event: error`` in a stream."""

    name = "anthropic"

    def body(self, exc: GatewayError) -> bytes:
        return anthropic_error(exc.message, anthropic_type(exc.status))

    def reshape(self, status: int, body: bytes) -> bytes:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            if data.get("type") == "error" and isinstance(data.get("error"), dict):
                return body  # an engine that speaks Messages answered in Anthropic's shape already (vLLM, LMDeploy)
            inner = data.get("error")
            if isinstance(inner, dict) and isinstance(inner.get("message"), str):
                return anthropic_error(inner["message"], anthropic_type(status))
        reason = "The request failed." if status < 500 else "The engine failed to answer."
        return anthropic_error(reason, anthropic_type(status))

    def event(self, message: str, type_: str, code: str) -> bytes:
        data = anthropic_error(message, _ANTHROPIC_BY_TYPE.get(type_, "api_error"))
        return b"event: error\ndata: " + data + b"\n\n"


OPENAI: Final = ErrorDialect()
ANTHROPIC: Final = AnthropicErrors()
