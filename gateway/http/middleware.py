"""The one middleware: request id, API keys, request metrics, a last-resort error in our shape, and the fast
path (a passthrough row of the endpoint table answered by the pipeline without FastAPI's router).

Every error it writes is in the error dialect of the path's row (gateway/http/errors.py: Anthropic's on
``/v1/messages*``); on such a path the errors FastAPI itself answers (405, a 404 below the row, a validation
error) are reshaped on their way out too (``_reshaping``), so an Anthropic client never sees OpenAI's shape.

Pure ASGI on purpose: Starlette's ``BaseHTTPMiddleware`` hides ``http.disconnect`` from the app, and
the relay must see a client leave (docs/RELIABILITY.md §1b).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.deps import get_state
from gateway.http.endpoints import ENDPOINTS, EndpointTable
from gateway.http.errors import OPENAI, ErrorDialect, GatewayError, error_body
from gateway.http.keys import KeyRing
from gateway.http.scope import IDENTITY_KEY, MODEL_KEY, REQUEST_ID_KEY, T0_KEY
from gateway.observability.log_setup import request_id_var
from gateway.observability.metrics import Metrics
from gateway.proxy.pipeline import forward
from gateway.proxy.relay import BODY_SEND_KEY, STATUS_KEY, send_error

log = logging.getLogger("gateway")

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, *, keys: KeyRing, metrics: Metrics, endpoints: EndpointTable = ENDPOINTS) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        t0 = scope[T0_KEY] = loop.time()
        authorization = None
        api_key = None  # Anthropic clients send their key as x-api-key
        request_id = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-api-key":
                api_key = value
            elif name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
                request_id = value.decode()
        if request_id is None:
            request_id = os.urandom(12).hex()
        scope[REQUEST_ID_KEY] = request_id
        scope[BODY_SEND_KEY] = send
        request_id_var.set(request_id)  # this task's context only: uvicorn runs each request in its own task
        path: str = scope["path"]
        errors = self.endpoints.errors(path)
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                headers = message.setdefault("headers", [])
                if not any(k == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            scope[IDENTITY_KEY] = self.keys.check(path, authorization, self.endpoints, api_key=api_key)
            # The passthrough rows, answered here by the call routes/openai's handlers make, without FastAPI's
            # router, dependency solving and exception middleware: ~0.3 ms of CPU less per request (~30 % of
            # the gateway's own cost; tests/bench/README.md). Errors take the same shape either way
            # (GatewayError → send_error below). FastAPI keeps the routes for the OpenAPI schema and for any
            # other method.
            direct = self.endpoints.fast_path(path) if scope["method"] == "POST" and "app" in scope else None
            if direct is not None:
                request = Request(scope, receive)
                response = await forward(request, await get_state(request), direct)
                await response(scope, receive, send_wrapper)
            elif errors is OPENAI:
                await self.app(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, _reshaping(send_wrapper, errors))
        except GatewayError as exc:
            if not started:
                await send_error(send_wrapper, exc, request_id, errors)
        except ClientDisconnect:  # the client left while its request body was being read: nobody to answer
            scope[STATUS_KEY] = 499
        except Exception:
            log.exception("request %s failed inside the gateway", request_id)
            if not started:
                await send_wrapper(
                    {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]}
                )
                await send_wrapper(
                    {
                        "type": "http.response.body",
                        "more_body": False,
                        "body": errors.reshape(
                            500, error_body("The gateway failed to answer.", "internal_error", "internal_error")
                        ),
                    }
                )
        finally:
            status = scope.get(STATUS_KEY, status)
            model = scope.get(MODEL_KEY, "")
            endpoint = self.endpoints.label(path)
            self.metrics.requests_of(model, endpoint, str(status)).inc()
            if endpoint != "ops":
                self.metrics.duration_of(model, endpoint).observe(loop.time() - t0)


def _reshaping(send: Send, errors: ErrorDialect) -> Send:
    """``send``, with a JSON error answer (status 400 or more) rewritten in ``errors``' dialect: for the answers
    FastAPI writes itself on a path whose clients read another dialect. Error bodies are small and whole."""
    held: list[bytes] = []
    start: Message | None = None

    async def reshaping(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] >= 400:
            headers = message.get("headers", [])
            if any(k == b"content-type" and v.startswith(b"application/json") for k, v in headers):
                start = message
                return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        held.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = errors.reshape(start["status"], b"".join(held))
        headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return reshaping
