"""The supervision loop against real processes and sockets (docs/RELIABILITY.md §6 A and B)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from engines_helpers import (  # noqa: F401 (the *_fixture names are fixtures)
    Events,
    fake_engine_fixture,
    fake_spec,
    name_fixture,
    pid_gone,
    run,
    supervised,
    tagged_pids,
    wait_until,
)

from engines.process.ports import pick_free_port
from engines.replica.state import EngineState
from engines.spec import HealthPolicy, ModelSpec, RestartPolicy

S = EngineState
pytestmark = pytest.mark.timeout(30)


class Impostor:
    """A stranger's HTTP server that answers 200 to everything and counts what it gets."""

    def __init__(self, port: int = 0) -> None:
        hits = self.hits = [0]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits[0] += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Impostor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def impostor() -> Iterator[Impostor]:
    with Impostor() as server:
        yield server


def test_ready_only_after_the_engine_answers(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        events = Events()
        spec = fake_spec(name, fake_engine, {"FAKE_STARTUP_DELAY": "0.8"})
        began = time.monotonic()
        async with supervised(spec, events=events) as sup:
            await wait_until(lambda: sup.snapshot().engine_pid is not None)
            snap = sup.snapshot()
            assert snap.state is S.STARTING and snap.base_url is None
            assert await sup.wait_ready(10)
            assert time.monotonic() - began >= 0.8
            snap = sup.snapshot()
            assert (snap.launches, snap.restarts, snap.last_error) == (1, 0, None)
            assert snap.base_url == f"http://127.0.0.1:{snap.port}" and snap.ready_since is not None
            assert snap.argv[-2:] == ["--port", str(snap.port)]
        # connection refused while loading was never a failure: no BACKOFF in between
        assert events.states() == ["starting", "ready", "stopping", "stopped"]
        assert all(e.model == name and e.replica == 0 for e in events.items)

    run(main())


def test_engine_sigkilled_is_restarted_with_a_new_pid(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        events = Events()
        # Probes 60 s apart: the exit must be noticed from the process, not from a failed probe.
        slow_probes = HealthPolicy(
            interval=60, timeout=0.5, startup_interval=0.05, unhealthy_threshold=3, healthy_threshold=1
        )
        async with supervised(fake_spec(name, fake_engine, health=slow_probes), events=events) as sup:
            assert await sup.wait_ready(10)
            first = sup.snapshot()
            assert first.engine_pid is not None
            os.kill(first.engine_pid, signal.SIGKILL)
            await wait_until(lambda: sup.state is not S.READY, limit=10)
            assert await sup.wait_ready(10)
            second = sup.snapshot()
            assert second.restarts == 1 and second.launches == 2
            assert second.last_exit_code == 128 + signal.SIGKILL
            assert second.engine_pid not in (None, first.engine_pid)
            assert pid_gone(first.engine_pid)
            assert second.last_error is None
        assert events.states()[:5] == ["starting", "ready", "backoff", "starting", "ready"]
        assert "exited with code 137 while ready" in events.items[2].reason

    run(main())


def test_crash_loop_backs_off_longer_each_time_then_fails(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        events = Events()
        spec = fake_spec(name, fake_engine, {"FAKE_EXIT_CODE": "3"})  # FAST_RESTART: 0.05 → 0.4, 3 restarts
        async with supervised(spec, events=events) as sup:
            assert not await sup.wait_ready(10)  # returns at FAILED, not at the timeout
            snap = sup.snapshot()
            assert snap.state is S.FAILED and snap.launches == 4 and snap.restarts == 3
            assert snap.last_exit_code == 3 and "exited with code 3 during startup" in (snap.last_error or "")
            starts = [e.at for e in events.items if e.new is S.STARTING]
            backoffs = [e.at for e in events.items if e.new is S.BACKOFF]
            gaps = [start - crash for crash, start in zip(backoffs, starts[1:], strict=False)]
            assert len(gaps) == 3
            assert gaps[0] >= 0.04 and gaps[1] >= 0.09 and gaps[2] >= 0.19
            assert gaps[0] < gaps[1] < gaps[2]
            assert "fake engine giving up" in sup.log.tail()
            # FAILED is terminal: nothing happens until someone says start, which gives a fresh budget
            await asyncio.sleep(0.3)
            assert sup.snapshot().launches == 4
            await sup.start()
            await wait_until(lambda: sup.snapshot().launches >= 5)
            assert not await sup.wait_ready(10)
            assert sup.snapshot().launches == 8
        assert events.states()[-2:] == ["stopping", "stopped"]

    run(main())


def test_stop_during_starting_kills_the_child(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        # A 60 s grace: waiting for it (or for the 30 s load) would time the test out.
        spec = fake_spec(name, fake_engine, {"FAKE_STARTUP_DELAY": "30", "FAKE_FORK": "1"}, stop_grace=60)
        async with supervised(spec) as sup:
            # The engine's pid is learnt at the first probe: under load that can come after its processes exist.
            await wait_until(lambda: len(tagged_pids(name)) == 3 and sup.snapshot().engine_pid is not None)
            engine = sup.snapshot().engine_pid
            assert sup.state is S.STARTING and engine is not None
            await sup.stop()
            assert sup.snapshot().last_exit_code == 128 + signal.SIGTERM
            assert sup.state is S.STOPPED and not sup.ready.is_set()
            assert pid_gone(engine) and tagged_pids(name) == []
            snap = sup.snapshot()
            assert snap.pid is None and snap.engine_pid is None and snap.port is None

    run(main())


def test_stop_while_ready_ends_an_engine_that_ignores_sigterm_after_the_grace(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        spec = fake_spec(name, fake_engine, {"FAKE_IGNORE_SIGTERM": "1"}, stop_grace=0.5)
        async with supervised(spec) as sup:
            assert await sup.wait_ready(10)
            began = time.monotonic()
            await sup.stop()
            assert time.monotonic() - began >= 0.5  # the grace was given
            assert sup.snapshot().last_exit_code == 128 + signal.SIGKILL
            assert tagged_pids(name) == []

    run(main())


def test_flapping_health_within_thresholds_restarts_nothing(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        events = Events()
        health = HealthPolicy(
            interval=0.05, timeout=0.5, startup_interval=0.05, unhealthy_threshold=3, healthy_threshold=2
        )
        spec = fake_spec(name, fake_engine, {"FAKE_HEALTH": "flap:2"}, health=health)
        async with supervised(spec, events=events) as sup:
            assert await sup.wait_ready(10)
            await asyncio.sleep(1.0)  # ~20 probes, every other one 503
            snap = sup.snapshot()
            assert snap.state is S.READY and snap.restarts == 0 and snap.launches == 1
            assert snap.health_failures <= 1
        assert events.states() == ["starting", "ready", "stopping", "stopped"]

    run(main())


def test_a_live_but_unhealthy_engine_is_restarted(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        events = Events()
        spec = fake_spec(name, fake_engine, {"FAKE_HEALTH": "fail-after:2"})
        async with supervised(spec, events=events) as sup:
            assert await sup.wait_ready(10)
            first = sup.snapshot().engine_pid
            await wait_until(lambda: sup.snapshot().restarts >= 1, limit=5)
            crash = next(e for e in events.items if e.new is S.BACKOFF)
            assert "health check failed 3 times in a row (HTTP 503)" in crash.reason
            await wait_until(lambda: sup.snapshot().engine_pid not in (None, first), limit=5)
            assert first is not None and pid_gone(first)

    run(main())


def test_never_ready_engine_hits_the_startup_deadline(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        spec = fake_spec(
            name,
            fake_engine,
            {"FAKE_HEALTH": "fail"},
            startup_timeout=0.6,
            restart=RestartPolicy(initial_delay=0.05, jitter=0, max_restarts=0),
        )
        async with supervised(spec) as sup:
            assert not await sup.wait_ready(10)
            snap = sup.snapshot()
            assert snap.state is S.FAILED and "not ready after 0.6s (last probe: HTTP 503)" in (snap.last_error or "")
            await wait_until(lambda: tagged_pids(name) == [], limit=3)

    run(main())


def test_a_port_held_by_an_impostor_is_never_ready(fake_engine: Path, name: str, impostor: Impostor) -> None:
    async def main() -> None:
        spec = fake_spec(name, fake_engine, port=impostor.port)
        async with supervised(spec) as sup:
            assert not await sup.wait_ready(10)
            snap = sup.snapshot()
            assert snap.state is S.FAILED and snap.launches == 0  # the check comes before any process
            assert f"port 127.0.0.1:{impostor.port} is already in use" in (snap.last_error or "")
        assert impostor.hits[0] == 0

    run(main())


def test_an_answer_from_a_process_outside_the_launch_is_not_readiness(
    fake_engine: Path, name: str, impostor: Impostor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the free-port check cannot close: the impostor binds after the check. The engine then fails
    to bind and exits, but until it does, probes reach the impostor; they must not make it READY."""
    from engines.process import ports

    monkeypatch.setattr(ports, "pick_free_port", lambda host="127.0.0.1": impostor.port)

    async def main() -> None:
        spec = fake_spec(
            name,
            fake_engine,
            {"FAKE_STARTUP_DELAY": "0.5"},
            restart=RestartPolicy(initial_delay=0.05, jitter=0, max_restarts=0),
        )
        async with supervised(spec) as sup:
            assert not await sup.wait_ready(10)
            assert impostor.hits[0] > 0
            snap = sup.snapshot()
            assert snap.state is S.FAILED and "during startup" in (snap.last_error or "")

    run(main())


def test_restart_command_relaunches_and_resets_nothing_it_should_keep(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        async with supervised(fake_spec(name, fake_engine)) as sup:
            assert await sup.wait_ready(10)
            first = sup.snapshot().engine_pid
            await sup.restart()
            assert sup.state is S.STARTING
            assert await sup.wait_ready(10)
            snap = sup.snapshot()
            assert snap.launches == 2 and snap.restarts == 0 and snap.engine_pid != first
            await sup.start()  # already running: accepted, changes nothing
            assert sup.snapshot().launches == 2

    run(main())


def test_remote_engine_is_probed_never_launched(name: str) -> None:
    port = pick_free_port()
    spec = ModelSpec(
        name=name,
        engine="openai",
        url=f"http://127.0.0.1:{port}/v1",
        health=HealthPolicy(interval=0.05, timeout=0.5, startup_interval=0.05, unhealthy_threshold=2),
    )

    async def main() -> None:
        events = Events()
        async with supervised(spec, events=events) as sup:
            await asyncio.sleep(0.3)
            assert sup.state is S.STARTING and "not answering" in (sup.snapshot().last_error or "")
            with Impostor(port) as remote:
                assert await sup.wait_ready(5)
                assert remote.hits[0] >= 1
                assert sup.snapshot().base_url == f"http://127.0.0.1:{port}"
            await wait_until(lambda: sup.state is S.STARTING, limit=5)
            snap = sup.snapshot()
            assert snap.pid is None and snap.launches == 0 and snap.restarts == 0
        assert "failed" not in events.states() and "backoff" not in events.states()

    run(main())


def test_shutdown_by_cancelling_the_task_still_ends_the_engine(fake_engine: Path, name: str) -> None:
    async def main() -> None:
        import aiohttp

        from engines.adapters import adapter_for
        from engines.replica.supervisor import Supervisor

        spec = fake_spec(name, fake_engine)
        async with aiohttp.ClientSession() as session:
            sup = Supervisor(spec, adapter_for("vllm"), session=session)
            task = asyncio.create_task(sup.run())
            await sup.start()
            assert await sup.wait_ready(10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert sup.state is S.STOPPED and tagged_pids(name) == []
            with pytest.raises(RuntimeError):
                await sup.start()

    run(main())


def test_port_is_free_again_after_stop(fake_engine: Path, name: str) -> None:
    port = pick_free_port()

    async def main() -> None:
        async with supervised(fake_spec(name, fake_engine, port=port)) as sup:
            assert await sup.wait_ready(10)
            assert sup.snapshot().port == port
            await sup.restart()  # the same fixed port again: the old tree must be gone first
            assert await sup.wait_ready(10)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))

    run(main())
