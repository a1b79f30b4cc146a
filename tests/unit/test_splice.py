"""proxy.upstream.raw and proxy.sse against a real socket: a tiny asyncio HTTP server plays the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from gateway.http.errors import UpstreamError
from gateway.proxy.sse import DONE, EventCutter, Outcome, StreamEnded
from gateway.proxy.upstream.exchange import AnswerTooLarge, ConnectFailed, Exchange
from gateway.proxy.upstream.raw import EngineClosed, EngineConnections, RawExchange, request_bytes, split_url
from gateway.proxy.upstream.session import SessionExchange

pytestmark = pytest.mark.anyio

Answer = Callable[[bytes], list[bytes]]  # request bytes → the pieces written back, one write each


def chunked(*pieces: bytes) -> list[bytes]:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    return [head] + [b"%x\r\n%b\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


@dataclass
class Engine:
    answer: Answer
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    close_after: bool = False


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    state = Engine(answer=lambda _: chunked(b"data: 1\n\n", DONE))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                state.requests.append(head + await reader.readexactly(length))
                for piece in state.answer(state.requests[-1]):
                    writer.write(piece)
                    await writer.drain()
                if state.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


async def exchange(pool: EngineConnections, engine: Engine, body: bytes = b"{}") -> tuple[int, list[bytes]]:
    conn = await pool.get("127.0.0.1", engine.port)
    conn.send(
        request_bytes(
            "POST", "127.0.0.1", engine.port, "/v1/chat/completions", {"Content-Type": "application/json"}, body
        )
    )
    await conn.headers_done
    got: list[bytes] = []
    conn.stream_to(got.append)
    await conn.done
    pool.put("127.0.0.1", engine.port, conn)
    return conn.status, got


async def test_a_chunked_stream_arrives_decoded_and_the_connection_is_kept(engine: Engine) -> None:
    pool = EngineConnections()
    for _ in range(3):
        status, got = await exchange(pool, engine)
        assert status == 200 and b"".join(got) == b"data: 1\n\n" + DONE
    assert engine.connections == 1  # one keep-alive connection for three exchanges
    head = engine.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{engine.port}" in head and "Content-Length: 2" in head
    pool.close()


async def test_connections_idle_too_long_or_closed_by_the_engine_are_not_reused(engine: Engine) -> None:
    pool = EngineConnections(keep_idle=0)  # what the engine's own keep-alive would have closed meanwhile
    await exchange(pool, engine)
    await exchange(pool, engine)
    assert engine.connections == 2
    engine.close_after = True
    pool = EngineConnections()
    await exchange(pool, engine)
    await asyncio.sleep(0.05)
    await exchange(pool, engine)
    assert engine.connections == 4
    pool.close()


@pytest.mark.parametrize(
    "pieces",
    [
        [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nda"],  # cut inside a chunk
        [b"<html>not http</html>\r\n\r\n"],
    ],
)
async def test_an_answer_cut_short_or_not_http_is_an_engine_closed_error(engine: Engine, pieces: list[bytes]) -> None:
    engine.answer = lambda _: pieces
    engine.close_after = True
    with pytest.raises(EngineClosed):
        await exchange(EngineConnections(), engine)


async def test_a_whole_answer_is_read_with_a_cap(engine: Engine) -> None:
    engine.answer = lambda _: [b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\n", b"no!!!"]
    pool = EngineConnections()
    exchange = RawExchange(pool, connect_timeout=5)
    await exchange.start(f"http://127.0.0.1:{engine.port}/x", {}, b"")
    assert exchange.status == 400 and await exchange.read_all(100) == b"no!!!"
    exchange.close(reuse=True)
    engine.answer = lambda _: [b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n", b"x" * 500]
    exchange = RawExchange(pool, connect_timeout=5)
    with pytest.raises(EngineClosed):
        await exchange.start(f"http://127.0.0.1:{engine.port}/x", {}, b"")
        await exchange.read_all(100)
    exchange.close(reuse=False)
    pool.close()


async def test_a_refused_connection_raises_oserror() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(OSError):
            await EngineConnections().get("127.0.0.1", port)


# ---- the SSE cutter ----------------------------------------------------------------------------------------


def test_only_whole_events_pass_and_the_model_name_is_rewritten() -> None:
    outcome = Outcome()
    cutter = EventCutter(((b'"model":"org/m"', b'"model":"chat"'),), outcome, t0=0.0)
    assert cutter.feed(b'data: {"model":"org/m","x":1}\n', 1.0) == b""
    assert cutter.feed(b'\ndata: {"model":"or', 2.0) == b'data: {"model":"chat","x":1}\n\n'
    assert cutter.feed(b'g/m"}\n\n' + DONE, 3.0) == b'data: {"model":"chat"}\n\n' + DONE
    assert outcome.events == 2 and outcome.ttft == 2.0 and cutter.first_at == 2.0 and cutter.last_at == 3.0
    assert cutter.complete("done") and not cutter.complete("finish")


def test_usage_is_read_from_the_events_that_carry_it() -> None:
    outcome = Outcome()
    cutter = EventCutter((), outcome, t0=0.0)
    cutter.feed(b'data: {"usage":null}\n\ndata: {"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n', 1.0)
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 3)


@pytest.mark.parametrize(
    "error", [b'{"error":{"message":"boom","code":"x"}}', b'{"error":"boom"}', b'{"object":"error","message":"boom"}']
)
def test_an_error_event_ends_the_stream_in_the_gateway_shape(error: bytes) -> None:
    outcome = Outcome()
    cutter = EventCutter((), outcome, t0=0.0)
    with pytest.raises(StreamEnded) as ended:
        cutter.feed(b"data: {}\n\ndata: " + error + b"\n\ndata: {}\n\n", 1.0)
    assert ended.value.before == b"data: {}\n\n" and b'"message":"boom"' in ended.value.final
    assert b"[DONE]" not in ended.value.final and outcome.error_kind == "stream_error"


def test_a_stream_that_is_not_sse_is_refused() -> None:
    cutter = EventCutter((), Outcome(), t0=0.0)
    with pytest.raises(UpstreamError):
        cutter.feed(b"x" * (5 * 1024 * 1024), 1.0)


async def test_idle_connections_the_engine_closed_are_forgotten(engine: Engine) -> None:
    pool = EngineConnections()
    await exchange(pool, engine)
    assert len(pool._idle[("127.0.0.1", engine.port)]) == 1
    engine.close_after = True  # the next exchange is the last on that connection: the engine hangs up
    await exchange(pool, engine)
    await asyncio.sleep(0.05)
    assert ("127.0.0.1", engine.port) not in pool._idle  # nothing kept for an engine's old connections
    pool.close()


async def test_an_answer_without_length_ends_where_the_connection_does(engine: Engine) -> None:
    """An HTTP/1.0-style server (a remote one, say): no Content-Length, no chunks, the body runs to the close."""
    engine.answer = lambda _: [b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n", b'{"ok":', b"true}"]
    engine.close_after = True
    pool = EngineConnections()
    conn = await pool.get("127.0.0.1", engine.port)
    conn.send(request_bytes("POST", "127.0.0.1", engine.port, "/x", {}, b""))
    await conn.headers_done
    got: list[bytes] = []
    conn.stream_to(got.append)
    await conn.done
    assert b"".join(got) == b'{"ok":true}' and not conn.reusable
    pool.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8001/v1/chat/completions", ("127.0.0.1", 8001, "/v1/chat/completions")),
        ("http://remote.example/v1/completions", ("remote.example", 80, "/v1/completions")),
        ("http://[::1]:9000/v1/embeddings?x=1", ("::1", 9000, "/v1/embeddings?x=1")),
    ],
)
def test_engine_urls_split_into_where_to_connect_and_what_to_ask(url: str, expected: tuple[str, int, str]) -> None:
    assert split_url(url) == expected
    host, port, path = expected
    head = request_bytes("POST", host, port, path, {}, b"").decode()
    assert head.startswith(f"POST {path} HTTP/1.1\r\n")
    assert ("Host: [::1]:9000" if host == "::1" else f"Host: {host}:{port}") in head


def test_only_plain_http_is_split() -> None:
    with pytest.raises(ValueError):
        split_url("https://api.example/v1/chat/completions")


# ---- the two exchanges behind one interface ----------------------------------------------------------------


@pytest.fixture(params=["raw", "aiohttp"])
async def exchanges(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Exchange]]:
    """Makes exchanges of one kind: the raw connections or the aiohttp session (as gateway.proxy.upstream.client)."""
    pool = EngineConnections()
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield (
            (lambda: RawExchange(pool, connect_timeout=5))
            if request.param == "raw"
            else (lambda: SessionExchange(session))
        )
    pool.close()


async def test_both_exchanges_hand_a_stream_to_the_sink_chunk_by_chunk(
    engine: Engine, exchanges: Callable[[], Exchange]
) -> None:
    engine.answer = lambda _: chunked(b"data: 1\n\n", b"data: 2\n\n", DONE)
    exchange = exchanges()
    await exchange.start(f"http://127.0.0.1:{engine.port}/v1/chat/completions", {"X-A": "b"}, b"{}")
    assert exchange.status == 200 and exchange.event_stream and exchange.header("transfer-encoding") == "chunked"
    got: list[bytes] = []
    await exchange.receive(got.append)
    exchange.close(reuse=True)
    assert b"".join(got) == b"data: 1\n\ndata: 2\n\n" + DONE
    assert b"X-A: b" in engine.requests[0] or b"x-a: b" in engine.requests[0].lower()


@pytest.mark.parametrize("length", [True, False])
async def test_both_exchanges_read_a_whole_answer_up_to_one_cap(
    engine: Engine, exchanges: Callable[[], Exchange], length: bool
) -> None:
    """With a Content-Length past the cap the answer is refused before it is read; without one, as it arrives."""
    head = b"HTTP/1.1 200 OK\r\nconnection: close\r\n" + (b"content-length: 500\r\n\r\n" if length else b"\r\n")
    engine.answer = lambda _: [head, b"x" * 500]
    engine.close_after = True
    exchange = exchanges()
    await exchange.start(f"http://127.0.0.1:{engine.port}/x", {}, b"{}")
    with pytest.raises(AnswerTooLarge):
        await exchange.read_all(100)
    exchange.close(reuse=False)
    exchange = exchanges()
    await exchange.start(f"http://127.0.0.1:{engine.port}/x", {}, b"{}")
    assert await exchange.read_all(500) == b"x" * 500
    exchange.close(reuse=True)


async def test_both_exchanges_say_a_refused_connection_and_a_cut_answer_alike(
    engine: Engine, exchanges: Callable[[], Exchange]
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        exchange = exchanges()
        with pytest.raises(ConnectFailed):
            await exchange.start(f"http://127.0.0.1:{s.getsockname()[1]}/x", {}, b"{}")
        exchange.close(reuse=False)
    engine.answer = lambda _: [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    ]
    engine.close_after = True
    exchange = exchanges()
    await exchange.start(f"http://127.0.0.1:{engine.port}/x", {}, b"{}")
    with pytest.raises(EngineClosed):
        await exchange.receive(lambda _: None)
    exchange.close(reuse=False)


async def test_a_sink_ends_either_exchange_with_its_error(engine: Engine, exchanges: Callable[[], Exchange]) -> None:
    engine.answer = lambda _: chunked(b"data: 1\n\n", b"data: 2\n\n", DONE)
    exchange = exchanges()
    await exchange.start(f"http://127.0.0.1:{engine.port}/x", {}, b"{}")
    seen: list[bytes] = []

    def sink(chunk: bytes) -> None:
        seen.append(chunk)
        exchange.finish(UpstreamError("enough", code="x"))

    with pytest.raises(UpstreamError):
        await exchange.receive(sink)
    exchange.close(reuse=False)
    assert len(seen) == 1
