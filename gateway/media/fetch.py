"""``SafeFetcher``: the one way the gateway fetches a client's URL.

Its own ``aiohttp.ClientSession`` (never the engine client): no cookies, no client or engine
headers, no proxies from the environment, no transparent decompression. Every hop — the first URL
and each redirect, followed by hand — is checked for scheme, userinfo, domain allowlist and, for IP
literals, address; host names are checked by the ``GuardedResolver`` the connector connects with.
Bodies are read against a byte cap; the whole fetch (queueing, redirects, body) runs under one
deadline; cancelling the caller closes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from gateway.http.errors import MediaError
from gateway.media import failures
from gateway.media.settings import MediaConfig
from gateway.media.ssrf import AddressPolicy, BlockedAddress, GuardedResolver
from gateway.media.urls import check_http_url, parse_http_url, redirect_target, safe_for_logs

log = logging.getLogger(__name__)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEADERS = {
    "Accept": "image/*, video/*, audio/*;q=0.9, */*;q=0.5",
    "Accept-Encoding": "identity",
    "User-Agent": "inference-gateway-media/1",
}
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str | None  # the server's claim: logged, used only as a hint for audio/video


@dataclass
class _HostSlots:
    semaphore: asyncio.Semaphore
    users: int = 0  # fetches holding or waiting for a slot


class SafeFetcher:
    """Fetch http(s) URLs safely. ``start()`` before use, ``close()`` after (or ``async with``).

    ``resolver`` answers DNS questions (default: the event loop's getaddrinfo); whatever it answers
    is checked. ``trusted_endpoints`` are ``(address, port)`` pairs treated as public: tests only.
    """

    def __init__(
        self,
        config: MediaConfig,
        *,
        resolver: AbstractResolver | None = None,
        trusted_endpoints: Iterable[tuple[str, int]] = (),
    ) -> None:
        self.config = config
        self.policy = AddressPolicy(allow_private=config.allow_private_networks, trusted=trusted_endpoints)
        self._inner_resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self._semaphore = asyncio.Semaphore(config.max_concurrent_fetches)
        self._per_host: dict[tuple[str, int], _HostSlots] = {}

    @property
    def started(self) -> bool:
        return self._session is not None

    async def start(self) -> None:
        if self._session is not None:
            return
        self._resolver = GuardedResolver(self.policy, self._inner_resolver)
        connector = aiohttp.TCPConnector(
            resolver=self._resolver,
            use_dns_cache=True,
            ttl_dns_cache=10,
            limit=self.config.max_concurrent_fetches,
            limit_per_host=self.config.per_host_fetches,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            headers=_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None, connect=self.config.fetch_timeout),
            raise_for_status=False,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        resolver, self._resolver = self._resolver, None
        if session is not None:
            await session.close()
        if resolver is not None:
            await resolver.close()  # the connector closes only resolvers it made itself

    async def __aenter__(self) -> SafeFetcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def fetch(self, url: str | URL, *, param: str | None = None) -> Fetched:
        """The body at ``url`` (at most ``max_image_bytes``), following checked redirects."""
        if self._session is None:
            raise RuntimeError("SafeFetcher.start() was not awaited")
        if isinstance(url, URL):
            target = check_http_url(url, self.config.allowed_domains, param)
        else:
            target = parse_http_url(url, self.config.allowed_domains, param)
        try:
            async with asyncio.timeout(self.config.fetch_timeout):
                async with self._host_slot(target), self._semaphore:
                    return await self._follow(target, param)
        except TimeoutError:
            log.info("media fetch timed out: %s", safe_for_logs(target))
            raise failures.fetch_timeout(self.config.fetch_timeout, param) from None

    @contextlib.asynccontextmanager
    async def _host_slot(self, url: URL) -> AsyncIterator[None]:
        """One of the origin host's slots: its own queue first, so a slow host waits behind itself only."""
        key = (url.raw_host or "", url.port or 0)
        slots = self._per_host.get(key)
        if slots is None:
            slots = self._per_host[key] = _HostSlots(asyncio.Semaphore(self.config.per_host_fetches))
        slots.users += 1
        try:
            async with slots.semaphore:
                yield
        finally:
            slots.users -= 1
            if not slots.users:
                del self._per_host[key]  # no host is remembered once nobody fetches from it

    async def _follow(self, url: URL, param: str | None) -> Fetched:
        for _hop in range(self.config.max_redirects + 1):
            result = await self._get(url, param)
            if isinstance(result, Fetched):
                return result
            url = result
        raise failures.fetch_failed(param, f"more than {self.config.max_redirects} redirects")

    async def _get(self, url: URL, param: str | None) -> Fetched | URL:
        """One hop: the body, or the checked URL a redirect points to."""
        assert self._session is not None
        try:
            self.policy.check_host(url.raw_host or "", url.port or 0)
            response = await self._session.get(url, allow_redirects=False)
        except BlockedAddress as exc:
            log.info("media fetch refused (%s): %s", exc.reason, safe_for_logs(url))
            raise failures.forbidden(param) from None
        except aiohttp.InvalidURL:
            raise failures.forbidden(param) from None
        except aiohttp.ClientConnectorDNSError:
            raise failures.fetch_failed(param, "the host name could not be resolved") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.info("media fetch failed (%s): %s", type(exc).__name__, safe_for_logs(url))
            raise failures.fetch_failed(param) from None
        complete = False
        try:
            if response.status in _REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise failures.fetch_failed(param, "a redirect without a Location")
                return redirect_target(url, location, self.config.allowed_domains, param)
            if response.status != 200:
                raise failures.fetch_failed(param, f"HTTP status {response.status}")
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise failures.fetch_failed(param, "compressed responses are not accepted")
            data = await self._read_capped(response, param)
            complete = True
            return Fetched(data=data, content_type=response.headers.get("Content-Type"))
        finally:
            if complete:
                response.release()
            else:
                response.close()  # drop the connection: never drain an unwanted or hostile body

    async def _read_capped(self, response: aiohttp.ClientResponse, param: str | None) -> bytes:
        cap = self.config.max_image_bytes
        if response.content_length is not None and response.content_length > cap:
            raise failures.too_large_bytes(cap, param)
        body = bytearray()
        try:
            while chunk := await response.content.read(_CHUNK):
                body += chunk
                if len(body) > cap:
                    raise failures.too_large_bytes(cap, param)
        except MediaError:
            raise
        except (aiohttp.ClientError, OSError, ValueError):
            raise failures.fetch_failed(param, "the connection broke") from None
        return bytes(body)
