"""What handlers need, built once per app by the lifespan and reached through ``request.app.state``.

``GatewayState`` is what every process has: the config, a lease source (``EnginePool`` in the owner, a
worker's ``RemotePool``), the clients, the shutdown. ``OwnerState`` adds what only the engines' owner
has: the pool itself, its worker processes, the config file to reload. Owner-only routes (admin, ops,
models, gpu) take ``OwnerStateDep``; the request path takes ``StateDep`` and never learns which it runs in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from engines import EnginePool
from engines.scheduling.contract import LeaseSource
from gateway.config.loader import Config
from gateway.config.reload import Reloader
from gateway.http.keys import KeyRing
from gateway.http.shutdown import InFlight, Shutdown
from gateway.media import MediaNormalizer
from gateway.observability.gpu_probe import GpuProbe
from gateway.observability.metrics import Metrics
from gateway.proxy.upstream.client import Clocks, Upstream
from gateway.workers.fleet import Fleet


@dataclass(kw_only=True, eq=False)
class GatewayState:
    """The one builder of a process's state: the clients are made here, from the config."""

    config: Config
    pool: LeaseSource
    metrics: Metrics
    keys: KeyRing
    gpus: GpuProbe
    shutdown: Shutdown
    started_at: float = field(default_factory=time.time)
    clocks: Clocks = field(init=False)
    upstream: Upstream = field(init=False)
    media: MediaNormalizer = field(init=False)

    def __post_init__(self) -> None:
        server = self.config.server
        self.clocks = Clocks.from_settings(server)
        self.upstream = Upstream(self.clocks, splice=server.raw_connections)
        self.media = MediaNormalizer(self.config.media)

    @property
    def in_flight(self) -> InFlight:
        return self.shutdown.in_flight

    @property
    def draining(self) -> bool:
        return self.shutdown.draining


@dataclass(kw_only=True, eq=False)
class OwnerState(GatewayState):
    """The engines' owner: its pool is the ``EnginePool`` (snapshots, status, commands, reload)."""

    pool: EnginePool
    workers: Fleet | None = None  # its worker processes, when server.workers > 1
    reloader: Reloader | None = None  # None: started without a config file, nothing to re-read

    def apply_config(self, config: Config) -> None:
        """A reload's result becomes the running config, here and in every worker."""
        self.config = config
        if self.workers is not None:
            self.workers.publish(config)


async def get_state(request: Request) -> GatewayState:
    # async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop (and a
    # GIL handoff) on every request.
    state = getattr(request.app.state, "gateway", None)
    if not isinstance(state, GatewayState):
        raise RuntimeError("the gateway's lifespan has not run: build the app with create_app() and serve it")
    return state


async def get_owner_state(request: Request) -> OwnerState:
    state = await get_state(request)
    if not isinstance(state, OwnerState):
        raise RuntimeError(f"{request.url.path} is the engines' owner's: a worker forwards it, never answers it")
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]
OwnerStateDep = Annotated[OwnerState, Depends(get_owner_state)]
