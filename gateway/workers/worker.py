"""One worker process: the request path on the shared port, leases from the owner, the rest forwarded.

Started by the owner's ``Fleet`` only (``python -m gateway.workers.worker``); it never launches an
engine. It builds its app from the config the owner wrote to the private run directory, then keeps
it current from the control line (reloads). On the line it also gets its orders — drain, hurry — and
answers metrics scrapes. If the line drops, the owner is gone and so are the engines: it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import pickle
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import install_error_handlers
from gateway.config.loader import Config
from gateway.deps import GatewayState
from gateway.http.keys import KeyRing
from gateway.http.middleware import GatewayMiddleware
from gateway.http.server import uvicorn_config
from gateway.http.shutdown import DrainingServer
from gateway.media import MediaNormalizer
from gateway.observability.gpu_probe import GpuProbe
from gateway.observability.log_setup import configure_logging
from gateway.observability.metrics import Metrics
from gateway.proxy.upstream.client import Clocks, Upstream
from gateway.routes import generate, openai, simple
from gateway.workers.fleet import CONFIG_FILE, CONTROL_SOCKET, OWNER_SOCKET
from gateway.workers.forward import OwnerForward
from gateway.workers.lease_client import OwnerLink, RemotePool

log = logging.getLogger("gateway.workers")
LOCAL_ROUTERS = (openai.router, simple.router, generate.router)  # the request path; the rest is the owner's


class _Split:
    """Model endpoints to this worker's app, everything else to the owner."""

    def __init__(self, local: ASGIApp, owner: ASGIApp, paths: frozenset[str]) -> None:
        self._local, self._owner, self._paths = local, owner, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self._paths:
            await self._owner(scope, receive, send)
        else:
            await self._local(scope, receive, send)


class Worker:
    def __init__(self, config: Config, worker: int, run_dir: Path) -> None:
        self.config = config
        self.worker = worker
        self.run_dir = run_dir
        self.metrics = Metrics()
        self.forward = OwnerForward(str(run_dir / OWNER_SOCKET), config.server.max_body_bytes)
        self.state: GatewayState | None = None
        self.server: DrainingServer | None = None
        self._link: OwnerLink | None = None
        self._closing = False
        self._stop = asyncio.Event()  # the owner's word that every worker is drained
        self._ordered = False  # this drain is the owner's (not a signal sent to this worker alone)
        self.app = _Split(
            self._local_app(),
            self.forward,
            frozenset(route.path for router in LOCAL_ROUTERS for route in router.routes),
        )  # type: ignore[attr-defined]

    def _local_app(self) -> FastAPI:
        config = self.config

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            clocks = Clocks.from_settings(config.server)
            link = self._link = await OwnerLink.connect(
                str(self.run_dir / CONTROL_SOCKET), self.worker, self._on_message
            )
            state = self.state = GatewayState(
                config=config,
                pool=RemotePool(link, config.models),
                upstream=Upstream(clocks, splice=config.server.raw_connections),
                media=MediaNormalizer(config.media),
                metrics=self.metrics,
                keys=KeyRing(config.auth),
                clocks=clocks,
                gpus=GpuProbe(),
            )
            await state.upstream.start()
            await state.media.start()
            await self.forward.start()
            app.state.gateway = state
            gc.collect()
            gc.freeze()  # as in the owner: start-up objects stay out of the cyclic GC's sweeps
            try:
                yield
            finally:
                gc.unfreeze()
                state.in_flight.draining = True
                self._closing = True
                link.channel.close()
                await self.forward.close()
                await state.media.close()
                await state.upstream.close()

        app = FastAPI(lifespan=lifespan, redirect_slashes=False, openapi_url=None)
        for router in LOCAL_ROUTERS:
            app.include_router(router)
        app.add_middleware(GatewayMiddleware, keys=KeyRing(config.auth), metrics=self.metrics)
        install_error_handlers(app)
        return app

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        state, server = self.state, self.server
        if kind == "metrics" and self._link is not None:
            self._link.channel.send(("metrics", message[1], self.metrics.render().decode()))
        elif kind == "config" and state is not None:
            state.config = message[1]
            assert isinstance(state.pool, RemotePool)
            state.pool.update(state.config.models)
        elif kind in ("drain", "hurry") and server is not None:
            self._ordered = True
            server.escalate(f"the owner says {kind}")  # drain first; then end what is in flight now
        elif kind == "stop":
            self._stop.set()
        elif kind == "lost" and not self._closing:
            log.error("the line to the owner process dropped (it is gone, and its engines with it): exiting")
            if state is not None:
                state.in_flight.abort_all()
            self._stop.set()
            if server is not None:
                server.should_exit = True

    async def drain(self) -> None:
        """The owner's drain: finish what is in flight, say so, keep answering until every worker is done."""
        if self.state is not None:
            await self.state.in_flight.drain(self.config.server.drain_timeout)
        if self._ordered and self._link is not None and not self._link.lost:
            self._link.channel.send(("drained",))
            await self._stop.wait()
        # A signal sent to this worker alone: it drains and exits, and the owner starts another.

    def abort(self) -> None:
        self._stop.set()  # the drain, if one is waiting for the owner's word, is over too
        if self.state is not None:
            self.state.in_flight.abort_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway-worker", description="internal: started by `gateway serve`")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    config: Config = pickle.loads((args.run_dir / CONFIG_FILE).read_bytes())
    s = config.server
    configure_logging(s.log_level, s.log_format, worker=args.worker)
    listener = socket.socket(fileno=args.fd)
    worker = Worker(config, args.worker, args.run_dir)
    server = worker.server = DrainingServer(uvicorn_config(worker.app, s), worker.drain, worker.abort)
    server.run(sockets=[listener])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
