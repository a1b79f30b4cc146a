"""``create_app(config)``: the owner's FastAPI app; ``serving``: the lifespan the owner and a worker share.

Both build a ``GatewayState`` (gateway/deps.py: the clients are made there), start its clients, run their
own part (the owner: the engines' pool, its workers, SIGHUP; a worker: its line to the owner), and on the
way out hand everything to the ``Shutdown`` (gateway/http/shutdown.py), which stops it in stages.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client.core import Metric
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from engines import EnginePool, EngineState, StateChanged
from gateway.config.loader import Config
from gateway.config.reload import Reloader, install_sighup
from gateway.deps import GatewayState, OwnerState
from gateway.http.endpoints import EndpointTable, endpoint_table
from gateway.http.errors import BadRequest, GatewayError, error_body
from gateway.http.keys import KeyRing
from gateway.http.middleware import GatewayMiddleware
from gateway.http.scope import REQUEST_ID_KEY
from gateway.http.shutdown import Shutdown
from gateway.observability.gpu_probe import GpuProbe
from gateway.observability.metrics import (
    GpuCollector,
    Metrics,
    affinity_family,
    engine_state_family,
    probe_failures_family,
)
from gateway.routes import admin, generate, gpu, models, openai, ops, simple
from gateway.workers.fleet import Fleet

log = logging.getLogger("gateway")


def _error_response(exc: GatewayError, request: Request) -> Response:
    headers = {"x-request-id": request.scope.get(REQUEST_ID_KEY, ""), **exc.headers()}
    return Response(exc.body(), status_code=exc.status, headers=headers, media_type="application/json")


@asynccontextmanager
async def serving(
    app: FastAPI, state: GatewayState, role: AbstractAsyncContextManager[None] | None = None
) -> AsyncIterator[None]:
    """The lifespan of either process: clients up, ``role`` entered (what differs between owner and worker),
    the state handed to the handlers, start-up objects kept out of the GC; at the end, the shutdown's
    closing stages (gateway/http/shutdown.py), whatever failed on the way up."""
    shutdown = state.shutdown
    shutdown.close_with(state.media.close)
    shutdown.close_with(state.upstream.close)
    shutdown.close_with(_sync(state.gpus.close))
    try:
        await state.upstream.start()
        await state.media.start()
        async with role or nullcontext():
            app.state.gateway = state
            # Everything built so far lives as long as the app: keep it out of the cyclic GC's sweeps. A full
            # collection otherwise walks ~77k start-up objects, a 30-40 ms stop of every stream; undone at the end.
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                gc.unfreeze()
    finally:
        await shutdown.close()


def _sync(close: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def closed() -> None:
        close()

    return closed


@asynccontextmanager
async def owning(state: OwnerState) -> AsyncIterator[None]:
    """The owner's part: the engines' pool, then its workers, then SIGHUP reloads (undone first at the end)."""
    shutdown = state.shutdown
    shutdown.pool = state.pool  # attached before it starts: a start that fails half-way is still stopped
    await state.pool.start()
    if state.workers is not None:
        shutdown.peers = state.workers
        await state.workers.start(state.pool, lambda: state.config)
    undo_sighup = install_sighup(state, state.reloader) if state.reloader is not None else _nothing
    try:
        yield
    finally:
        undo_sighup()


def _nothing() -> None:
    pass


def startup_timer(metrics: Metrics) -> Callable[[StateChanged], None]:
    """Engine events → ``gateway_engine_startup_seconds`` (each replica's STARTING → READY),
    ``gateway_engine_wake_seconds`` (WAKING → READY: a sleeping engine woken) and
    ``gateway_engine_restarts_total`` (a replica that went down on its own, a failed wake included)."""
    began: dict[tuple[str, int, EngineState], float] = {}  # (model, replica, STARTING or WAKING) → when

    def on_engine_event(event: StateChanged) -> None:
        for timed in _TIMED:
            since = began.pop((event.model, event.replica, timed), None)
            if event.old is timed and event.new is EngineState.READY and since is not None:
                metric = metrics.startup if timed is EngineState.STARTING else metrics.wake
                metric.labels(event.model).observe(max(0.0, event.at - since))
        if event.new in _TIMED:
            began[(event.model, event.replica, event.new)] = event.at
        if event.new is EngineState.BACKOFF and event.old in _UP:
            metrics.restarts.labels(event.model, str(event.replica)).inc()

    return on_engine_event


_UP = frozenset({EngineState.READY, EngineState.UNHEALTHY, EngineState.STARTING, EngineState.WAKING})
_TIMED = (EngineState.STARTING, EngineState.WAKING)


def create_app(
    config: Config,
    *,
    gpus: GpuProbe | None = None,
    config_path: str | None = None,
    server_overrides: Mapping[str, Any] | None = None,
    workers: Fleet | None = None,
    shutdown: Shutdown | None = None,
    endpoints: EndpointTable | None = None,
) -> FastAPI:
    """``config_path``: the file to re-read on ``POST /admin/reload`` and SIGHUP (with ``server_overrides``,
    the command line's --host/--port, applied again). ``workers``: this app is the owner of several worker
    processes (gateway/workers), started once the engines' pool runs and stopped before it. ``shutdown``:
    the stages the server drives on a signal (one is made when not given). ``endpoints``: the table of paths
    (gateway/http/endpoints.py) the keys, the metrics and the passthrough routes follow; by default the
    module's rows and the config's ``passthrough:`` section (a worker builds the same: gateway/workers/worker)."""
    if endpoints is None:
        endpoints = endpoint_table(config.passthrough)
    log_configured(endpoints)
    metrics = Metrics()
    keys = KeyRing(config.auth)
    gpu_probe = gpus or GpuProbe()
    stages = shutdown or Shutdown(config.server.drain_timeout)
    on_engine_event = startup_timer(metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = OwnerState(
            config=config,
            pool=EnginePool(config.models, placement=config.placement, on_event=on_engine_event),
            metrics=metrics,
            keys=keys,
            gpus=gpu_probe,
            shutdown=stages,
            reloader=Reloader(config_path, dict(server_overrides or {})) if config_path else None,
            workers=workers,
        )
        async with serving(app, state, owning(state)):
            yield

    app = FastAPI(title="Inference gateway", version="0.1.0", lifespan=lifespan, redirect_slashes=False)

    def engine_states() -> Iterable[Metric]:
        state: OwnerState | None = getattr(app.state, "gateway", None)
        if state is not None:
            snaps = [(e.spec.name, r.snapshot()) for e in state.pool.entries() for r in e.replicas]
            yield engine_state_family((name, s.replica, s.state.value) for name, s in snaps)
            yield probe_failures_family((name, s.replica, s.probe_failures) for name, s in snaps)
            several = [(e.spec.name, state.pool.status(e)) for e in state.pool.entries() if e.spec.replicas > 1]
            if several:
                yield affinity_family((name, status.sticky, status.spilled) for name, status in several)

    metrics.add_collector(engine_states)
    if workers is not None:
        metrics.add_collector(workers.families)
    metrics.registry.register(GpuCollector(lambda: gpu_probe.read().devices))
    app.include_router(openai.build_router(endpoints))
    app.include_router(models.router)
    app.include_router(ops.router)
    app.include_router(gpu.router)
    app.include_router(admin.router)
    app.include_router(simple.router)
    app.include_router(generate.router)
    app.add_middleware(GatewayMiddleware, keys=keys, metrics=metrics, endpoints=endpoints)
    install_error_handlers(app)
    return app


def log_configured(endpoints: EndpointTable) -> None:
    """One line per ``passthrough:`` path, so an operator sees what the running table holds (a reload that
    changes the section is not applied: gateway/config/reload.py)."""
    for row in endpoints.configured():
        kinds = ", ".join(sorted(row.engines or ()))
        log.info(
            "passthrough: POST %s to %s engines (permission %s, label %s)", row.path, kinds, row.permission, row.label
        )


def install_error_handlers(app: FastAPI) -> None:
    """Every error in the OpenAI shape, with the request id."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return _error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(BadRequest("The request is not valid for this endpoint."), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: "No such endpoint.", 405: "Method not allowed on this endpoint."}.get(
            exc.status_code, "Request failed."
        )
        type_ = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return Response(
            error_body(message, type_, exc.status_code),
            status_code=exc.status_code,
            headers={"x-request-id": request.scope.get(REQUEST_ID_KEY, ""), **(exc.headers or {})},
            media_type="application/json",
        )
