"""The OpenAI endpoints: thin handlers over read → check → route → normalize → relay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from engines import ModelEntry
from engines.adapters import OPENAI_PATHS
from engines.scheduling.lease import Lease
from gateway.deps import GatewayState, StateDep
from gateway.http.errors import BadRequest, ShuttingDown
from gateway.http.middleware import MODEL_KEY, REQUEST_ID_KEY
from gateway.media import MediaNormalizer
from gateway.proxy.admission import acquire, resolve, while_connected
from gateway.proxy.body import check_fields, model_name, parse_json_object, read_body
from gateway.proxy.relay import Relay, Target
from gateway.workers.lease_client import RemoteLease

router = APIRouter()

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


async def forward(request: Request, state: GatewayState, endpoint: str) -> Relay:
    settings = state.config.server
    raw = await read_body(request, limit=settings.max_body_bytes, body_timeout=settings.body_timeout)
    body = parse_json_object(request, raw)
    entry = route(request, state, model_name(body), endpoint)
    stream = check_fields(body, endpoint)
    if endpoint == "chat" and MediaNormalizer.needs_work(body):
        # Before a replica is chosen: a slow image must not hold an engine's slot.
        await while_connected(request, state.media.normalize_chat(body, entry.adapter.dialect))
    body["model"] = entry.request_model
    return await relay(request, state, entry, body, path=OPENAI_PATHS[endpoint], stream=stream)


def route(request: Request, state: GatewayState, name: str, endpoint: str) -> ModelEntry:
    """The entry serving ``name`` (404 if none); 400 when its engine does not serve ``endpoint``.

    Every model endpoint passes here, so this is also where a draining gateway turns new work away.
    """
    if state.draining:
        raise ShuttingDown(
            "The gateway is shutting down; retry on another instance.", retry_after=state.config.server.retry_after
        )
    entry = resolve(state.pool, name)
    request.scope[MODEL_KEY] = entry.spec.name
    if endpoint not in entry.adapter.endpoints:
        shown_path = OPENAI_PATHS.get(endpoint, f"/{endpoint}")
        raise BadRequest(
            f"The model '{entry.spec.name}' does not serve {shown_path}.", param="model", code="unsupported_endpoint"
        )
    return entry


async def relay(
    request: Request,
    state: GatewayState,
    entry: ModelEntry,
    body: dict[str, Any],
    *,
    path: str,
    stream: bool,
    stream_end: str | None = None,
    transform: Callable[[dict[str, Any]], Any] | None = None,
) -> Relay:
    """Lease a replica (at once, or after a bounded FIFO wait) and build the ``Relay`` that posts ``body``
    (final, ``model`` included) to ``path``; the relay releases the lease when it is over.

    ``stream_end`` overrides the adapter's; ``transform`` reshapes a non-stream 2xx answer (``Target``).
    """
    settings = state.config.server
    lease = await acquire(
        state.pool,
        entry,
        request,
        queue_timeout=settings.queue_timeout,
        retry_after=settings.retry_after,
        metrics=state.metrics,
    )
    try:
        request_id: str = request.scope[REQUEST_ID_KEY]
        headers = {
            "Content-Type": "application/json",
            "X-Request-Id": request_id,
            "Accept": "text/event-stream" if stream else "application/json",
        }
        key = entry.spec.engine_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        rewrite = model_rewrite(entry.adapter.response_model(entry.spec), entry.spec.name)

        def target(lease: Lease | RemoteLease, failover: Callable[[], Awaitable[Target | None]] | None) -> Target:
            return Target(
                url=lease.replica.base_url + path,
                model=entry.spec.name,
                headers=headers,
                replica=lease.replica,
                model_rewrite=rewrite,
                retry_after=settings.retry_after,
                stream_end=stream_end or entry.adapter.stream_end,
                transform=transform,
                on_done=lease.release,
                failover=failover,
                raw=lease.replica.base_url.startswith("http://"),
            )

        async def failover() -> Target | None:
            other = await state.pool.reroute(entry, lease)  # type: ignore[arg-type]
            return None if other is None else target(other, None)

        first = target(lease, failover if entry.spec.replicas > 1 else None)
        return Relay(
            state.upstream,
            first,
            orjson.dumps(body),
            stream=stream,
            clocks=state.clocks,
            request_id=request_id,
            metrics=state.metrics,
            in_flight=state.in_flight,
        )
    except BaseException:
        lease.release()  # the relay never got it: hand the slot back
        raise


def model_rewrite(engine_name: str | None, served: str) -> tuple[tuple[bytes, bytes], ...]:
    """Byte replacements that put the client's model name where the engine wrote its own (JSON with or
    without a space after the colon): cheaper than parsing every streamed event."""
    if not engine_name or engine_name == served:
        return ()
    old, new = orjson.dumps(engine_name), orjson.dumps(served)
    return tuple((b'"model":' + sep + old, b'"model":' + sep + new) for sep in (b"", b" "))


@router.post("/v1/chat/completions", openapi_extra=_BODY_DOC)
async def chat_completions(request: Request, state: StateDep) -> Response:
    return await forward(request, state, "chat")


@router.post("/v1/completions", openapi_extra=_BODY_DOC)
async def completions(request: Request, state: StateDep) -> Response:
    return await forward(request, state, "completions")


@router.post("/v1/embeddings", openapi_extra=_BODY_DOC)
async def embeddings(request: Request, state: StateDep) -> Response:
    return await forward(request, state, "embeddings")


@router.post("/v1/rerank", openapi_extra=_BODY_DOC)
async def rerank(request: Request, state: StateDep) -> Response:
    return await forward(request, state, "rerank")
