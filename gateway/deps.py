"""What handlers need, built once per app by the lifespan and reached through ``request.app.state``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from engines import EnginePool
from gateway.config.loader import Config
from gateway.config.reload import Reloader
from gateway.http.keys import KeyRing
from gateway.http.shutdown import InFlight
from gateway.media import MediaNormalizer
from gateway.observability.gpu_probe import GpuProbe
from gateway.observability.metrics import Metrics
from gateway.proxy.upstream.client import Clocks, Upstream
from gateway.workers.lease_client import RemotePool

if TYPE_CHECKING:
    from gateway.workers.fleet import Fleet


@dataclass
class GatewayState:
    config: Config
    pool: EnginePool | RemotePool  # a worker's: leases from the owner's pool (gateway/workers)
    upstream: Upstream
    media: MediaNormalizer
    metrics: Metrics
    keys: KeyRing
    clocks: Clocks
    gpus: GpuProbe
    in_flight: InFlight = field(default_factory=InFlight)
    started_at: float = field(default_factory=time.time)
    reloader: Reloader | None = None  # None: started without a config file, nothing to re-read
    workers: Fleet | None = None  # the owner's worker processes, when server.workers > 1

    @property
    def draining(self) -> bool:
        return self.in_flight.draining


async def get_state(request: Request) -> GatewayState:
    # async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop (and a
    # GIL handoff) on every request.
    state = getattr(request.app.state, "gateway", None)
    if state is None:
        raise RuntimeError("the gateway's lifespan has not run: build the app with create_app() and serve it")
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]
