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
"""

from __future__ import annotations

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
