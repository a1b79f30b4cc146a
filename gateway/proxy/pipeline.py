"""The request pipeline: read → check → route → normalize → relay, for a passthrough row of the endpoint table.

``forward`` is a whole passthrough endpoint (the middleware's fast path and routes/openai call it);
``route`` and ``relay`` are its steps that the other handlers (routes/simple, routes/generate) reuse
around their own body handling.

Per request, a row's capability is served natively when the model's adapter lists it, else by translation
to chat completions when a dialect translates it (gateway/dialects: Messages, Responses) and the engine
serves chat, else it is a 400 naming the model and the endpoint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.requests import Request

from engines import ModelEntry
from engines.adapters import StreamEnd
from engines.scheduling.contract import Claim, ReplicaLease
from gateway.deps import GatewayState
from gateway.dialects import TRANSLATIONS, Translation
from gateway.http.endpoints import CHAT, Endpoint
from gateway.http.errors import OPENAI, BadRequest, ErrorDialect, ShuttingDown
from gateway.http.scope import MODEL_KEY, REQUEST_ID_KEY
from gateway.media import MediaNormalizer
from gateway.proxy.admission import acquire, resolve, while_connected
from gateway.proxy.body import check_fields, model_name, parse_json_object, read_body
from gateway.proxy.claim import claim_for
from gateway.proxy.relay import Relay, Target
from gateway.proxy.sse import StreamTranslation


async def forward(request: Request, state: GatewayState, endpoint: Endpoint) -> Relay:
    """A passthrough: the client's JSON body, checked by ``endpoint.body``, relayed to its engine path."""
    settings = state.config.server
    raw = await read_body(request, limit=settings.max_body_bytes, body_timeout=settings.body_timeout)
    body = parse_json_object(request, raw)
    entry = route(request, state, model_name(body), endpoint)
    stream = check_fields(body, endpoint.body)
    # From the client's own body, before a translation reshapes it or images are inlined into it.
    claim = claim_for(request, entry, body, endpoint.capability)
    if endpoint.capability is not None and endpoint.capability not in entry.adapter.capabilities:
        translation = TRANSLATIONS[endpoint.capability](body, entry.spec.name)
        return await forward_translated(request, state, entry, translation, claim)
    if endpoint.media and MediaNormalizer.needs_work(body):
        # Before a replica is chosen: a slow image must not hold an engine's slot.
        await while_connected(request, state.media.normalize_chat(body, entry.adapter.dialect))
    body["model"] = entry.request_model
    return await relay(
        request,
        state,
        entry,
        body,
        path=endpoint.upstream_path,
        stream=stream,
        stream_end=endpoint.stream_end,
        errors=endpoint.errors,
        headers=forwarded_headers(request, endpoint),
        claim=claim,
    )


def forwarded_headers(request: Request, endpoint: Endpoint) -> dict[str, str]:
    """The client's headers that ``endpoint``'s row sends on to the engine (or their defaults)."""
    out = {}
    for name, default in endpoint.forward_headers:
        value = request.headers.get(name, default)
        if value is not None:
            out[name] = value
    return out


async def forward_translated(
    request: Request, state: GatewayState, entry: ModelEntry, translation: Translation, claim: Claim
) -> Relay:
    """A client dialect the engine lacks, carried as chat completions: the translated body (its images fetched
    as a chat request's are), and the answer or stream translated back by the relay."""
    chat = translation.chat_body
    if MediaNormalizer.needs_work(chat):
        await while_connected(request, state.media.normalize_chat(chat, entry.adapter.dialect))
    chat["model"] = entry.request_model
    return await relay(
        request,
        state,
        entry,
        chat,
        path=CHAT.upstream_path,
        stream=translation.stream,
        transform=translation.answer,
        translation=translation,
        claim=claim,
    )


def serves(entry: ModelEntry, endpoint: Endpoint) -> bool:
    """Does the model answer ``endpoint``: natively, or by translation to chat completions?"""
    if endpoint.engines is not None:  # a configured passthrough: the engine kinds its config entry names
        return entry.spec.engine in endpoint.engines
    capability = endpoint.capability
    capabilities = entry.adapter.capabilities
    return capability is None or capability in capabilities or (capability in TRANSLATIONS and "chat" in capabilities)


def route(request: Request, state: GatewayState, name: str, endpoint: Endpoint) -> ModelEntry:
    """The entry serving ``name`` (404 if none); 400 when its engine serves ``endpoint`` neither natively
    nor by translation (``serves``).

    Every model endpoint passes here, so this is also where a draining gateway turns new work away.
    """
    if state.draining:
        raise ShuttingDown(
            "The gateway is shutting down; retry on another instance.", retry_after=state.config.server.retry_after
        )
    entry = resolve(state.pool, name)
    request.scope[MODEL_KEY] = entry.spec.name
    if not serves(entry, endpoint):
        raise BadRequest(
            f"The model '{entry.spec.name}' does not serve {endpoint.path}.", param="model", code="unsupported_endpoint"
        )
    return entry


async def relay(
    request: Request,
    state: GatewayState,
    entry: ModelEntry,
    body: dict[str, Any] | bytes,
    *,
    path: str,
    stream: bool,
    claim: Claim,
    stream_end: StreamEnd | None = None,
    transform: Callable[[dict[str, Any]], Any] | None = None,
    translation: StreamTranslation | None = None,
    errors: ErrorDialect = OPENAI,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> Relay:
    """Lease a replica (at once, or after a bounded wait in the model's queue) and build the ``Relay`` that
    posts ``body`` (final, ``model`` included) to ``path``; the relay releases the lease when it is over.
    ``claim``: the request's priority and affinity (``claim_for``), which the queue and the replica's choice
    follow.

    ``stream_end`` overrides the adapter's; ``transform`` reshapes a non-stream 2xx answer, ``translation``
    a stream and every error (``Target``); ``errors`` is the client's error dialect. ``headers``: the client's
    that go on to the engine. A ``bytes`` body is sent as it is, as ``content_type`` (a multipart form).
    """
    settings = state.config.server
    lease = await acquire(
        state.pool,
        entry,
        request,
        claim=claim,
        queue_timeout=settings.queue_timeout,
        retry_after=settings.retry_after,
        metrics=state.metrics,
    )
    try:
        request_id: str = request.scope[REQUEST_ID_KEY]
        sent = {
            **(headers or {}),
            "Content-Type": content_type,
            "X-Request-Id": request_id,
            "Accept": "text/event-stream" if stream else "application/json",
        }
        key = entry.spec.engine_key()
        if key:
            sent["Authorization"] = f"Bearer {key}"
        rewrite = model_rewrite(entry.adapter.response_model(entry.spec), entry.spec.name)

        def target(lease: ReplicaLease, failover: Callable[[], Awaitable[Target | None]] | None) -> Target:
            return Target(
                lease=lease,
                path=path,
                model=entry.spec.name,
                headers=sent,
                model_rewrite=rewrite,
                retry_after=settings.retry_after,
                stream_end=stream_end or entry.adapter.stream_end,
                transform=transform,
                translation=translation,
                errors=errors,
                failover=failover,
            )

        async def failover() -> Target | None:
            other = await state.pool.reroute(entry, lease)
            return None if other is None else target(other, None)

        first = target(lease, failover if entry.spec.replicas > 1 else None)
        return Relay(
            state.upstream,
            first,
            body if isinstance(body, bytes) else orjson.dumps(body),
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
