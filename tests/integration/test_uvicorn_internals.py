"""The uvicorn internals the gateway reaches into are where it expects them, and its fast path is taken.

gateway/http/protocol.py subclasses uvicorn's HttpToolsProtocol (private hooks included) and puts the
request's RequestResponseCycle in the scope; gateway/http/cycle.py writes a stream's events to that cycle's
transport. When uvicorn moves any of it, the gateway quietly falls back to the slower ASGI path (or breaks):
these tests fail first, naming what moved. pyproject.toml bounds uvicorn below its next minor for the same
reason; raise the bound once these pass on the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.config.server import ServerSettings
from gateway.http.cycle import CYCLE_ATTRS, CYCLE_KEY, FLOW_ATTRS, CycleWriter
from gateway.http.protocol import PROTOCOL_ATTRS, GuardedHttpToolsProtocol
from gateway.http.server import uvicorn_config
from gateway.proxy.upstream.raw import request_bytes
from tests.helpers import run_gateway

pytestmark = pytest.mark.timeout(60)


class _Reading:
    """What the CycleWriter pauses while the client's socket is full: nothing here."""

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _dechunk(body: bytes) -> bytes:
    data = b""
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return data
        assert rest[size : size + 2] == b"\r\n"
        data, body = data + rest[:size], rest[size + 2 :]


@pytest.mark.anyio
async def test_uvicorn_has_what_the_protocol_and_the_cycle_writer_use() -> None:
    """A real uvicorn serving the gateway's protocol: every internal attribute used is there, the cycle reaches
    the app, and a body written past ASGI (CycleWriter) arrives framed as uvicorn frames a chunked body."""
    protocols: list[GuardedHttpToolsProtocol] = []

    class Watched(GuardedHttpToolsProtocol):
        def on_headers_complete(self) -> None:
            protocols.append(self)
            super().on_headers_complete()

    cycles: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        cycles.append(scope.get(CYCLE_KEY))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        if scope.get(CYCLE_KEY) is not None:
            CycleWriter(scope[CYCLE_KEY], _Reading()).write(b"past ASGI, ")
        await send({"type": "http.response.body", "body": b"then through it", "more_body": False})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # the client's connection waits in the backlog until uvicorn serves
    config = uvicorn_config(app, ServerSettings())
    config.http = Watched
    server = uvicorn.Server(config)
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        reader, writer = await asyncio.open_connection(*sock.getsockname())
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
    finally:
        server.should_exit = True
        await serving
        sock.close()

    [protocol] = protocols
    moved = [f"HttpToolsProtocol.{a}" for a in PROTOCOL_ATTRS if not hasattr(protocol, a)]
    cycle = protocol.cycle
    moved += [f"RequestResponseCycle.{a}" for a in CYCLE_ATTRS if not hasattr(cycle, a)]
    moved += [f"FlowControl.{a}" for a in FLOW_ATTRS if not hasattr(getattr(cycle, "flow", None), a)]
    assert not moved, f"uvicorn {uvicorn.__version__} moved what the gateway uses: {', '.join(moved)}"
    assert cycles == [cycle], "the gateway's protocol did not put uvicorn's cycle in the scope (the fast path is off)"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert _dechunk(body) == b"past ASGI, then through it"


class _Engine:
    """An OpenAI-style engine on plain HTTP that records the request heads it gets (a thread of its own)."""

    EVENTS = [b'data: {"model":"m","choices":[{"delta":{"content":"%d"}}]}\n\n' % i for i in range(3)]

    def __init__(self) -> None:
        self.posts: list[bytes] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line[15:]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
                )
                body = await reader.readexactly(length)
                if head.startswith(b"POST"):
                    self.posts.append(head + body)
                    events = [*self.EVENTS, b"data: [DONE]\n\n"]
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                        + b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events)
                        + b"0\r\n\r\n"
                    )
                else:
                    models = orjson.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                        % (len(models), models)
                    )
                await writer.drain()
        writer.close()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            async with server:
                await asyncio.Event().wait()

        with contextlib.suppress(RuntimeError):  # the loop is stopped from outside at the end
            asyncio.run(main())

    @contextlib.contextmanager
    def running(self) -> Iterator[_Engine]:
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(5)
        try:
            yield self
        finally:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.mark.parametrize("raw_connections", [True, False])
def test_a_stream_through_a_real_gateway_takes_the_fast_path(tmp_path: Path, raw_connections: bool) -> None:
    """A stream goes over a raw engine connection only when uvicorn's cycle reached the relay (otherwise it
    goes through aiohttp): the engine getting exactly the bytes RawExchange writes proves the fast path was
    taken. With raw connections off the same check must fail, or it would prove nothing."""
    with _Engine().running() as engine:
        config = {
            "server": {"raw_connections": raw_connections},
            "models": {
                "m": {
                    "engine": "openai",
                    "url": f"http://127.0.0.1:{engine.port}/v1",
                    "health": {"interval": 30, "startup_interval": 0.1},
                }
            },
        }
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with run_gateway(config, tmp_path) as gw:
            with httpx.stream(
                "POST", gw.url + "/v1/chat/completions", json=body, headers={"x-request-id": "fixed"}, timeout=10
            ) as answer:
                assert answer.status_code == 200
                streamed = b"".join(answer.iter_raw())
    assert streamed == b"".join(_Engine.EVENTS) + b"data: [DONE]\n\n"
    [post] = engine.posts
    sent = post.split(b"\r\n\r\n", 1)[1]
    headers = {"Content-Type": "application/json", "X-Request-Id": "fixed", "Accept": "text/event-stream"}
    raw = request_bytes("POST", "127.0.0.1", engine.port, "/v1/chat/completions", headers, sent)
    if raw_connections:
        assert post == raw, f"the stream did not take the fast path (raw connection + uvicorn's cycle):\n{post!r}"
    else:
        assert post != raw
