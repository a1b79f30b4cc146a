"""A small HTTP/1.1 server on asyncio streams, with the byte-level control fault injection needs.

Keep-alive (closed after 5 s idle, uvicorn's default), Content-Length and chunked request bodies,
``Expect: 100-continue``, and chunked (HTTP/1.1) or close-delimited (HTTP/1.0) streaming responses. A
watcher reads the socket while a request is handled, so a client that goes away is noticed at once, the way
Starlette's ``http.disconnect`` lets the real engines abort generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

from _faults import emit

MAX_HEAD = 64 * 1024
KEEP_ALIVE_TIMEOUT = 5.0
Headers = Iterable[tuple[str, str]]


class ClientGone(Exception):
    """The client closed its connection while its request was being handled."""


class _BadRequest(Exception):
    pass


@dataclass
class Request:
    method: str
    target: str
    version: str
    raw_headers: list[tuple[str, str]]
    body: bytes = b""
    peer: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def path(self) -> str:
        return unquote(urlsplit(self.target).path)

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.raw_headers if k.lower() == name), None)

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.raw_headers:
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return out


class Response:
    """One response on a connection: ``send`` a whole body, or ``start``/``write``/``end`` a stream."""

    def __init__(self, conn: Connection, req: Request) -> None:
        self.conn = conn
        self.req = req
        self.status: int | None = None
        self.chunked = False
        self.ended = False
        # Set by the engine when a sleep aborts the requests in flight (vLLM mode=abort, LMDeploy's sleep): the
        # engine's abort event of the moment this request reached it.
        self.sleep_abort: asyncio.Event | None = None

    @property
    def started(self) -> bool:
        return self.status is not None

    @property
    def gone(self) -> asyncio.Event:
        return self.conn.disconnected

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        self.status = status
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Unknown"
        date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())  # email.utils costs 20 ms of start-up
        lines = [f"HTTP/1.1 {status} {phrase}", f"date: {date}", "server: uvicorn"]
        lines += [f"{k}: {v}" for k, v in headers]
        if not self.conn.keep_alive:
            lines.append("connection: close")
        self.conn.server.on_response(self.req, status)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(
        self, status: int, body: bytes, content_type: str | None = "application/json", headers: Headers = ()
    ) -> None:
        hdrs = [("content-length", str(len(body)))]
        if content_type:
            hdrs.append(("content-type", content_type))
        hdrs += headers
        head = self._head(status, hdrs)
        await self._out(head if self.req.method == "HEAD" else head + body)
        self.ended = True

    async def start(self, status: int, content_type: str, headers: Headers = ()) -> None:
        hdrs = [("content-type", content_type), *headers]
        if self.req.version == "HTTP/1.1":
            self.chunked = True
            hdrs.append(("transfer-encoding", "chunked"))
        else:
            self.conn.keep_alive = False  # HTTP/1.0: the body ends when the connection does
        await self._out(self._head(status, hdrs))

    async def write(self, data: bytes) -> None:
        """One piece of the body; with chunked framing it is one chunk."""
        if data:
            await self._out(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    async def write_raw(self, data: bytes) -> None:
        """Bytes with no framing at all: for cutting a response in the middle of a chunk."""
        await self._out(data)

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            if self.chunked:
                await self._out(b"0\r\n\r\n")

    def close(self) -> None:
        """Close the connection now (FIN after what is buffered); the response stays unfinished."""
        self.ended = True
        self.conn.keep_alive = False
        self.conn.writer.close()

    async def _out(self, data: bytes) -> None:
        writer = self.conn.writer
        if self.conn.disconnected.is_set() or writer.is_closing():
            raise ClientGone
        writer.write(data)
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            self.conn.disconnected.set()
            raise ClientGone from None


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: HttpServer) -> None:
        self.reader = reader
        self.writer = writer
        self.server = server
        self.buffer = bytearray()
        self.disconnected = asyncio.Event()
        self.keep_alive = True
        self.idle = True
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"

    async def _fill(self) -> bool:
        try:
            data = await self.reader.read(65536)
        except (ConnectionError, OSError):
            data = b""
        self.buffer += data
        return bool(data)

    async def _read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._fill():
                raise ClientGone
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def _read_line(self) -> bytes:
        while (i := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD or not await self._fill():
                raise _BadRequest
        line = bytes(self.buffer[:i])
        del self.buffer[: i + 2]
        return line

    async def _read_head(self) -> bytes | None:
        while (i := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise _BadRequest
            if not await self._fill():
                if self.buffer.strip():
                    raise _BadRequest
                return None
        head = bytes(self.buffer[:i])
        del self.buffer[: i + 4]
        return head

    async def _read_request(self) -> Request | None:
        head = await self._read_head()
        if head is None:
            return None
        self.idle = False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1]:
            raise _BadRequest
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or line[:1] in (" ", "\t"):
                raise _BadRequest
            headers.append((name, value.strip()))
        req = Request(parts[0], parts[1], parts[2], headers, peer=self.peer)
        conn_hdr = (req.header("connection") or "").lower()
        self.keep_alive = "close" not in conn_hdr if req.version == "HTTP/1.1" else "keep-alive" in conn_hdr
        te = [v.strip().lower() for k, v in headers if k.lower() == "transfer-encoding"]
        cls = {v.strip() for k, v in headers if k.lower() == "content-length"}
        if (te and cls) or len(cls) > 1 or (te and te != ["chunked"]):
            raise _BadRequest  # smuggling-shaped framing: refuse, as h11 does
        if (req.header("expect") or "").lower() == "100-continue" and (te or cls - {"0"}):
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if te:
            req.body = await self._read_chunked()
        elif cls:
            length = cls.pop()
            if not length.isdigit():
                raise _BadRequest
            req.body = await self._read_exact(int(length))
        return req

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_text = (await self._read_line()).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest from None
            if size == 0:
                while await self._read_line():
                    pass  # trailers
                return bytes(body)
            body += await self._read_exact(size)
            if await self._read_exact(2) != b"\r\n":
                raise _BadRequest

    async def _watch(self) -> None:
        """Notice the client leaving while we handle its request; any early bytes are kept for the next one."""
        while await self._fill():
            pass
        self.disconnected.set()

    async def serve(self) -> None:
        first = True
        try:
            while not self.server.closing or first:
                self.idle = True
                try:
                    # uvicorn's timeout_keep_alive: only an idle connection between requests is timed
                    timeout = None if first or self.buffer else self.server.keep_alive_timeout
                    req = await asyncio.wait_for(self._read_request(), timeout)
                except (TimeoutError, ClientGone):
                    return
                except _BadRequest:
                    self.writer.write(
                        b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
                        b"content-length: 28\r\nconnection: close\r\n\r\nInvalid HTTP request received."
                    )
                    return
                first = False
                if req is None:
                    return
                if self.server.closing:
                    self.keep_alive = False
                if not await self._handle(req):
                    return
        finally:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.server.connections.discard(self)

    async def _handle(self, req: Request) -> bool:
        """Run the handler; True when the connection can take another request."""
        resp = Response(self, req)
        watcher = asyncio.create_task(self._watch())
        self.server.in_flight += 1
        self.server.drained.clear()
        try:
            await self.server.handler(req, resp)
            if not resp.started:
                await resp.send(500, b"Internal Server Error", "text/plain; charset=utf-8")
            await resp.end()
        except ClientGone:
            return False
        except Exception:  # a handler bug becomes a 500, as in uvicorn, and the server lives on
            emit(2, "ERROR:    Exception in ASGI application\n" + traceback.format_exc())
            if not resp.started:
                self.keep_alive = False
                with contextlib.suppress(ClientGone):
                    await resp.send(500, b"Internal Server Error", "text/plain; charset=utf-8")
            return False
        finally:
            self.server.in_flight -= 1
            if not self.server.in_flight:
                self.server.drained.set()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        return self.keep_alive and not self.disconnected.is_set() and not self.writer.is_closing()


Handler = Callable[[Request, Response], Awaitable[None]]


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        on_response: Callable[[Request, int], None],
        keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
    ) -> None:
        self.handler = handler
        self.keep_alive_timeout = keep_alive_timeout
        self.on_response = on_response
        self.connections: set[Connection] = set()
        self.closing = False
        self.in_flight = 0
        self.drained = asyncio.Event()  # set whenever no request is being handled
        self.drained.set()
        self._server: asyncio.AbstractServer | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(reader, writer, self)
        self.connections.add(conn)
        await conn.serve()

    async def start(self, sock: object | None = None, uds: str | None = None) -> None:
        if uds:
            self._server = await asyncio.start_unix_server(self._client, path=uds)
        else:
            self._server = await asyncio.start_server(self._client, sock=sock, backlog=2048)  # listen() here

    def stop_listening(self) -> None:
        """Stop accepting and close idle keep-alive connections (uvicorn's first shutdown step)."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.idle and not conn.buffer:
                conn.writer.close()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.writer.close()
