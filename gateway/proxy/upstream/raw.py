"""Token streams relayed in protocol callbacks: an engine's SSE bytes reach the client's socket without an await.

A gateway's hot path is the token stream: tens of thousands of small events a second, each read from one
socket and written to another. Through aiohttp's stream reader and the ASGI ``send``, every event costs a
future, a task wake-up, a buffer and a chain of coroutine calls (~28 µs of CPU on the 2-core bench VM). Here
the engine connection is a plain asyncio ``Protocol`` whose response httptools parses; each body chunk is cut
into whole SSE events by ``SseSink`` and written straight to the client's transport, framed exactly as
uvicorn frames a chunked body. uvicorn still owns the response: its status line and headers, and its end,
go through ``send``. The relay's coroutine only waits for the end, keeping the idle and total clocks.

The relay uses this for streams when the request came through the gateway's httptools protocol (which puts
uvicorn's response cycle in the scope, ``CYCLE_KEY``) and the engine speaks plain HTTP; otherwise it streams
through aiohttp, as it does every non-stream request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

CYCLE_KEY = "gateway.cycle"  # scope key: uvicorn's RequestResponseCycle of this request (transport, flow)
KEEP_IDLE = 2.0  # seconds an idle engine connection is kept: under uvicorn's 5 s keep-alive, so the engine
#                  never closes one just as it is reused (which would lose a request that may have arrived)
_MAX_IDLE_PER_ENGINE = 1024
_MAX_HEADER_BYTES = 64 * 1024


class EngineClosed(ConnectionError):
    """The engine's connection ended before its answer did."""


class EngineConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an engine; one exchange at a time."""

    def __init__(self, on_lost: Callable[[EngineConnection], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._on_lost = on_lost  # the pool forgets an idle connection the engine closed (or that died with it)
        self.idle_since = 0.0
        self.exchanges = 0  # requests sent on it: more than one means it was kept alive and reused
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.received = False  # any byte of this exchange's answer
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self.keep_alive = False
        self.complete = False
        self.sink: Callable[[bytes], None] | None = None
        self.buffered: list[bytes] = []  # body before a sink is set (or without one: a whole answer)
        self.buffered_size = 0
        self.limit = 0
        loop = asyncio.get_running_loop()
        self.headers_done: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()  # the answer is complete (or broke)
        for future in (self.headers_done, self.done):
            future.add_done_callback(_retrieve)

    # -- asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but the same API

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._broken(EngineClosed("the engine's answer is not valid HTTP"))
        except AnswerTooLarge as exc:
            self._broken(exc)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and exc is None and self._ends_at_close():
            self.on_message_complete()  # an HTTP/1.0-style answer: its body ends where the connection does
        if not self.complete:
            self._broken(EngineClosed("the engine closed the connection"))
        if self._on_lost is not None:
            self._on_lost(self)

    def _ends_at_close(self) -> bool:
        return (
            self.headers_done.done()
            and b"content-length" not in self.headers
            and b"chunked" not in self.headers.get(b"transfer-encoding", b"").lower()
        )

    # -- httptools callbacks -------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > _MAX_HEADER_BYTES:
            raise AnswerTooLarge("the engine's headers are too large")
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink(body)
            return
        self.buffered.append(body)
        self.buffered_size += len(body)
        if self.limit and self.buffered_size > self.limit:
            raise AnswerTooLarge("the engine's answer is too large")

    def on_message_complete(self) -> None:
        self.complete = True
        if not self.done.done():
            self.done.set_result(None)

    # -- the exchange --------------------------------------------------------------------------------

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self.exchanges += 1
        self.transport.write(request)

    def stream_to(self, sink: Callable[[bytes], None]) -> None:
        """From now on body chunks go to ``sink`` as they arrive; what came with the headers goes first."""
        self.sink = sink
        buffered, self.buffered = self.buffered, []
        for chunk in buffered:
            sink(chunk)

    async def read_body(self, limit: int) -> bytes:
        self.limit = limit
        if self.buffered_size > limit:
            raise AnswerTooLarge("the engine's answer is too large")
        await self.done
        return b"".join(self.buffered)

    def finish(self, *, error: BaseException | None = None) -> None:
        """End the exchange early (the sink saw an error event, the client left): the answer is not read on."""
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)
        self.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection: an engine stops generating for a client that is gone."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    @property
    def lost_when_reused(self) -> bool:
        """Closed with no byte of answer on a connection kept from before: the engine's idle timer closed it
        as the request went out, so the request never reached it and may go again on a new connection."""
        return (
            self.exchanges > 1
            and not self.received
            and self.headers_done.done()
            and not self.headers_done.cancelled()
            and self.headers_done.exception() is not None
        )

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def _broken(self, exc: BaseException) -> None:
        for future in (self.headers_done, self.done):
            if not future.done():
                future.set_exception(exc)
        self.abort()


class AnswerTooLarge(EngineClosed):
    """The engine's headers or whole answer went past the cap: not an engine talking; the connection is dropped."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # read by whoever awaits it; retrieved here too, for the exchanges nobody awaited


