"""The OpenAI POST endpoints: one route per passthrough row of the endpoint table, one generic handler; and
the routes of the engine endpoints with handlers of their own (routes/audio, routes/responses).

The middleware answers these POSTs itself (its fast path, the same ``forward``); the routes are here for
the OpenAPI schema, for the other methods (405), and for an app served without that middleware.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response

from gateway.deps import GatewayState, StateDep
from gateway.http.endpoints import ENDPOINTS, Endpoint, EndpointTable
from gateway.proxy.pipeline import forward
from gateway.routes import audio, responses

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "additionalProperties": True,
                    "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}},
                }
            }
        },
    }
}


def passthrough(endpoint: Endpoint) -> Callable[[Request, GatewayState], Awaitable[Response]]:
    """The handler of one passthrough row: the request and the state, nothing more (the middleware's fast
    path calls ``forward`` with exactly these, so a parameter or dependency added here would be skipped)."""

    async def handler(request: Request, state: StateDep) -> Response:
        return await forward(request, state, endpoint)

    return handler


def build_router(table: EndpointTable = ENDPOINTS) -> APIRouter:
    router = APIRouter()
    # The rows with handlers of their own: multipart audio, stored responses (not routed, and saying why).
    router.include_router(audio.router)
    router.include_router(responses.router)
    for endpoint in table.passthroughs():
        # The name the hand-written handlers had (chat_completions, ...): the OpenAPI summary and operationId.
        name = endpoint.path.removeprefix("/v1/").strip("/").replace("/", "_")
        router.add_api_route(endpoint.path, passthrough(endpoint), methods=["POST"], name=name, openapi_extra=_BODY_DOC)
    return router


router = build_router()
