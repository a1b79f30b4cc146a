"""One worker process: the request path on the shared port, leases from the owner, the rest forwarded.

Started by the owner's ``Fleet`` only (``python -m gateway.workers.worker``); it never launches an
engine. It builds its app from the config the owner wrote to the private run directory, then keeps
it current from the control line (reloads). On the line it also gets its orders — drain, hurry — and
answers metrics scrapes. If the line drops, the owner is gone and so are the engines: it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pickle
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import install_error_handlers, serving
from gateway.config.loader import Config
from gateway.deps import GatewayState
from gateway.http.endpoints import EndpointTable, endpoint_table
from gateway.http.keys import KeyRing
from gateway.http.middleware import GatewayMiddleware
from gateway.http.server import uvicorn_config
from gateway.http.shutdown import DrainingServer, Shutdown
from gateway.observability.gpu_probe import GpuProbe
from gateway.observability.log_setup import configure_logging
from gateway.observability.metrics import Metrics
from gateway.routes import generate, openai, simple
from gateway.workers.fleet import CONFIG_FILE, CONTROL_SOCKET, OWNER_SOCKET
from gateway.workers.forward import OwnerForward
from gateway.workers.lease_client import Order, OwnerLink, RemotePool
from gateway.workers.messages import ConfigUpdate, Drain, Drained, Hurry, MetricsText, Scrape, Stop

log = logging.getLogger("gateway.workers")


def local_routers(endpoints: EndpointTable) -> tuple[APIRouter, ...]:
    """The request path's routes (``endpoints``' passthroughs among them); the rest is the owner's."""
    return (openai.build_router(endpoints), simple.router, generate.router)


class _Split:
    """Model endpoints to this worker's app, everything else to the owner."""

    def __init__(self, local: ASGIApp, owner: ASGIApp, paths: frozenset[str]) -> None:
        self._local, self._owner, self._paths = local, owner, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self._paths:
            await self._owner(scope, receive, send)
        else:
            await self._local(scope, receive, send)


class OwnerPeer:
    """The worker's ``Peers`` for the shutdown: its owner, on the control line.

    A drain the owner ordered ends with this worker saying so and waiting for the owner's word that every
    worker is done (they close the port together); a drain of this worker alone (a signal sent to it) just
    ends, and the owner starts another."""

    def __init__(self, link: OwnerLink) -> None:
        self.link = link
        self.ordered = False  # the drain under way is the owner's
        self.closing = False  # the line is closed on purpose: its end is not the owner's death
        self._stop = asyncio.Event()  # the owner's word that every worker is drained

    def stopped(self) -> None:
        self._stop.set()

    async def drain(self, grace: float) -> None:
        if self.ordered and not self.link.lost:
            self.link.channel.send(Drained())
            await self._stop.wait()

    def hurry(self) -> None:
        self._stop.set()  # the drain, if one is waiting for the owner's word, is over too

    async def stop(self) -> None:
        self.closing = True
        self.link.channel.close()


class Worker:
    def __init__(self, config: Config, worker: int, run_dir: Path) -> None:
        self.config = config
        self.worker = worker
        self.run_dir = run_dir
        self.metrics = Metrics()
        self.shutdown = Shutdown(config.server.drain_timeout)
        self.forward = OwnerForward(str(run_dir / OWNER_SOCKET), config.server.max_body_bytes)
        self.state: GatewayState | None = None
        self.server: DrainingServer | None = None
        self.owner: OwnerPeer | None = None
        self.pool: RemotePool | None = None
        # The owner's table (create_app builds the same from the same config), so a configured passthrough
        # is answered here with its permission and label, not forwarded or unknown. Fixed for the process's
        # life, as the owner's is: a reload that changes it says restart_required.
        self.endpoints = endpoint_table(config.passthrough)
        routers = local_routers(self.endpoints)
        self.local_paths = frozenset(
            route.path for router in routers for route in router.routes if isinstance(route, APIRoute)
        )
        self.app = _Split(self._local_app(routers), self.forward, self.local_paths)

    def _local_app(self, routers: tuple[APIRouter, ...]) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            link = await OwnerLink.connect(
                str(self.run_dir / CONTROL_SOCKET), self.worker, self._on_order, self._on_lost
            )
            self.shutdown.peers = self.owner = OwnerPeer(link)
            self.pool = RemotePool(link, self.config.models)
            self.state = GatewayState(
                config=self.config,
                pool=self.pool,
                metrics=self.metrics,
                keys=KeyRing(self.config.auth),
                gpus=GpuProbe(),
                shutdown=self.shutdown,
            )
            self.shutdown.close_with(self.forward.close)
            await self.forward.start()
            async with serving(app, self.state):
                yield

        app = FastAPI(lifespan=lifespan, redirect_slashes=False, openapi_url=None)
        for router in routers:
            app.include_router(router)
        app.add_middleware(
            GatewayMiddleware, keys=KeyRing(self.config.auth), metrics=self.metrics, endpoints=self.endpoints
        )
        install_error_handlers(app)
        return app

    def _on_order(self, order: Order) -> None:
        state, pool, server, owner = self.state, self.pool, self.server, self.owner
        match order:
            case Scrape(seq):
                if owner is not None:
                    owner.link.channel.send(MetricsText(seq, self.metrics.render().decode()))
            case ConfigUpdate(config):
                if state is not None and pool is not None:
                    state.config = config
                    pool.update(config.models)
            case Drain() | Hurry():
                if owner is not None:
                    owner.ordered = True
                if server is not None:
                    server.escalate(f"the owner says {type(order).__name__.lower()}")  # drain, then hurry
            case Stop():
                if owner is not None:
                    owner.stopped()

    def _on_lost(self) -> None:
        if self.owner is not None and self.owner.closing:
            return
        log.error("the line to the owner process dropped (it is gone, and its engines with it): exiting")
        self.shutdown.hurry()
        if self.server is not None:
            self.server.should_exit = True


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
    server = worker.server = DrainingServer(uvicorn_config(worker.app, s), worker.shutdown)
    server.run(sockets=[listener])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
