"""Image fetching against real sockets on 127.0.0.1 (docs/RELIABILITY.md §6 F1-F11, D5).

Servers: an aiohttp image server (valid images with wrong Content-Types, redirects, oversized,
drip-fed and gzip bodies; it records requests and disconnects), a raw server for a body without a
length, and a canary that counts every TCP connection it gets. Blocked URLs must leave the canary
at zero. With the default config nothing on loopback is reachable; the tests that need a "public"
server either trust exactly the image server's ``(127.0.0.1, port)`` (``trusted_endpoints``, the
test-only override) or set ``allow_private_networks`` with an ``allowed_domains`` list. DNS comes
from a stub resolver, so no test depends on a real name server. An audit hook records every
``socket.connect`` and every ``open`` of /etc/passwd, to prove refused URLs never reach the network.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import socket
import struct
import sys
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image

from gateway.http.errors import BadRequest
from gateway.media import MediaConfig, MediaNormalizer, SafeFetcher

pytestmark = pytest.mark.anyio

# ---------------------------------------------------------------- the audit hook (installed once)

_AUDIT: dict[str, Any] = {"on": False, "connects": [], "opens": []}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _AUDIT["on"]:
        return
    try:
        if event == "socket.connect":
            _AUDIT["connects"].append(args[1])
        elif event == "open" and isinstance(args[0], str) and args[0].startswith("/etc/passwd"):
            _AUDIT["opens"].append(args[0])
    except Exception:  # an audit hook must never raise
        pass


sys.addaudithook(_audit)


@pytest.fixture
def audit() -> Any:
    _AUDIT["connects"].clear()
    _AUDIT["opens"].clear()
    _AUDIT["on"] = True
    yield _AUDIT
    _AUDIT["on"] = False


def connected_ports(audit: dict[str, Any]) -> set[int]:
    return {a[1] for a in audit["connects"] if isinstance(a, tuple) and len(a) >= 2}


def connected_hosts(audit: dict[str, Any]) -> set[str]:
    return {a[0] for a in audit["connects"] if isinstance(a, tuple) and len(a) >= 2}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------- images


def _encode(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, (16, 12), (200, 30, 90))
    img.putpixel((3, 4), (1, 2, 3))
    img.save(buf, fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (a few dozen bytes: a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


PNG = _encode("PNG")
JPEG = _encode("JPEG")
WEBP = _encode("WEBP")
IMAGES = {
    "png": PNG,
    "jpeg": JPEG,
    "webp": WEBP,
    "bomb": png_header(30000, 30000),
    "random": bytes(range(256)) * 8,
    "truncated-jpeg": JPEG[: len(JPEG) // 2],
    "truncated-png": PNG[:40],
    "tiff": _encode("TIFF"),
}


# ---------------------------------------------------------------- servers


@dataclass
class ImageServer:
    port: int = 0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    streaming: asyncio.Event = field(default_factory=asyncio.Event)
    drips_open: int = 0  # /drip requests being answered now (one connection each: no pipelining)
    drips_peak: int = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def hits(self, prefix: str) -> int:
        return sum(1 for path, _ in self.requests if path.startswith(prefix))

    def lost(self, path: str) -> None:
        self.disconnects.append(path)
        self.disconnected.set()


def _image_app(server: ImageServer) -> web.Application:
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        server.requests.append((request.path_qs, dict(request.headers)))
        return await handler(request)

    async def image(request: web.Request) -> web.Response:
        # Deliberately wrong Content-Type: the gateway must sniff, never trust it (F11).
        return web.Response(body=IMAGES[request.match_info["name"]], content_type="text/plain")

    async def redirect(request: web.Request) -> web.Response:
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["to"]})

    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PNG, content_type="image/png")
        return web.Response(status=302, headers={"Location": f"/chain/{n - 1}"})

    async def endless(request: web.Request, response: web.StreamResponse, delay: float, chunk: bytes) -> None:
        await response.prepare(request)
        server.streaming.set()
        try:
            while True:
                await response.write(chunk)
                await asyncio.sleep(delay)
        except (ConnectionError, OSError, asyncio.CancelledError):
            server.lost(request.path)

    async def big_honest(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.content_length = 500_000_000
        await endless(request, response, 0.01, PNG[:8] + b"\0" * 65528)
        return response

    async def chunked_endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await endless(request, response, 0, PNG[:8] + b"\0" * 65528)
        return response

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.content_length = 10_000
        server.drips_open += 1
        server.drips_peak = max(server.drips_peak, server.drips_open)
        try:
            await endless(request, response, 0.05, b"\x89")
        finally:
            server.drips_open -= 1
        return response

    async def gzipped(request: web.Request) -> web.Response:
        body = gzip.compress(b"\0" * 1_000_000)
        return web.Response(body=body, headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="no")

    async def cookie(request: web.Request) -> web.Response:
        response = web.Response(body=PNG, content_type="image/png")
        response.set_cookie("session", "SECRET-COOKIE")
        return response

    app = web.Application(middlewares=[web.middleware(record)])
    app.router.add_get("/img/{name}", image)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/big-honest", big_honest)
    app.router.add_get("/chunked-endless", chunked_endless)
    app.router.add_get("/drip", drip)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/cookie", cookie)
    return app


@contextlib.asynccontextmanager
async def _serving_images() -> AsyncIterator[ImageServer]:
    server = ImageServer()
    runner = web.AppRunner(_image_app(server), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def image_server() -> AsyncIterator[ImageServer]:
    async with _serving_images() as server:
        yield server


@pytest.fixture
async def other_image_server() -> AsyncIterator[ImageServer]:
    """A second, healthy origin: what a slow one must not starve."""
    async with _serving_images() as server:
        yield server


@dataclass
class Canary:
    port: int = 0
    connections: int = 0


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    """Counts every TCP connection; a blocked URL must never make one."""
    state = Canary()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def no_length_server() -> AsyncIterator[int]:
    """HTTP/1.1 200 with neither Content-Length nor chunking: the body runs until the socket closes."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n" + PNG[:8])
            while True:
                writer.write(b"\0" * 65536)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


