"""uvicorn as every gateway process runs it: the guarded protocol, the asyncio loop, no access log by default."""

from __future__ import annotations

from typing import Any

import uvicorn
from starlette.types import ASGIApp

from gateway.config.server import ServerSettings
from gateway.http.protocol import GuardedHttpToolsProtocol


def uvicorn_config(app: ASGIApp, s: ServerSettings, **where: Any) -> uvicorn.Config:
    """``where``: host and port, ``uds``, or nothing (the caller passes sockets to ``run``)."""
    protocol = type("Protocol", (GuardedHttpToolsProtocol,), {"header_timeout": s.header_timeout})
    # loop="asyncio", not uvloop: uvloop's libuv (>= 1.45, libuv/libuv#3696) accepts ONE connection per loop
    # iteration, so on a busy loop (hundreds of streams) new clients wait seconds in the kernel's accept queue
    # (measured: first event p99 1.6-5.9 s vs 0.21 s; tests/bench/README.md). asyncio drains the queue at once
    # and costs the same CPU here (within +-4 % per request and per streamed event).
    return uvicorn.Config(
        app,
        loop="asyncio",
        http=protocol,
        lifespan="on",
        access_log=s.access_log,
        log_config=None,
        timeout_graceful_shutdown=5,
        server_header=False,
        **where,
    )
