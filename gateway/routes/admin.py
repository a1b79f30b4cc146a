"""Admin API (permission ``admin``, checked by the middleware): list engines, command them, put a whole model
to sleep or wake it, read their logs, reload the config.

Commands go through the pool (a whole model's start follows the GPU rules: it may first drain the model
that holds its GPUs) to the replicas' supervisors, and return once carried out (a stop: the tree is
gone; a start or restart: the new launch is under way, readiness follows). This module never writes an
engine's state (docs/DESIGN.md rule 2).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Response
from starlette.types import Receive, Scope, Send

from engines import LogRing, ModelEntry, ReplicaSnapshot, Supervisor
from engines.process.log_ring import LogFollower
from engines.spec import ModelSpec
from gateway.config.loader import ConfigError
from gateway.deps import OwnerState, OwnerStateDep
from gateway.http.errors import BadRequest, EngineUnavailable, NotFound
from gateway.proxy.admission import resolve

router = APIRouter(prefix="/admin")
log = logging.getLogger("gateway.admin")

Action = Literal["start", "stop", "restart"]
ReplicaQuery = Annotated[int | None, Query(ge=0, description="one replica; all of them when absent")]
KEEPALIVE_S = 15.0  # an SSE comment this often, so idle proxies keep a quiet follow open
DRAIN_POLL_S = 0.5  # a follow ends this soon after SIGTERM starts the drain, so it never holds up a stop


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


def engine_row(entry: ModelEntry, snap: ReplicaSnapshot) -> dict[str, Any]:
    spec = entry.spec
    return {
        "model": spec.name,
        "replica": snap.replica,
        "engine": spec.engine,
        "load": spec.load,
        "state": snap.state.value,
        "since": snap.state_since,
        "ready_since": snap.ready_since,
        # Two processes, named: the launch's reaper (its process group; what a stop signals) and the engine's main
        # process (vLLM's API server; null until found after a (re)start). "pid" is the reaper's, kept for old readers.
        "pid": snap.pid,
        "reaper_pid": snap.pid,
        "engine_pid": snap.engine_pid,
        "port": snap.port,
        "restarts": snap.restarts,
        "launches": snap.launches,
        "last_exit_code": snap.last_exit_code,
        "last_error": snap.last_error,
        "health_failures": snap.health_failures,
        "in_flight": snap.inflight,
        "gpus": list(_replica_gpus(spec, snap.replica)),
        "argv": snap.argv,  # argv: secrets already redacted
    }


def _replica_gpus(spec: ModelSpec, replica: int) -> tuple[int, ...]:
    return spec.replica_gpus[replica] if replica < len(spec.replica_gpus) else spec.gpus


@router.get("/engines")
async def list_engines(state: OwnerStateDep) -> Response:
    rows = [engine_row(e, r.snapshot()) for e in state.pool.entries() for r in e.replicas]
    return _json({"object": "list", "data": rows})


def _replicas(entry: ModelEntry, replica: int | None) -> list[Supervisor]:
    if replica is None:
        return list(entry.replicas)
    chosen = [sup for sup in entry.replicas if sup.replica == replica]
    if not chosen:
        raise NotFound(f"The model '{entry.name}' has no replica {replica}.", code="replica_not_found", param="replica")
    return chosen


async def _command(state: OwnerState, model: str, replica: int | None, action: Action) -> Response:
    entry = resolve(state.pool, model)
    sups = _replicas(entry, replica)
    if state.draining:
        raise EngineUnavailable("The gateway is shutting down.", code="shutting_down")
    try:
        await state.pool.command(entry, action, None if replica is None else sups)
    except Exception as exc:
        # The only expected cause: the supervisor shut down between our lookup and its mailbox.
        log.error("admin %s of %s failed: %r", action, entry.name, exc)
        raise EngineUnavailable(
            f"Could not {action} '{entry.name}': its supervisor is shutting down.", code="engine_unavailable"
        ) from None
    return _json({"model": entry.name, "action": action, "data": [engine_row(entry, sup.snapshot()) for sup in sups]})


@router.post("/engines/{model:path}/start")
async def start(model: str, state: OwnerStateDep, replica: ReplicaQuery = None) -> Response:
    return await _command(state, model, replica, "start")


@router.post("/engines/{model:path}/stop")
async def stop(model: str, state: OwnerStateDep, replica: ReplicaQuery = None) -> Response:
    return await _command(state, model, replica, "stop")


@router.post("/engines/{model:path}/restart")
async def restart(model: str, state: OwnerStateDep, replica: ReplicaQuery = None) -> Response:
    return await _command(state, model, replica, "restart")


@router.post("/engines/{model:path}/sleep")
async def sleep(model: str, state: OwnerStateDep) -> Response:
    """Put the whole model to sleep (``sleep:`` in its config, an engine with a sleep API): its processes stay,
    its GPU memory is given back. A replica whose sleep fails is stopped instead (its row says why)."""
    entry = resolve(state.pool, model)
    if state.draining:
        raise EngineUnavailable("The gateway is shutting down.", code="shutting_down")
    api = entry.adapter.sleep_api(entry.spec) if entry.adapter.spawns else None
    if api is None:
        reason = entry.adapter.no_sleep_reason(entry.spec) if entry.adapter.spawns else "a remote engine"
        raise BadRequest(
            f"The model '{entry.name}' cannot be put to sleep: {reason}.", code="sleep_unsupported", status=409
        )
    return await _sleep_or_wake(state, entry, "sleep")


@router.post("/engines/{model:path}/wake")
async def wake(model: str, state: OwnerStateDep) -> Response:
    """Wake the whole model (a model that is not asleep is started, as by ``start``); readiness follows."""
    entry = resolve(state.pool, model)
    if state.draining:
        raise EngineUnavailable("The gateway is shutting down.", code="shutting_down")
    return await _sleep_or_wake(state, entry, "wake")


async def _sleep_or_wake(state: OwnerState, entry: ModelEntry, action: Literal["sleep", "wake"]) -> Response:
    try:
        await state.pool.command(entry, action)
    except ValueError as exc:  # the scheduler's word: this model cannot sleep now (and why)
        raise BadRequest(
            f"The model '{entry.name}' was not put to sleep: {exc}", code="sleep_refused", status=409
        ) from None
    except Exception as exc:
        log.error("admin %s of %s failed: %r", action, entry.name, exc)
        raise EngineUnavailable(
            f"Could not {action} '{entry.name}': its supervisor is shutting down.", code="engine_unavailable"
        ) from None
    rows = [engine_row(entry, sup.snapshot()) for sup in entry.replicas]
    return _json({"model": entry.name, "action": action, "data": rows})


@router.post("/reload")
async def reload(state: OwnerStateDep) -> Response:
    """Re-read the config file: models added, removed and changed are applied; see gateway/config/reload.py."""
    if state.reloader is None:
        raise BadRequest(
            "The gateway was started without a config file: there is nothing to reload.", code="no_config_file"
        )
    if state.draining:
        raise EngineUnavailable("The gateway is shutting down.", code="shutting_down")
    try:
        return _json(await state.reloader.reload(state))
    except ConfigError as exc:
        raise BadRequest(f"The config was not reloaded, nothing changed: {exc}", code="invalid_config") from None


@router.get("/engines/{model:path}/logs")
async def logs(
    model: str,
    state: OwnerStateDep,
    replica: ReplicaQuery = None,
    tail: Annotated[int | None, Query(ge=0, le=100_000)] = None,
    follow: bool = False,
) -> Response:
    """``tail`` lines (default 100) as JSON; with ``follow``, the last ``tail`` (default 0) then live, as SSE."""
    entry = resolve(state.pool, model)
    sups = _replicas(entry, replica)
    if follow:
        return LogStream([(sup.replica, sup.log) for sup in sups], tail or 0, lambda: state.draining)
    n = 100 if tail is None else tail
    return _json(
        {
            "model": entry.name,
            "data": [
                {"replica": sup.replica, "total_lines": sup.log.total_lines, "lines": sup.log.tail(n)} for sup in sups
            ],
        }
    )  # engine output is scrubbed of secrets at the pipe


@router.get("/engines/{model:path}")
async def get_engine(model: str, state: OwnerStateDep) -> Response:
    entry = resolve(state.pool, model)
    return _json({"object": "list", "data": [engine_row(entry, r.snapshot()) for r in entry.replicas]})


def _event(replica: int, line: str) -> bytes:
    # JSON, not the raw line: a bare \r inside an engine's line would end the SSE field early.
    return b"data: " + orjson.dumps({"replica": replica, "line": line}) + b"\n\n"


class LogStream(Response):
    """SSE of log lines, live, until the client leaves, the gateway drains, or the rings close.

    Pure ASGI under a Response's name (FastAPI passes a Response through untouched): it watches
    ``http.disconnect`` itself, since a quiet log writes nothing that could fail, and it always
    unsubscribes its followers.
    """

    media_type = "text/event-stream"

    def __init__(self, rings: list[tuple[int, LogRing]], backlog: int, stopping: Callable[[], bool]) -> None:
        self._rings = rings
        self._backlog = backlog
        self._stopping = stopping
        self.background = None
        self.status_code = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Subscribe and read the backlog with no await between: no line is lost or sent twice.
        followers = [(replica, ring.subscribe()) for replica, ring in self._rings]
        backlog = [(replica, line) for replica, ring in self._rings for line in ring.tail(self._backlog)]
        write_lock = asyncio.Lock()

        async def write(body: bytes) -> None:
            async with write_lock:
                await send({"type": "http.response.body", "body": body, "more_body": True})

        async def pump(replica: int, follower: LogFollower) -> None:
            async for line in follower:
                await write(_event(replica, line))

        async def pumps() -> None:
            await asyncio.gather(*(pump(replica, follower) for replica, follower in followers))

        async def left() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async def ticker() -> None:
            # Polled, not awaited: the drain flag is a plain bool set by the signal handler's drain.
            quiet = 0.0
            while not self._stopping():
                await asyncio.sleep(DRAIN_POLL_S)
                quiet += DRAIN_POLL_S
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    await write(b": keepalive\n\n")

        tasks: list[asyncio.Task[None]] = []
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            for replica, line in backlog:
                await write(_event(replica, line))
            tasks = [asyncio.create_task(c) for c in (left(), pumps(), ticker())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            gone = tasks[0].done()
            await _end(tasks, followers)
            if not gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # uvicorn's ClientDisconnected: the client left while we wrote
        finally:
            await _end(tasks, followers)


async def _end(tasks: list[asyncio.Task[None]], followers: list[tuple[int, LogFollower]]) -> None:
    """Unsubscribe (so the ring stops feeding a dead stream) and wait for the helpers to finish."""
    for _, follower in followers:
        follower.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