class StubResolver(AbstractResolver):
    """DNS answers from a table (a list per name; a list of lists is answered in turn). Counts lookups."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        self.calls.append(host)
        answer = self.table.get(host.rstrip("."))
        if answer is None:
            raise OSError(socket.EAI_NONAME, "stub: no such host")
        if answer and isinstance(answer[0], list):
            answer = answer[min(self.calls.count(host), len(answer)) - 1]
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in answer
        ]

    async def close(self) -> None:
        pass


FAST = {"fetch_timeout": 2.0, "max_image_bytes": 200_000}


def make(
    config: dict[str, Any] | None = None,
    *,
    resolver: AbstractResolver | None = None,
    trusted: tuple[tuple[str, int], ...] = (),
) -> MediaNormalizer:
    cfg = MediaConfig(**{**FAST, **(config or {})})
    stub = resolver or StubResolver({})
    return MediaNormalizer(cfg, fetcher=SafeFetcher(cfg, resolver=stub, trusted_endpoints=trusted))


def chat(*urls: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "what is this?"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "m", "messages": [{"role": "user", "content": parts}]}


async def refused(normalizer: MediaNormalizer, url: str, dialect: str = "openai") -> BadRequest:
    with pytest.raises(BadRequest) as info:
        await normalizer.normalize_chat(chat(url), dialect)
    return info.value


def data_url_bytes(url: str) -> tuple[str, bytes]:
    header, _, payload = url.partition(",")
    assert header.endswith(";base64")
    return header[5:].split(";")[0], base64.b64decode(payload, validate=True)


# ---------------------------------------------------------------- F1 literals, F2 parser tricks


F1_URLS = [
    "http://127.0.0.1:{canary}/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:{canary}/",
    "http://[::ffff:127.0.0.1]:{canary}/",
    "http://0.0.0.0:{canary}/",
    "http://127.1:{canary}/",
    "http://2130706433:{canary}/",
    "http://0x7f000001:{canary}/",
    "http://0177.0.0.1:{canary}/",
    "http://10.0.0.1/",
    "http://192.168.1.1/",
    "http://172.16.0.1/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://[fc00::1]/",
    "http://[fe80::1]/",
    "http://[64:ff9b::7f00:1]:{canary}/",
    "http://[2002:7f00:1::]:{canary}/",
    "http://localhost:{canary}/",
    "http://LOCALHOST.:{canary}/",
    "http://foo.localhost:{canary}/",
    "http://loopback.test:{canary}/",  # a name that resolves (stub) to 127.0.0.1
    "http://meta.test/",  # ... to the metadata address
]


@pytest.mark.parametrize("template", F1_URLS)
async def test_f1_private_and_metadata_literals_are_refused_without_connecting(
    template: str, canary: Canary, audit: dict[str, Any]
) -> None:
    resolver = StubResolver({"loopback.test": ["127.0.0.1"], "meta.test": ["169.254.169.254"]})
    async with make(resolver=resolver) as normalizer:
        error = await refused(normalizer, template.format(canary=canary.port))
    assert error.code == "image_url_forbidden"
    assert error.status == 400 and error.type == "invalid_request_error"
    assert "127.0.0.1" not in error.message and "169.254" not in error.message
    assert canary.connections == 0
    assert audit["connects"] == []


@pytest.mark.parametrize(
    ("template", "codes"),
    [
        ("http://ok@127.0.0.1:{canary}/", {"image_url_forbidden"}),
        ("http://ok:pw@127.0.0.1:{canary}/", {"image_url_forbidden"}),
        ("http://127.0.0.1:{canary}\\@ok.test/", {"image_url_forbidden"}),
        ("http://ok.test\\@127.0.0.1:{canary}/", {"image_url_forbidden"}),
        # The fragment hides "@127.0.0.1": the host is ok.test (NXDOMAIN here), never 127.0.0.1.
        ("http://ok.test:80#@127.0.0.1:{canary}/", {"image_fetch_failed"}),
        ("http://127.0.0.1:{canary}/\tx", {"invalid_image_url"}),
        ("http://127.0.0.1:{canary}/\nx", {"invalid_image_url"}),
        (" http://127.0.0.1:{canary}/", {"invalid_image_url"}),
        ("http://127.0.0.1:{canary}/\u200bx", {"invalid_image_url"}),
        ("http://%31%32%37.0.0.1:{canary}/", {"image_url_forbidden", "invalid_image_url"}),
        ("HTTP://127.0.0.1:{canary}/", {"image_url_forbidden"}),
        ("http:127.0.0.1:{canary}/", {"invalid_image_url", "image_url_forbidden"}),
        ("http:///127.0.0.1:{canary}/", {"invalid_image_url"}),
    ],
)
async def test_f2_parser_tricks(template: str, codes: set[str], canary: Canary, audit: dict[str, Any]) -> None:
    async with make() as normalizer:
        error = await refused(normalizer, template.format(canary=canary.port))
    assert error.code in codes
    assert canary.connections == 0
    assert audit["connects"] == []


async def test_f2_allowlist_compares_the_host_the_client_connects_to(canary: Canary, audit: dict[str, Any]) -> None:
    resolver = StubResolver({"ok.test": ["127.0.0.1"], "xn--exmple-4nf.com": ["127.0.0.1"]})
    config = {"allowed_domains": ["example.com"], "allow_private_networks": True}
    async with make(config, resolver=resolver) as normalizer:
        for url in (
            f"http://ok.test:{canary.port}#@example.com/",  # the host is ok.test: not allowed
            f"http://example.com@ok.test:{canary.port}/",
            f"http://ex\u0430mple.com:{canary.port}/",  # a Cyrillic "a": a homograph, punycode differs
            f"http://example.com.evil.test:{canary.port}/",
        ):
            assert (await refused(normalizer, url)).code == "image_url_forbidden"
    assert resolver.calls == []
    assert canary.connections == 0 and audit["connects"] == []


# ---------------------------------------------------------------- F3 redirects


async def test_f3_redirect_escapes_are_rechecked_each_hop(
    image_server: ImageServer, canary: Canary, audit: dict[str, Any]
) -> None:
    resolver = StubResolver({"canary.test": ["127.0.0.1"]})
    trusted = (("127.0.0.1", image_server.port),)
    targets = [
        f"http://127.0.0.1:{canary.port}/",
        f"http://canary.test:{canary.port}/",
        f"http://[::1]:{canary.port}/",
        "http://169.254.169.254/latest/meta-data/iam/",
        "file:///etc/passwd",
        "file://localhost/etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
        f"http://user@127.0.0.1:{image_server.port}/img/png",
    ]
    async with make(resolver=resolver, trusted=trusted) as normalizer:
        for target in targets:
            for status in ("302", "307"):
                url = image_server.url(f"/redirect?status={status}&to={target}")
                error = await refused(normalizer, url)
                assert error.code == "image_url_forbidden", target
    assert canary.connections == 0
    assert connected_ports(audit) == {image_server.port}
    assert audit["opens"] == []
    assert image_server.hits("/img/") == 0


async def test_f3_redirect_chain_stops_at_max_redirects(image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    async with make(trusted=trusted) as normalizer:
        error = await refused(normalizer, image_server.url("/chain/10"))
        assert error.code == "image_fetch_failed"
        assert image_server.hits("/chain/") == 4  # the first request + 3 redirects, then it stops
        body = chat(image_server.url("/chain/3"))
        await normalizer.normalize_chat(body, "openai")
    assert body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


async def test_f3_allowlist_applies_to_every_hop(image_server: ImageServer, canary: Canary) -> None:
    resolver = StubResolver({"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    config = {"allowed_domains": ["img.test"], "allow_private_networks": True}
    async with make(config, resolver=resolver) as normalizer:
        hop = f"http://other.test:{canary.port}/x.png"
        error = await refused(normalizer, image_server.url(f"/redirect?to={hop}", host="img.test"))
        assert error.code == "image_url_forbidden"
        # A relative redirect stays on the allowed host and works.
        body = chat(image_server.url("/redirect?to=/img/png", host="img.test"))
        await normalizer.normalize_chat(body, "lmdeploy")
    assert canary.connections == 0
    assert "other.test" not in resolver.calls
    mime, data = data_url_bytes(body["messages"][0]["content"][1]["image_url"]["url"])
    assert (mime, data) == ("image/png", PNG)


# ---------------------------------------------------------------- F4 DNS answers


async def test_f4_mixed_answers_are_refused_whole(image_server: ImageServer, audit: dict[str, Any]) -> None:
    resolver = StubResolver(
        {
            "mixed.test": ["93.184.216.34", "10.0.0.1"],
            # The first answer is the (trusted) image server, the second loopback: refused all the same.
            "half.test": ["127.0.0.1", "::1"],
        }
    )
    trusted = (("127.0.0.1", image_server.port),)
    async with make(resolver=resolver, trusted=trusted) as normalizer:
        for host in ("mixed.test", "half.test"):
            error = await refused(normalizer, image_server.url("/img/png", host=host))
            assert error.code == "image_url_forbidden"
            assert "10.0.0.1" not in error.message and "::1" not in error.message
    assert audit["connects"] == []
    assert image_server.requests == []


async def test_f4_the_checked_answer_is_the_one_connected_to(image_server: ImageServer, audit: dict[str, Any]) -> None:
    """One lookup per fetch, made by the connector itself: no second lookup for a rebinding to use."""
    resolver = StubResolver({"rebind.test": [["127.0.0.1"], ["10.0.0.1"], ["10.0.0.1"]]})
    trusted = (("127.0.0.1", image_server.port),)
    async with make(resolver=resolver, trusted=trusted) as normalizer:
        body = chat(image_server.url("/img/png", host="rebind.test"))
        await normalizer.normalize_chat(body, "openai")
        assert resolver.calls == ["rebind.test"]
        # Later lookups rebind to a private address. A fresh session (no pooled connection, no DNS
        # cache) must look up again, and that answer is checked again.
        await normalizer.fetcher.close()
        await normalizer.fetcher.start()
        error = await refused(normalizer, image_server.url("/img/jpeg", host="rebind.test"))
        assert error.code == "image_url_forbidden"
    assert "10.0.0.1" not in connected_hosts(audit)
    assert image_server.hits("/img/") == 1


# ---------------------------------------------------------------- F5 schemes (files: tests/unit/test_media_local.py)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "file://localhost/etc/passwd",
        "/etc/passwd",
        "../../../../etc/passwd",
        "ftp://127.0.0.1/x.png",
        "gopher://127.0.0.1:70/",
        "javascript:alert(1)",
        "dict://127.0.0.1:11211/",
    ],
)
async def test_f5_files_and_other_schemes_are_refused(url: str, audit: dict[str, Any]) -> None:
    async with make() as normalizer:
        error = await refused(normalizer, url, "lmdeploy")
    assert error.code == "image_url_forbidden"
    assert audit["opens"] == [] and audit["connects"] == []


# ---------------------------------------------------------------- F6 size, F7 time, F8 encoding


async def test_f6_honest_content_length_is_refused_before_reading(image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    async with make(trusted=trusted) as normalizer:
        error = await refused(normalizer, image_server.url("/big-honest"))
        assert error.code == "image_too_large"
        await asyncio.wait_for(image_server.disconnected.wait(), 5)


@pytest.mark.parametrize("path", ["/chunked-endless", "no-length"])
async def test_f6_bodies_without_honest_length_stop_at_the_cap(
    path: str, image_server: ImageServer, no_length_server: int
) -> None:
    port = no_length_server if path == "no-length" else image_server.port
    url = f"http://127.0.0.1:{port}/x" if path == "no-length" else image_server.url(path)
    async with make(trusted=(("127.0.0.1", port),)) as normalizer:
        error = await refused(normalizer, url)
    assert error.code == "image_too_large"
    assert "200000" in error.message


async def test_f7_drip_feed_hits_the_total_deadline_and_closes(image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    async with make({"fetch_timeout": 0.4}, trusted=trusted) as normalizer:
        # A byte every 50 ms would take 500 s to finish: only a deadline on the whole fetch ends it.
        error = await refused(normalizer, image_server.url("/drip"))
        assert error.code == "image_fetch_timeout"
        await asyncio.wait_for(image_server.disconnected.wait(), 5)


async def test_f8_compressed_responses_are_refused_and_identity_is_asked(image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    async with make(trusted=trusted) as normalizer:
        error = await refused(normalizer, image_server.url("/gzip"))
    assert error.code == "image_fetch_failed"
    _, headers = image_server.requests[0]
    assert headers["Accept-Encoding"] == "identity"


async def test_fetches_carry_no_cookies_or_credentials(image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    async with make(trusted=trusted) as normalizer:
        await normalizer.normalize_chat(chat(image_server.url("/cookie")), "openai")
        await normalizer.normalize_chat(chat(image_server.url("/img/png")), "openai")
    for _, headers in image_server.requests:
        names = {name.lower() for name in headers}
        assert not names & {"cookie", "authorization", "proxy-authorization", "x-api-key"}


async def test_http_errors_are_generic_and_never_echo_the_query(image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    async with make(trusted=trusted) as normalizer:
        error = await refused(normalizer, image_server.url("/status/404?sig=CANARY-SIG"))
        assert error.code == "image_fetch_failed"
        assert "404" in error.message
        for message in (error.message, (await refused(normalizer, "http://10.0.0.1/?sig=CANARY-SIG")).message):
            assert "CANARY" not in message and "10.0.0.1" not in message


# ---------------------------------------------------------------- F9 bombs, F10 corrupt, F11 sniffing


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("bomb", "image_too_large"),
        ("tiff", "unsupported_image_format"),
        ("random", "invalid_image"),
        ("truncated-jpeg", "invalid_image"),
        ("truncated-png", "invalid_image"),
    ],
)
async def test_f9_f10_bad_images_over_http(name: str, code: str, image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    async with make(trusted=trusted) as normalizer:
        error = await refused(normalizer, image_server.url(f"/img/{name}"))
    assert error.code == code
    for leak in ("BytesIO", "0x", "PIL", "Traceback", "127.0.0.1", "/img/"):
        assert leak not in error.message


@pytest.mark.parametrize(("name", "mime"), [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
async def test_f11_fetched_images_become_data_urls_with_sniffed_mime(
    name: str, mime: str, image_server: ImageServer
) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    body = chat(image_server.url(f"/img/{name}"))
    async with make(trusted=trusted) as normalizer:
        await normalizer.normalize_chat(body, "transformers")
    got_mime, data = data_url_bytes(body["messages"][0]["content"][1]["image_url"]["url"])
    assert got_mime == mime
    assert data == IMAGES[name]
    with Image.open(io.BytesIO(data)) as a, Image.open(io.BytesIO(IMAGES[name])) as b:
        assert a.tobytes() == b.tobytes()


async def test_private_networks_allowed_by_config(image_server: ImageServer) -> None:
    body = chat(image_server.url("/img/png"))
    async with make({"allow_private_networks": True}) as normalizer:
        await normalizer.normalize_chat(body, "openai")
        # Cloud metadata stays refused even so.
        assert (await refused(normalizer, "http://169.254.169.254/")).code == "image_url_forbidden"
    assert body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


async def test_cache_and_dedup_avoid_refetching(image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    url = image_server.url("/img/jpeg")
    async with make(trusted=trusted) as normalizer:
        first = chat(url, url)  # twice in one request: fetched once
        await normalizer.normalize_chat(first, "openai")
        again = chat(url)  # the next turn resends it: served from the cache
        await normalizer.normalize_chat(again, "openai")
    assert image_server.hits("/img/jpeg") == 1
    urls = {p["image_url"]["url"] for p in first["messages"][0]["content"][1:] + again["messages"][0]["content"][1:]}
    assert len(urls) == 1


async def test_many_images_fetch_concurrently(image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    urls = [image_server.url(f"/img/png?n={i}") for i in range(8)]
    body = chat(*urls)
    async with make({"max_concurrent_fetches": 4}, trusted=trusted) as normalizer:
        await normalizer.normalize_chat(body, "openai")
    assert image_server.hits("/img/png") == 8
    assert all(p["image_url"]["url"].startswith("data:image/png") for p in body["messages"][0]["content"][1:])


async def test_f7_slow_image_servers_do_not_starve_other_fetches(
    image_server: ImageServer, other_image_server: ImageServer
) -> None:
    """F7: 20 requests whose images drip (500 s each), then one whose image is on another server and fast.

    The drips' fetch_timeout is 60 s, so a fast fetch queued behind them would wait a minute; it is given 10 s.
    """
    limit = 4
    trusted = (("127.0.0.1", image_server.port), ("127.0.0.1", other_image_server.port))
    async with make({"fetch_timeout": 60, "max_concurrent_fetches": limit}, trusted=trusted) as normalizer:
        # Distinct URLs: one fetch each, none served by the cache or merged with another.
        drips = [
            asyncio.create_task(normalizer.normalize_chat(chat(image_server.url(f"/drip?n={i}")), "openai"))
            for i in range(20)
        ]
        try:
            await asyncio.wait_for(image_server.streaming.wait(), 5)
            await asyncio.sleep(0.3)  # every drip the fetcher lets through is connected by now
            body = chat(other_image_server.url("/img/png"))
            await asyncio.wait_for(normalizer.normalize_chat(body, "openai"), 10)
            # Served while the drips still hold their connections, not after they gave up.
            assert image_server.drips_open > 0 and image_server.disconnects == []
            assert not any(task.done() for task in drips)
        finally:
            for task in drips:
                task.cancel()
            await asyncio.gather(*drips, return_exceptions=True)
    _, data = data_url_bytes(body["messages"][0]["content"][1]["image_url"]["url"])
    assert data == PNG
    # The drips were bounded all along: never more connections to them than the fetcher's limit.
    assert 1 <= image_server.drips_peak <= limit


# ---------------------------------------------------------------- D5 cancellation


async def test_d5_cancelling_the_request_closes_the_image_connection(image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    async with make({"fetch_timeout": 30}, trusted=trusted) as normalizer:
        task = asyncio.create_task(normalizer.normalize_chat(chat(image_server.url("/drip")), "openai"))
        await asyncio.wait_for(image_server.streaming.wait(), 5)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(image_server.disconnected.wait(), 5)
    assert image_server.disconnects == ["/drip"]


async def test_a_failing_image_cancels_the_other_fetches(image_server: ImageServer) -> None:
    trusted = (("127.0.0.1", image_server.port),)
    async with make({"fetch_timeout": 30}, trusted=trusted) as normalizer:
        body = chat(image_server.url("/drip"), image_server.url("/img/random"))
        with pytest.raises(BadRequest) as info:
            await normalizer.normalize_chat(body, "openai")
        assert info.value.code == "invalid_image"
        await asyncio.wait_for(image_server.disconnected.wait(), 5)


async def test_d5_a_client_leaving_through_the_gateway_closes_the_image_fetch(
    image_server: ImageServer, tmp_path: Any
) -> None:
    """D5 end to end: the gateway fetches an image that drips; the client gives up; the image server sees
    its connection closed (not held until the 60 s fetch deadline)."""
    import httpx

    from tests.helpers import run_gateway, standin_command

    config = {
        "media": {"allow_private_networks": True, "fetch_timeout": 60},
        "models": {
            "vl": {
                "engine": "lmdeploy",
                "model": "org/vl",
                "command": standin_command("lmdeploy"),
                "health": {"interval": 0.5, "startup_interval": 0.1},
            }
        },
    }
    with run_gateway(config, tmp_path) as gw:  # blocks the loop while it starts: the image server is idle then
        body = {
            "model": "vl",
            "max_tokens": 2,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": image_server.url("/drip")}},
                    ],
                }
            ],
        }
        async with httpx.AsyncClient(timeout=30) as client:
            request = asyncio.create_task(client.post(gw.url + "/v1/chat/completions", json=body))
            await asyncio.wait_for(image_server.streaming.wait(), 10)
            request.cancel()  # the client hangs up while the gateway is still reading the image
            with contextlib.suppress(asyncio.CancelledError):
                await request
        await asyncio.wait_for(image_server.disconnected.wait(), 10)
    assert image_server.disconnects == ["/drip"]
