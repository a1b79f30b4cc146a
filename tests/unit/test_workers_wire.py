"""The pieces of gateway/workers that need no process: the control line's framing, the metrics merge."""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from engines import EnginePool
from gateway.config.loader import build_config
from gateway.observability.metrics import Metrics, engine_state_family, merge_expositions
from gateway.workers.lease_client import OwnerLink
from gateway.workers.lease_server import LeaseHub
from gateway.workers.messages import (
    Acquire,
    ConfigUpdate,
    Drain,
    Drained,
    Hello,
    Message,
    Release,
    from_wire,
    to_wire,
)
from gateway.workers.wire import Channel, frame


async def _pair() -> tuple[Channel[Message], list[Message], socket.socket]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got: list[Message] = []
    _, channel = await loop.create_unix_connection(lambda: Channel[Message](got.append), sock=ours)
    theirs.setblocking(False)
    return channel, got, theirs


def test_messages_cross_whole_however_the_bytes_are_cut() -> None:
    async def main() -> None:
        channel, got, theirs = await _pair()
        loop = asyncio.get_running_loop()
        config = build_config({"models": {f"m{i}": {"engine": "vllm", "model": "x" * 1000} for i in range(50)}})
        sent: list[Message] = [Acquire(1, "m"), ConfigUpdate(config), Release(1, True)]
        data = b"".join(frame(m) for m in sent)
        for i in range(0, len(data), 7_777):  # frames split across reads, several frames in one read
            await loop.sock_sendall(theirs, data[i : i + 7_777])
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert got == sent
        channel.close()
        theirs.close()

    asyncio.run(main())


def test_sends_in_one_loop_turn_leave_in_one_write() -> None:
    async def main() -> None:
        channel, _, theirs = await _pair()
        loop = asyncio.get_running_loop()
        for i in range(50):
            channel.send(Release(i, None))
        await asyncio.sleep(0.05)
        first = await loop.sock_recv(theirs, 1 << 20)
        assert first == b"".join(frame(Release(i, None)) for i in range(50))
        channel.close()
        theirs.close()

    asyncio.run(main())


def test_a_frame_that_is_not_a_message_is_skipped_and_the_line_goes_on() -> None:
    async def main() -> None:
        channel, got, theirs = await _pair()
        loop = asyncio.get_running_loop()
        junk = pickle.dumps(("rel", 1, True))  # the old tuple shape: its kind is not a code
        await loop.sock_sendall(theirs, struct.pack("!I", len(junk)) + junk + frame(Release(2, None)))
        await asyncio.sleep(0.05)
        assert got == [Release(2, None)] and not channel.closed.done()
        channel.close()
        theirs.close()

    asyncio.run(main())


def test_every_message_crosses_the_wire_as_itself() -> None:
    config = build_config({})
    messages: list[Message] = [Hello(1, 2), Acquire(3, "m"), Release(4, False), Drained(), ConfigUpdate(config)]
    for message in messages:
        assert from_wire(pickle.loads(pickle.dumps(to_wire(message)))) == message


def test_a_corrupt_length_closes_the_line() -> None:
    async def main() -> None:
        channel, got, theirs = await _pair()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(theirs, b"\xff\xff\xff\xff" + b"x" * 10)
        await asyncio.wait_for(channel.closed, 5)
        assert got == []
        theirs.close()

    asyncio.run(main())


def test_merged_expositions_add_up_series_and_parse_back() -> None:
    owner, w1, w2 = Metrics(), Metrics(), Metrics()
    owner.add_collector(lambda: [engine_state_family([("m", 0, "ready")])])
    owner.requests.labels("", "ops", "200").inc()
    for worker, n in ((w1, 3), (w2, 4)):
        worker.requests.labels("m", "chat", "200").inc(n)
        worker.duration.labels("m", "chat").observe(0.02 * n)
        worker.in_flight.labels("m").inc()
    w2.requests.labels('we"ird\\', "chat", "404").inc()
    merged = merge_expositions([owner.render().decode(), w1.render().decode(), w2.render().decode()]).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(merged)
        for s in family.samples
    }
    assert samples[("gateway_requests_total", (("endpoint", "chat"), ("model", "m"), ("status", "200")))] == 7
    assert samples[("gateway_requests_total", (("endpoint", "ops"), ("model", ""), ("status", "200")))] == 1
    assert samples[("gateway_requests_total", (("endpoint", "chat"), ("model", 'we"ird\\'), ("status", "404")))] == 1
    assert samples[("gateway_request_duration_seconds_count", (("endpoint", "chat"), ("model", "m")))] == 2
    assert (
        samples[("gateway_request_duration_seconds_bucket", (("endpoint", "chat"), ("le", "0.1"), ("model", "m")))] == 2
    )
    assert samples[("gateway_requests_in_flight", (("model", "m"),))] == 2
    assert samples[("gateway_engine_state", (("model", "m"), ("replica", "0"), ("state", "ready")))] == 1
    assert "# TYPE gateway_requests_total counter" in merged


def test_a_worker_that_connects_during_the_drain_is_told_to_drain(tmp_path: Path) -> None:
    """A worker started before the drain may connect after it began: it must drain too, or the owner waits
    for it until its grace runs out."""

    async def main() -> None:
        config = build_config({})
        hub = LeaseHub(EnginePool([]), str(tmp_path / "control.sock"), lambda: config)
        await hub.start()
        early_got: list[Any] = []
        late_got: list[Any] = []
        early = OwnerLink(early_got.append)
        await asyncio.get_running_loop().create_unix_connection(lambda: early.channel, hub.path)
        early.channel.send(Hello(1, 101))
        await asyncio.sleep(0.05)
        hub.drain(7.0)
        late = await OwnerLink.connect(hub.path, 2, late_got.append)
        await asyncio.sleep(0.05)
        assert early_got == [ConfigUpdate(config), Drain(7.0)]
        assert late_got == [ConfigUpdate(config), Drain(7.0)]
        assert not await hub.wait_drained(0.1)
        early.channel.send(Drained())
        late.channel.send(Drained())
        assert await hub.wait_drained(5)
        await hub.close()

    asyncio.run(main())
