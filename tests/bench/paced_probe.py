"""Per-event timing of token-paced streams: what wrk cannot see (it times whole answers only).

    paced_probe.py --url URL --body-file F [--header K:V] --streams 16 --duration 7 --gap-ms 5

Keeps ``--streams`` kept-alive connections busy with one streamed request after another for
``--duration`` seconds (run next to wrk, which brings the rest of the load) and timestamps every SSE
event as it arrives: ``time.perf_counter()`` when the read that completed it returned. Prints one JSON
line: the spread of the gaps between two consecutive events of a stream (the upstream sends one every
``--gap-ms``, so ``gap - gap_ms`` is the delay added on the way, by a proxy and by this client alike;
compare with ``direct``), time to the first event, stream durations, how many events arrived merged with
the one before (same read), and whether every stream was whole (``data: [DONE]``, the right count).

A raw asyncio protocol on uvloop, counting ``\\n\\n`` (an SSE event's end) in the chunked body: a few
microseconds per event, so at 16 streams x 200 events/s the client's own delay stays small; the same
client measures ``direct``, which gives the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import time
from typing import cast
from urllib.parse import urlsplit

import uvloop

_END = b"0\r\n\r\n"


class _Stream(asyncio.Protocol):
    def __init__(self, request: bytes, events: int, done: asyncio.Future[None], deadline: float) -> None:
        self.request = request
        self.events = events  # expected per stream, [DONE] included
        self.deadline = deadline
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.tail = b""
        self.times: list[float] = []
        self.t0 = 0.0
        self.merged = 0
        self.streams: list[tuple[float, list[float]]] = []  # (request sent, event arrival times)
        self.bad = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        self.tail = b""
        self.times = []
        assert self.transport is not None
        self.t0 = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.tail + data
        # Count event ends in the new bytes only (with 1 byte of overlap for a "\n\n" cut in two).
        new = buf.count(b"\n\n", max(0, len(self.tail) - 1))
        if new:
            if new > 1:
                self.merged += new - 1
            self.times.extend([now] * new)
        self.tail = buf[-64:] if not buf.endswith(_END) else b""
        if buf.endswith(_END):
            self.bad += len(self.times) != self.events or not buf.endswith(b"data: [DONE]\n\n\r\n" + _END)
            self.streams.append((self.t0, self.times))
            if time.perf_counter() < self.deadline:
                self._send()
            elif not self.done.done():
                self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def probe(
    url: str, body: bytes, headers: dict[str, str], streams: int, duration: float, gap: float, events: int
) -> dict[str, float]:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST {u.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    deadline = time.perf_counter() + duration
    conns = []
    for _ in range(streams):
        done: asyncio.Future[None] = loop.create_future()
        _, proto = await loop.create_connection(lambda d=done: _Stream(request, events, d, deadline), host, port)
        conns.append(cast(_Stream, proto))
    await asyncio.wait([c.done for c in conns], timeout=duration + 30)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    gaps: list[float] = []
    firsts: list[float] = []
    totals: list[float] = []
    for c in conns:
        for t0, times in c.streams:
            if not times:
                continue
            firsts.append(times[0] - t0)
            totals.append(times[-1] - t0)
            gaps += [b - a for a, b in itertools.pairwise(times)]
    n_events = sum(len(t) for c in conns for _, t in c.streams)
    return {
        "streams": len(totals),
        "events": n_events,
        "bad": sum(c.bad for c in conns),
        "merged": sum(c.merged for c in conns) / n_events if n_events else float("nan"),
        "gap_p50": _pct(gaps, 0.5),
        "gap_p99": _pct(gaps, 0.99),
        "gap_p999": _pct(gaps, 0.999),
        "gap_max": max(gaps, default=float("nan")),
        "added_p50": _pct(gaps, 0.5) - gap,
        "added_p99": _pct(gaps, 0.99) - gap,
        "first_p50": _pct(firsts, 0.5),
        "first_p99": _pct(firsts, 0.99),
        "total_p50": _pct(totals, 0.5),
        "total_p99": _pct(totals, 0.99),
        "total_max": max(totals, default=float("nan")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--body-file", required=True)
    p.add_argument("--header", action="append", default=[], help="NAME:VALUE")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--duration", type=float, default=7.0)
    p.add_argument("--gap-ms", type=float, default=5.0)
    p.add_argument("--events", type=int, default=65, help="SSE events per stream, [DONE] included")
    a = p.parse_args()
    with open(a.body_file, "rb") as f:
        body = f.read()
    headers = dict(h.split(":", 1) for h in a.header)
    result = uvloop.run(
        probe(a.url, body, {k: v.strip() for k, v in headers.items()}, a.streams, a.duration, a.gap_ms / 1000, a.events)
    )
    print("PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
