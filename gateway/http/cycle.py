"""uvicorn's response cycle reached past ASGI: a stream's events written to the client's transport directly.

The relay's fast path (gateway/proxy/upstream/raw.py) writes each engine chunk's whole events to the client
from the engine connection's callbacks, with no ``await``: it needs the request's ``RequestResponseCycle``
(put in the scope under ``CYCLE_KEY`` by gateway/http/protocol.py), which is uvicorn's internals, not its API.
``CYCLE_ATTRS`` and ``FLOW_ATTRS`` name every attribute used; the protocol puts the cycle in the scope only when
they are all there, so a uvicorn that moved them gets the ASGI path (slower, still correct). pyproject.toml
bounds uvicorn below its next minor, and tests/integration/test_uvicorn_internals.py fails, naming what moved,
when they are not there.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

CYCLE_KEY = "gateway.cycle"  # scope key: uvicorn's RequestResponseCycle of this request
# What CycleWriter reads from the cycle (and protocol.py's header timer: ``response_complete``).
CYCLE_ATTRS = ("transport", "flow", "chunked_encoding", "disconnected", "response_complete", "scope")
FLOW_ATTRS = ("write_paused", "drain")  # what CycleWriter uses of the cycle's FlowControl


class Pausable(Protocol):
    """What is read from: paused while the client's socket is full."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def usable(cycle: object) -> bool:
    """Has this cycle every attribute the fast path uses?"""
    return all(hasattr(cycle, a) for a in CYCLE_ATTRS) and all(
        hasattr(getattr(cycle, "flow", None), a) for a in FLOW_ATTRS
    )


def client_gone(cycle: RequestResponseCycle) -> bool:
    """Has the client left, or is its connection closing? The transport says so at once: a write that failed
    (the client reset the connection in the middle of a burst of events) or an end of file closes it there and
    then, while ``cycle.disconnected`` is set only by uvicorn's ``connection_lost``, which asyncio runs a loop
    iteration later: after every other write of the burst went to the dead socket (one "socket.send() raised
    exception." each) and, for a burst that held the rest of the answer, after the engine had finished."""
    return cycle.disconnected or cycle.transport.is_closing()


class CycleWriter:
    """Writes body bytes to the client as uvicorn's ``send`` would, minus the await: chunk framing when the
    response is chunked, and a pause of the engine's side while the client's socket is full."""

    __slots__ = ("_resume", "chunked", "cycle", "flow", "source", "transport")

    def __init__(self, cycle: RequestResponseCycle, source: Pausable) -> None:
        self.cycle = cycle
        self.transport: asyncio.Transport = cycle.transport
        self.flow: FlowControl = cycle.flow
        self.chunked = bool(cycle.chunked_encoding)
        self.source = source
        self._resume: asyncio.Task[None] | None = None

    @property
    def gone(self) -> bool:
        return client_gone(self.cycle)

    def write(self, data: bytes) -> None:
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if self.flow.write_paused and self._resume is None:
            # The client reads slower than the engine writes: stop reading the engine (its socket fills,
            # and it slows down too) until the client's buffer drains.
            self.source.pause_reading()
            self._resume = asyncio.get_running_loop().create_task(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        try:
            await self.flow.drain()
        finally:
            self._resume = None
        self.source.resume_reading()

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
