"""The shared upstream: one aiohttp session and the raw engine connections, built and closed by the lifespan.

``Upstream.exchange`` picks what carries one request (gateway/proxy/upstream/exchange.py): a raw keep-alive
connection for an engine on plain HTTP, the aiohttp session for the rest (https:// remotes) and for
everything when raw connections are off.

Why aiohttp and not httpx here: the request path is the product's hot path, and httpx's connection
pool re-checks every pooled connection (a ``poll()`` each) on every request — ~30 % of a minimal
httpx proxy's CPU at 32 concurrent requests, and a 66 % throughput loss at 256 streams reported by
GPUStack, which moved to aiohttp (docs/PERFORMANCE.md, gpustack/gpustack#1842). The four clocks of an
upstream call (connect, first byte, idle between chunks, total) are kept by the relay, not here:
aiohttp's own ``sock_read`` cannot tell a long prefill from a stalled stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from gateway.config.server import ServerSettings
from gateway.proxy.upstream.exchange import Exchange
from gateway.proxy.upstream.raw import EngineConnections, RawExchange
from gateway.proxy.upstream.session import SessionExchange


@dataclass(frozen=True)
class Clocks:
    connect: float
    first_byte: float
    idle: float
    total: float

    @classmethod
    def from_settings(cls, s: ServerSettings) -> Clocks:
        return cls(s.connect_timeout, s.first_byte_timeout, s.idle_timeout, s.total_timeout)


class Upstream:
    def __init__(self, clocks: Clocks, *, splice: bool = True) -> None:
        self.clocks = clocks
        self._session: aiohttp.ClientSession | None = None
        # Raw keep-alive connections to engines on plain HTTP (gateway/proxy/upstream/raw.py); None: aiohttp for all.
        self.connections: EngineConnections | None = EngineConnections() if splice else None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # concurrency is bounded in front of each engine, not by the pool
            limit_per_host=0,
            keepalive_timeout=30,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.clocks.connect),
            auto_decompress=False,  # bytes pass through as the engine sent them
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            trust_env=False,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not awaited")
        return self._session

    def exchange(self, url: str, *, raw: bool = True) -> Exchange:
        """What carries one request to ``url``; ``raw=False`` asks for aiohttp (a stream whose client's
        response cycle is not reachable: raw connections deliver in callbacks, which need it)."""
        if raw and self.connections is not None and url.startswith("http://"):
            return RawExchange(self.connections, self.clocks.connect)
        return SessionExchange(self.session)

    async def close(self) -> None:
        if self.connections is not None:
            self.connections.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
