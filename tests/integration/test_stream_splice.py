"""Streams relayed in callbacks (gateway/proxy/upstream/raw.py) against the aiohttp path, and under a slow reader."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.helpers import run_gateway, standin_command

pytestmark = pytest.mark.timeout(60)


def config(splice: bool, faults: str = "") -> dict[str, Any]:
    return {
        "server": {"raw_connections": splice},
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/m",
                "command": standin_command("vllm"),
                "env": {"STANDIN_FAULTS": faults} if faults else {},
                "health": {"interval": 0.5, "startup_interval": 0.1},
            }
        },
    }


BODY = {
    "model": "chat",
    "messages": [{"role": "user", "content": "one two three four five"}],
    "max_tokens": 40,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def streamed(url: str) -> bytes:
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=BODY, headers={"x-request-id": "fixed-id"}, timeout=20
    ) as response:
        assert response.status_code == 200
        return b"".join(response.iter_raw())


def test_spliced_and_aiohttp_streams_are_the_same_bytes(tmp_path: Path) -> None:
    bodies = []
    for splice in (True, False):
        with run_gateway(config(splice), tmp_path) as gw:
            bodies.append([streamed(gw.url) for _ in range(3)])  # the later ones on a kept-alive connection
    spliced, relayed = ([re.sub(rb'"created":\d+', b'"created":0', b) for b in group] for group in bodies)
    assert spliced == relayed
    events = [e for e in spliced[0].split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and len(events) == 40 + 3  # role, 40 tokens, usage, [DONE]... as vLLM
    assert all(orjson.loads(e[6:])["model"] == "chat" for e in events[:-1])


def test_a_slow_reader_gets_every_event_whole(tmp_path: Path) -> None:
    """The engine writes as fast as it can; the client reads 1 KB every 2 ms through a small socket buffer:
    the gateway must hold the engine back rather than lose, reorder or cut anything."""
    body = {**BODY, "max_tokens": 3000, "messages": [{"role": "user", "content": "word " * 50}]}
    with run_gateway(config(True), tmp_path) as gw:
        payload = orjson.dumps(body)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(20)
            sock.connect(("127.0.0.1", gw.port))
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload)
            )
            raw = b""
            while chunk := sock.recv(1024):
                raw += chunk
                time.sleep(0.002)
    head, _, chunked_body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    data = b""
    while True:  # undo the chunked framing, checking it on the way
        size_line, _, rest = chunked_body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        data, chunked_body = data + rest[:size], rest[size + 2 :]
        assert rest[size : size + 2] == b"\r\n"
    events = [e for e in data.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    tokens = [orjson.loads(e[6:]) for e in events[:-1]]
    content = [t["choices"][0]["delta"].get("content") for t in tokens if t["choices"]]
    assert sum(1 for c in content if c) == 3000


class _ClosesKeptConnections:
    """An OpenAI-style server whose idle timer fires just as a kept-alive connection is reused: the second
    request on any connection is dropped unanswered (never processed); a new connection is served."""

    def __init__(self) -> None:
        self.processed = 0
        self.dropped = 0
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served_here = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = (
                    int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if b"content-length: " in head.lower()
                    else 0
                )
                await reader.readexactly(length)
                if head.startswith(b"POST") and served_here:
                    self.dropped += 1
                    break  # closed without a byte of answer
                if head.startswith(b"POST"):
                    self.processed += 1
                    served_here += 1
                body = orjson.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": "m",
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
                        ],
                    }
                    if head.startswith(b"POST")
                    else {"object": "list", "data": [{"id": "m", "object": "model"}]}
                )
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                    % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            async with server:
                await asyncio.Event().wait()

        with contextlib.suppress(RuntimeError):  # the loop is stopped from outside at the end
            asyncio.run(main())

    def start(self) -> None:
        threading.Thread(target=self.run, daemon=True).start()
        self._ready.wait(5)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


def test_a_request_on_a_connection_the_engine_closed_as_it_was_reused_goes_again_on_a_new_one(
    tmp_path: Path,
) -> None:
    remote = _ClosesKeptConnections()
    remote.start()
    try:
        config = {
            "models": {
                "m": {
                    "engine": "openai",
                    "url": f"http://127.0.0.1:{remote.port}/v1",
                    "health": {"interval": 30, "startup_interval": 0.1},
                }
            }
        }
        with run_gateway(config, tmp_path) as gw:
            for _ in range(3):
                answer = httpx.post(
                    gw.url + "/v1/chat/completions",
                    timeout=10,
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                )
                assert answer.status_code == 200, answer.text
        assert remote.dropped >= 1  # the race happened, and no client saw it
        assert remote.processed == 3  # and each request was processed exactly once
    finally:
        remote.stop()
