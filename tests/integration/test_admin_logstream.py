"""The log follow stream as an ASGI app on its own: real LogRings, a scripted client. No follower may outlive it."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import orjson

from engines import LogRing
from gateway.routes.admin import LogStream


class Client:
    """Plays the server side of ASGI: records what the app sends; ``leave()`` is the client disconnecting."""

    def __init__(self, *, fail_after: int | None = None) -> None:
        self.sent: list[MutableMapping[str, Any]] = []
        self.got = asyncio.Event()
        self._left = asyncio.Event()
        self._requested = False
        self._fail_after = fail_after

    async def receive(self) -> MutableMapping[str, Any]:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if self._fail_after is not None and len(self.sent) >= self._fail_after:
            raise OSError("client gone")  # what uvicorn's ClientDisconnected is
        self.sent.append(message)
        self.got.set()

    def leave(self) -> None:
        self._left.set()

    def events(self) -> list[MutableMapping[str, Any]]:
        bodies = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return [orjson.loads(chunk[len(b"data: ") :]) for chunk in bodies.split(b"\n\n") if chunk.startswith(b"data: ")]

    async def wait_for(self, count: int) -> None:
        while len(self.events()) < count:
            self.got.clear()
            await asyncio.wait_for(self.got.wait(), 5)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_backlog_then_live_lines_from_every_replica_and_unsubscribed_on_disconnect() -> None:
    async def scenario() -> None:
        a, b = LogRing(), LogRing()
        for n in range(5):
            a.append(f"old {n}")
        stream = LogStream([(0, a), (1, b)], 2, lambda: False)
        client = Client()
        task = asyncio.create_task(stream({"type": "http"}, client.receive, client.send))
        await client.wait_for(2)
        a.append("new on 0")
        b.append("new on 1 with a \r carriage return")
        await client.wait_for(4)
        assert len(a._followers) == 1 and len(b._followers) == 1
        client.leave()
        await task
        assert not a._followers and not b._followers  # the rings stop feeding a stream nobody reads
        start = client.sent[0]
        assert start["status"] == 200 and (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
        assert client.events() == [
            {"replica": 0, "line": "old 3"},
            {"replica": 0, "line": "old 4"},
            {"replica": 0, "line": "new on 0"},
            {"replica": 1, "line": "new on 1 with a \r carriage return"},
        ]

    run(scenario())


def test_a_failed_write_ends_the_stream_and_unsubscribes() -> None:
    async def scenario() -> None:
        ring = LogRing()
        client = Client(fail_after=2)
        task = asyncio.create_task(LogStream([(0, ring)], 0, lambda: False)({}, client.receive, client.send))
        await asyncio.sleep(0)
        for n in range(3):
            ring.append(f"line {n}")
            await asyncio.sleep(0.01)
        await task
        assert not ring._followers

    run(scenario())


def test_draining_ends_the_stream_cleanly() -> None:
    async def scenario() -> None:
        ring = LogRing()
        client = Client()
        await LogStream([(0, ring)], 0, lambda: True)({}, client.receive, client.send)
        assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        assert not ring._followers

    run(scenario())


def test_cancelled_by_the_server_still_unsubscribes() -> None:
    async def scenario() -> None:
        ring = LogRing()
        client = Client()
        task = asyncio.create_task(LogStream([(0, ring)], 0, lambda: False)({}, client.receive, client.send))
        await asyncio.sleep(0.05)
        assert len(ring._followers) == 1
        task.cancel()  # uvicorn's graceful-shutdown timeout
        await asyncio.gather(task, return_exceptions=True)
        assert not ring._followers

    run(scenario())
