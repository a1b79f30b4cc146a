"""Raw keep-alive engine connections: an engine's answer parsed in protocol callbacks, with no task in between.

A gateway's hot path is the token stream: tens of thousands of small events a second, each read from one
socket and written to another. Through aiohttp's stream reader and the ASGI ``send``, every event costs a
future, a task wake-up, a buffer and a chain of coroutine calls (~28 µs of CPU on the 2-core bench VM). Here
the engine connection is a plain asyncio ``Protocol`` whose response httptools parses; each body chunk goes to
the exchange's sink from ``data_received``, and a stream's sink (the relay's) cuts it into whole SSE events
and writes them straight to the client's transport (``gateway.http.cycle.CycleWriter``). uvicorn still owns
the response: its status line and headers, and its end, go through ``send``. The relay's coroutine only waits
for the end, keeping the idle and total clocks.

``RawExchange`` is the relay's ``Exchange`` over these connections: every request to an engine on plain HTTP,
streams when the request came through the gateway's httptools protocol (which puts uvicorn's response cycle
in the scope); otherwise streams go through aiohttp (gateway/proxy/upstream/session.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

from gateway.proxy.upstream.exchange import AnswerTooLarge, ConnectFailed, EngineClosed, Exchange, Sink, retrieve

KEEP_IDLE = 2.0  # seconds an idle engine connection is kept: under uvicorn's 5 s keep-alive, so the engine
#                  never closes one just as it is reused (which would lose a request that may have arrived)
_MAX_IDLE_PER_ENGINE = 1024
_MAX_HEADER_BYTES = 64 * 1024

__all__ = ["AnswerTooLarge", "EngineClosed", "EngineConnection", "EngineConnections", "RawExchange"]


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
        self.sink: Sink | None = None
        self.finished = False  # ended early by ``finish``: no chunk goes to the sink after
        self.buffered: list[bytes] = []  # body that came before a sink was set (with the headers, say)
        loop = asyncio.get_running_loop()
        self.headers_done: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()  # the answer is complete (or broke)
        for future in (self.headers_done, self.done):
            future.add_done_callback(retrieve)

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
            # Not once a sink ended the exchange (``finish``): the rest of this read is still parsed.
            if not self.finished:
                self.sink(body)  # returns None: see ``Sink`` (the relay pairs callbacks with a writer that never waits)
            return
        self.buffered.append(body)

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

    def stream_to(self, sink: Sink) -> None:
        """From now on body chunks go to ``sink`` as they arrive; what came with the headers goes first."""
        self.sink = sink
        buffered, self.buffered = self.buffered, []
        for chunk in buffered:
            if self.finished:
                break
            sink(chunk)

    def finish(self, *, error: BaseException | None = None) -> None:
        """End the exchange early (the sink saw an error event, the client left): the answer is not read on."""
        self.finished = True
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


class EngineConnections:
    """Idle keep-alive connections to engines, by (host, port)."""

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


class RawExchange(Exchange):
    """An ``Exchange`` over a raw keep-alive connection: body chunks reach the sink in protocol callbacks."""

    in_callbacks = True

    def __init__(self, connections: EngineConnections, connect_timeout: float) -> None:
        self._connections = connections
        self._connect_timeout = connect_timeout
        self._conn: EngineConnection | None = None
        self._where = ("", 0)
        # The exchange's own end, not the connection's: a sink may end it with an error in chunks that came
        # with the headers, when the connection's answer is already complete.
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done.add_done_callback(retrieve)

    async def start(self, url: str, headers: dict[str, str], body: bytes) -> None:
        host, port, path = split_url(url)
        self._where = (host, port)
        try:
            async with asyncio.timeout(self._connect_timeout):
                conn = self._conn = await self._connections.get(host, port)
        except (OSError, TimeoutError):
            raise ConnectFailed from None
        request = request_bytes("POST", host, port, path, headers, body)
        conn.send(request)
        try:
            await conn.headers_done
        except EngineClosed:
            if not conn.lost_when_reused:
                raise
            try:
                conn = self._conn = await self._connections.connect(host, port)
            except OSError:
                raise ConnectFailed from None
            conn.send(request)
            await conn.headers_done
        self.status = conn.status

    def header(self, name: str) -> str | None:
        assert self._conn is not None
        value = self._conn.headers.get(name.encode("latin-1"))
        return None if value is None else value.decode("latin-1")

    def receive(self, sink: Sink) -> asyncio.Future[None]:
        assert self._conn is not None
        self._conn.stream_to(sink)
        self._conn.done.add_done_callback(self._settle)
        return self._done

    def _settle(self, answer: asyncio.Future[None]) -> None:
        done = self._done
        if done.done():
            return
        if answer.cancelled():
            done.cancel()
        elif (exc := answer.exception()) is not None:
            done.set_exception(exc)
        else:
            done.set_result(None)

    def finish(self, error: BaseException | None = None) -> None:
        if not self._done.done():
            if error is None:
                self._done.set_result(None)
            else:
                self._done.set_exception(error)
        if self._conn is not None:
            self._conn.finish(error=error)

    def pause_reading(self) -> None:
        if self._conn is not None:
            self._conn.pause_reading()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume_reading()

    def close(self, *, reuse: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if reuse:
            self._connections.put(*self._where, conn)  # kept only when complete and kept alive
        else:
            conn.abort()


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
