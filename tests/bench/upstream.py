"""A raw asyncio (uvloop) HTTP/1.1 upstream that costs next to nothing: the benchmark's fake engine.

Paths (every base also answers ``GET <base>/models``):

- ``POST /v1/chat/completions``: the canned completion (used when nginx is not installed).
- ``POST /stream/v1/chat/completions``: the canned 64-event stream in one burst (likewise).
- ``POST /paced/v1/chat/completions``: the same events one at a time, chunked, as an engine sends
  tokens: the first at once (prefill), then one per decode step. Like an engine's batch, one clock
  steps every ``--gap-ms`` and writes the next event of every running stream, so hundreds of
  concurrent streams cost one timer.
- ``POST /ttfb/v1/chat/completions``: the first event at once, the rest ``--hold-ms`` later, so a
  client can time the first event of a stream apart from its end.

No request parsing beyond the request line and Content-Length; keep-alive; the body is ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import cast

import uvloop
from canned import COMPLETION, EVENTS, MODELS, STREAM


def _whole(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


_JSON = _whole(b"200 OK", b"application/json", COMPLETION)
_BURST = _whole(b"200 OK", b"text/event-stream", STREAM)
_MODELS = _whole(b"200 OK", b"application/json", MODELS)
_NOT_FOUND = _whole(b"404 Not Found", b"application/json", b'{"error":{"message":"no such path"}}')
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
# Each event as one HTTP chunk; the last frame also ends the chunked body.
_FRAMES = [f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in EVENTS]
_FRAMES[-1] += b"0\r\n\r\n"
_TTFB_REST = b"".join(_FRAMES[1:])


class _Batch:
    """The decode loop: every ``gap`` seconds, the next event of every running stream."""

    def __init__(self, gap: float) -> None:
        self.gap = gap
        self.running: list[_Conn] = []
        self.next_at = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def join(self, conn: _Conn) -> None:
        self.running.append(conn)
        if self.timer is None:
            loop = asyncio.get_running_loop()
            self.next_at = loop.time() + self.gap
            self.timer = loop.call_at(self.next_at, self.step)

    def step(self) -> None:
        still = []
        for conn in self.running:
            t = conn.transport
            if t is None:
                continue
            t.write(_FRAMES[conn.sent])
            conn.sent += 1
            if conn.sent < len(_FRAMES):
                still.append(conn)
        self.running = still
        if not still:
            self.timer = None
            return
        loop = asyncio.get_running_loop()
        self.next_at = max(self.next_at + self.gap, loop.time())  # late steps are not made up in a burst
        self.timer = loop.call_at(self.next_at, self.step)


class _Conn(asyncio.Protocol):
    batch = _Batch(0.005)
    hold = 0.02

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            parts = head[: head.find(b"\r\n")].split(b" ")
            self.buf = self.buf[total:]
            self._answer(parts[0], parts[1] if len(parts) > 1 else b"/")

    def _answer(self, method: bytes, path: bytes) -> None:
        t = self.transport
        assert t is not None
        if path.endswith(b"/models"):
            t.write(_MODELS)
        elif method != b"post" or not path.endswith(b"/chat/completions"):
            t.write(_NOT_FOUND)
        elif path.startswith(b"/paced/"):
            t.write(_STREAM_HEAD + _FRAMES[0])
            self.sent = 1
            self.batch.join(self)
        elif path.startswith(b"/ttfb/"):
            t.write(_STREAM_HEAD + _FRAMES[0])
            self.timer = asyncio.get_running_loop().call_later(self.hold, self._rest)
        elif path.startswith(b"/stream/"):
            t.write(_BURST)
        else:
            t.write(_JSON)

    def _rest(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.write(_TTFB_REST)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Conn, host, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gap-ms", type=float, default=5.0, help="time between two events (decode steps)")
    parser.add_argument("--hold-ms", type=float, default=20.0, help="time between the first event and the rest (ttfb)")
    args = parser.parse_args()
    _Conn.batch = _Batch(args.gap_ms / 1000)
    _Conn.hold = args.hold_ms / 1000
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
