"""Races between the owner's hub and a worker's RemotePool, in one process: the real hub, the real remote
pool, the real wire code on a Unix socket, a real EnginePool behind the hub (one remote engine, answered
by a small HTTP server in the same loop). No worker processes: the orderings are made, not hoped for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from engines import EnginePool, ModelEntry
from engines.scheduling.lease import Abandoned
from engines.scheduling.scheduler import Refused
from engines.spec import HealthPolicy, ModelSpec
from gateway.config.loader import build_config
from gateway.workers.lease_client import Order, OwnerLink, RemoteLease, RemotePool, RemoteWaiting
from gateway.workers.lease_server import DEFAULT_LIVENESS, LeaseHub, Liveness
from gateway.workers.messages import Hello
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(60)


class Bench:
    """The owner's pool and hub, and how to plug a worker into it."""

    def __init__(self, pool: EnginePool, hub: LeaseHub, spec: ModelSpec) -> None:
        self.pool, self.hub, self.spec = pool, hub, spec
        self.hung: list[tuple[int, int]] = []
        self.transports: list[asyncio.Transport] = []

    @property
    def entry(self) -> ModelEntry:
        entry = self.pool.resolve("m")
        assert entry is not None
        return entry

    def held(self) -> tuple[int, int]:
        """(leases, queue places) the owner's scheduler counts for the model."""
        status = self.pool.status(self.entry)
        return status.active, status.queued

    async def worker(self, number: int = 1) -> tuple[RemotePool, OwnerLink, asyncio.Transport]:
        """A worker's side, connected as ``OwnerLink.connect`` does, with its transport at hand."""
        orders: list[Order] = []
        before = self.hub.workers
        link = OwnerLink(orders.append)
        transport, _ = await asyncio.get_running_loop().create_unix_connection(lambda: link.channel, self.hub.path)
        self.transports.append(transport)
        link.channel.send(Hello(number, os.getpid()))
        await until(lambda: self.hub.workers == before + 1)
        return RemotePool(link, [self.spec]), link, transport


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110 (a poll: the states read here have no event to wait on)
            await asyncio.sleep(0.01)


async def models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": []})


@contextlib.asynccontextmanager
async def bench(tmp_path: Path, liveness: Liveness = DEFAULT_LIVENESS) -> AsyncIterator[Bench]:
    port = free_port()
    remote = web.Application()
    remote.router.add_get("/v1/models", models)
    runner = web.AppRunner(remote)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    spec = ModelSpec(
        name="m",
        engine="openai",
        url=f"http://127.0.0.1:{port}/v1",
        max_concurrency=1,  # one lease at a time: the second request queues
        health=HealthPolicy(interval=0.2, startup_interval=0.05),
    )
    pool = EnginePool([spec], sweep=False)
    config = build_config({})
    hub: LeaseHub | None = None
    the_bench: Bench | None = None
    try:
        await pool.start()
        assert await pool.entries()[0].replicas[0].wait_ready(10)

        def on_hung(worker: int, pid: int) -> None:
            assert the_bench is not None
            the_bench.hung.append((worker, pid))

        hub = LeaseHub(pool, str(tmp_path / "control.sock"), lambda: config, liveness=liveness, on_hung=on_hung)
        await hub.start()
        the_bench = Bench(pool, hub, spec)
        yield the_bench
    finally:
        if the_bench is not None:
            for transport in the_bench.transports:
                transport.abort()
        if hub is not None:
            await hub.close()
        await pool.stop()
        await runner.cleanup()


def test_a_dropped_line_gives_back_every_lease_and_queue_place(tmp_path: Path) -> None:
    async def main() -> None:
        async with bench(tmp_path) as b:
            remote, _, transport = await b.worker()
            lease = await remote.admit(b.entry)
            assert isinstance(lease, RemoteLease)
            waiting, parked = await remote.admit(b.entry), await remote.admit(b.entry)
            assert isinstance(waiting, RemoteWaiting) and isinstance(parked, RemoteWaiting)
            waiter = asyncio.ensure_future(waiting.wait(30))  # waits in the hub; ``parked`` never asks to
            await until(lambda: b.held() == (1, 2))
            transport.abort()  # the worker dies
            with pytest.raises(Refused):
                await waiter
            await until(lambda: b.held() == (0, 0))
            assert b.hub.workers == 0
            # The slot is free for the next worker at once.
            again, _, _ = await b.worker()
            assert isinstance(await again.admit(b.entry), RemoteLease)
            assert b.held() == (1, 0)

    asyncio.run(main())


def test_a_cancel_that_crosses_its_grant_on_the_line_gives_the_grant_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with bench(tmp_path) as b:
            remote, _, transport = await b.worker()
            first = await remote.admit(b.entry)
            assert isinstance(first, RemoteLease)
            waiting = await remote.admit(b.entry)
            assert isinstance(waiting, RemoteWaiting)
            client_left: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter = asyncio.ensure_future(waiting.wait(30, abandon=client_left))
            await until(lambda: b.held() == (1, 1))
            # The worker stops reading: the grant the release causes stays on the line, unseen.
            transport.pause_reading()
            first.release()
            await until(lambda: b.held() == (1, 0))  # granted to the waiter in the owner
            client_left.set_result(None)  # ...while its client leaves: the cancel crosses the grant
            with pytest.raises(Abandoned):
                await waiter
            await until(lambda: b.held() == (0, 0))
            transport.resume_reading()  # the stale grant arrives: nobody asks for it any more
            await asyncio.sleep(0.05)
            assert b.held() == (0, 0)
            assert isinstance(await remote.admit(b.entry), RemoteLease)

    asyncio.run(main())


def test_a_release_after_the_line_dropped_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with bench(tmp_path) as b:
            remote, _, transport = await b.worker()
            lease = await remote.admit(b.entry)
            assert isinstance(lease, RemoteLease)
            transport.abort()
            await until(lambda: b.held() == (0, 0))  # given back when the line dropped
            other, _, _ = await b.worker()
            now = await other.admit(b.entry)
            assert isinstance(now, RemoteLease) and b.held() == (1, 0)
            lease.report(False)
            lease.release()  # the request ends after its line: the owner's count is not touched twice
            await asyncio.sleep(0.05)
            assert b.held() == (1, 0)
            with pytest.raises(Refused) as refused:
                await remote.admit(b.entry)  # and the dead line grants nothing more
            assert refused.value.reason == "shutdown"
            now.release()
            await until(lambda: b.held() == (0, 0))

    asyncio.run(main())


def test_a_worker_that_stops_answering_pings_is_reported_and_its_leases_given_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with bench(tmp_path, Liveness(interval=0.05, timeout=0.5)) as b:
            remote, link, transport = await b.worker(7)
            lease = await remote.admit(b.entry)
            assert isinstance(lease, RemoteLease)
            await asyncio.sleep(0.3)  # answering: pings come and go, nothing happens
            assert b.hung == [] and b.held() == (1, 0)
            transport.pause_reading()  # hung: it reads (and answers) nothing
            await until(lambda: b.hung == [(7, os.getpid())])
            await until(lambda: b.held() == (0, 0) and b.hub.workers == 0)
            transport.resume_reading()  # were it to wake up: its line is cut, it asks for nothing more
            await until(lambda: link.lost)

    asyncio.run(main())
