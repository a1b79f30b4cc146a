"""One request to an engine and its answer, whatever carries it: the interface the relay is written against.

An exchange sends one request (``start``: connect, send, wait for the status and headers), then hands the
body to a ``Sink`` chunk by chunk (``receive``) until ``done``. Two implementations: ``RawExchange``
(gateway/proxy/upstream/raw.py, plain-HTTP engines, chunks delivered in protocol callbacks) and
``SessionExchange`` (gateway/proxy/upstream/session.py, aiohttp, for https:// remotes or when raw
connections are off; chunks delivered by a reading task). The relay keeps the clocks, the failover and the
client's side; an exchange only moves bytes and says how it ended.

What ends an exchange, as the relay sees it:

* ``ConnectFailed`` from ``start``: the engine refused (or never accepted) the connection; nothing was sent,
  so the request may go to another replica.
* ``EngineClosed`` from ``start`` or ``done``: the engine's connection ended (or broke HTTP) before its answer
  did. ``AnswerTooLarge`` (a kind of it) from ``read_all``: the answer went past the cap.
* ``done`` set: the whole answer arrived; or the exception a sink passed to ``finish``.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

# Takes each body chunk as it arrives. Returns None when it is done with the chunk, or an awaitable the exchange
# waits for before it reads on (an ASGI ``send``). A sink never raises: it ends the exchange with ``finish``.
# An exchange that delivers in protocol callbacks (``in_callbacks``) cannot wait: its sinks must return None.
Sink = Callable[[bytes], Awaitable[None] | None]


class ConnectFailed(Exception):
    """The engine refused (or never answered) the connection: nothing was sent."""


class EngineClosed(ConnectionError):
    """The engine's connection ended before its answer did."""


class AnswerTooLarge(EngineClosed):
    """The engine's headers or whole answer went past the cap: not an engine talking; the connection is dropped."""


class Exchange(ABC):
    """One request and its answer. ``start``, then ``receive`` or ``read_all``, then ``close`` (always)."""

    # True when body chunks reach the sink in protocol callbacks (no task between the socket and the sink).
    in_callbacks: bool = False
    status: int = 0

    @abstractmethod
    async def start(self, url: str, headers: dict[str, str], body: bytes) -> None:
        """POST ``body`` to ``url``; returns once the status and headers are in. Raises ConnectFailed, EngineClosed."""

    @abstractmethod
    def header(self, name: str) -> str | None:
        """A response header by its lower-case name."""

    @abstractmethod
    def receive(self, sink: Sink) -> asyncio.Future[None]:
        """From now on every body chunk goes to ``sink``; the future completes when the answer has (or broke)."""

    @abstractmethod
    def finish(self, error: BaseException | None = None) -> None:
        """End the exchange early (a sink saw an error event, or enough): ``done`` gets ``error``, the
        connection is dropped, nothing more is read."""

    @abstractmethod
    def pause_reading(self) -> None:
        """Stop reading from the engine (its socket fills, so it slows down) until ``resume_reading``."""

    @abstractmethod
    def resume_reading(self) -> None: ...

    @abstractmethod
    def close(self, *, reuse: bool) -> None:
        """Over (idempotent). ``reuse``: the answer was read whole and relayed, the connection may serve another
        request; otherwise it is dropped, which is what makes an engine stop generating for a client that left."""

    @property
    def event_stream(self) -> bool:
        return (self.header("content-type") or "").lower().startswith("text/event-stream")

    async def read_all(self, limit: int) -> bytes:
        """The whole body, up to ``limit`` bytes (AnswerTooLarge past it): the one cap on an engine's answer."""
        length = self.header("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.finish()
            raise AnswerTooLarge("the engine's answer is too large")
        parts: list[bytes] = []
        size = 0

        def sink(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            if size > limit:
                self.finish(AnswerTooLarge("the engine's answer is too large"))
                return
            parts.append(chunk)

        try:
            await self.receive(sink)
        except BaseException:
            self.finish()
            raise
        return b"".join(parts)


def retrieve(future: asyncio.Future[Any]) -> None:
    """A done callback: the exception of a future nobody awaited is retrieved (no "never retrieved" log)."""
    if not future.cancelled():
        future.exception()
