"""``create_app(config)``: the FastAPI app and the lifespan that owns the client, the engines and the media fetcher."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client.core import Metric
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from engines import EnginePool, StateChanged
from gateway.config.loader import Config
from gateway.config.reload import Reloader, install_sighup
from gateway.deps import GatewayState
from gateway.http.errors import BadRequest, GatewayError, error_body
from gateway.http.keys import KeyRing
from gateway.http.middleware import REQUEST_ID_KEY, GatewayMiddleware
from gateway.media import MediaNormalizer
from gateway.observability.gpu_probe import GpuProbe
from gateway.observability.metrics import GpuCollector, Metrics, engine_state_family, probe_failures_family
from gateway.proxy.upstream.client import Clocks, Upstream
from gateway.routes import admin, generate, gpu, models, openai, ops, simple
from gateway.workers.fleet import Fleet

log = logging.getLogger("gateway")


def _error_response(exc: GatewayError, request: Request) -> Response:
    headers = {"x-request-id": request.scope.get(REQUEST_ID_KEY, ""), **exc.headers()}
    return Response(exc.body(), status_code=exc.status, headers=headers, media_type="application/json")


def create_app(
    config: Config,
    *,
    gpus: GpuProbe | None = None,
    config_path: str | None = None,
    server_overrides: Mapping[str, Any] | None = None,
    workers: Fleet | None = None,
) -> FastAPI:
    """``config_path``: the file to re-read on ``POST /admin/reload`` and SIGHUP (with ``server_overrides``,
    the command line's --host/--port, applied again). ``workers``: this app is the owner of several worker
    processes (gateway/workers), started once the engines' pool runs and stopped before it."""
    metrics = Metrics()
    keys = KeyRing(config.auth)
    gpu_probe = gpus or GpuProbe()

    def on_engine_event(event: StateChanged) -> None:
        if event.new.value == "backoff" and event.old.value in ("ready", "unhealthy", "starting"):
            metrics.restarts.labels(event.model, str(event.replica)).inc()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clocks = Clocks.from_settings(config.server)
        state = GatewayState(
            config=config,
            pool=EnginePool(config.models, placement=config.placement, on_event=on_engine_event),
            upstream=Upstream(clocks, splice=config.server.raw_connections),
            media=MediaNormalizer(config.media),
            metrics=metrics,
            keys=keys,
            clocks=clocks,
            gpus=gpu_probe,
            reloader=Reloader(config_path, dict(server_overrides or {})) if config_path else None,
            workers=workers,
        )
        undo_sighup: Callable[[], None] = lambda: None  # noqa: E731
        await state.upstream.start()
        await state.media.start()
        try:
            await state.pool.start()
            app.state.gateway = state
            if workers is not None:
                await workers.start(state)
            if state.reloader is not None:
                undo_sighup = install_sighup(state, state.reloader)
            # Everything built so far lives as long as the app: keep it out of the cyclic GC's sweeps. A full
            # collection otherwise walks ~77k start-up objects, a 30-40 ms stop of every stream; undone at the end.
            gc.collect()
            gc.freeze()
            yield
        finally:
            gc.unfreeze()
            undo_sighup()
            state.in_flight.draining = True
            if workers is not None:
                await workers.stop()
            await state.pool.stop()
            await state.media.close()
            await state.upstream.close()
            gpu_probe.close()

    app = FastAPI(title="Inference gateway", version="0.1.0", lifespan=lifespan, redirect_slashes=False)

    def engine_states() -> Iterable[Metric]:
        state: GatewayState | None = getattr(app.state, "gateway", None)
        if state is not None:
            snaps = [(e.spec.name, r.snapshot()) for e in state.pool.entries() for r in e.replicas]
            yield engine_state_family((name, s.replica, s.state.value) for name, s in snaps)
            yield probe_failures_family((name, s.replica, s.probe_failures) for name, s in snaps)

    metrics.add_collector(engine_states)
    if workers is not None:
        metrics.add_collector(workers.families)
    metrics.registry.register(GpuCollector(lambda: gpu_probe.read().devices))
    app.include_router(openai.router)
    app.include_router(models.router)
    app.include_router(ops.router)
    app.include_router(gpu.router)
    app.include_router(admin.router)
    app.include_router(simple.router)
    app.include_router(generate.router)
    app.add_middleware(GatewayMiddleware, keys=keys, metrics=metrics)
    install_error_handlers(app)
    return app


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