class EngineConnections:
    """Idle keep-alive connections to engines, by (host, port), for the streams."""

    def __init__(self, keep_idle: float = KEEP_IDLE) -> None:
        self.keep_idle = keep_idle
        self._idle: dict[tuple[str, int], list[EngineConnection]] = {}

    async def get(self, host: str, port: int) -> EngineConnection:
        """An idle connection still fresh, else a new one (raises OSError when the engine refuses it)."""
        loop = asyncio.get_running_loop()
        idle = self._idle.get((host, port))
        now = loop.time()
        while idle:
            conn = idle.pop()
            if conn.reusable and now - conn.idle_since < self.keep_idle:
                return conn
            conn.abort()
        return await self.connect(host, port)

    async def connect(self, host: str, port: int) -> EngineConnection:
        """A new connection (raises OSError when the engine refuses it)."""
        key = (host, port)
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: EngineConnection(lambda c: self._forget(key, c)), host, port)
        return protocol

    def _forget(self, key: tuple[str, int], conn: EngineConnection) -> None:
        """An engine that restarts comes back on another port: its old connections must not pile up here."""
        idle = self._idle.get(key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[key]

    def put(self, host: str, port: int, conn: EngineConnection) -> None:
        if not conn.reusable:
            conn.abort()
            return
        idle = self._idle.setdefault((host, port), [])
        if len(idle) >= _MAX_IDLE_PER_ENGINE:
            conn.abort()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()


def split_url(url: str) -> tuple[str, int, str]:
    """``http://host[:port]/path?query`` → (host, port, "/path?query"); an IPv6 host without its brackets."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not a plain-HTTP URL: {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, path


def request_bytes(method: str, host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ClientWriter:
    """Writes body bytes to the client as uvicorn's ``send`` would, minus the await: chunk framing when the
    response is chunked, and a pause of the engine's connection while the client's socket is full."""

    def __init__(self, cycle: Any, conn: EngineConnection) -> None:
        self.cycle = cycle
        self.transport: asyncio.Transport = cycle.transport
        self.flow = cycle.flow
        self.chunked = bool(cycle.chunked_encoding)
        self.conn = conn
        self._resume: asyncio.Task[None] | None = None

    @property
    def gone(self) -> bool:
        return bool(self.cycle.disconnected)

    def write(self, data: bytes) -> None:
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if self.flow.write_paused and self._resume is None:
            # The client reads slower than the engine writes: stop reading the engine (its socket fills,
            # and it slows down too) until the client's buffer drains.
            self.conn.pause_reading()
            self._resume = asyncio.get_running_loop().create_task(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        try:
            await self.flow.drain()
        finally:
            self._resume = None
        self.conn.resume_reading()

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
