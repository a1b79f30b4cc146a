"""What operators and orchestrators poll: liveness, readiness, metrics. Cached state only, never engine I/O.

``/health`` and ``/ready`` need no key, so that a load balancer or a kubelet can probe them. With API keys
configured, a caller without an ``admin`` key gets the verdict and counts only: model names, pids, exit
codes and error text are for operators.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from engines import EnginePool, ModelEntry
from engines.scheduling.scheduler import Phase
from gateway.deps import OwnerState, OwnerStateDep
from gateway.observability.metrics import merge_expositions

router = APIRouter()


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def model_state(pool: EnginePool, entry: ModelEntry) -> dict[str, Any]:
    """The model as a whole (stopped, starting, ready, draining, failed) and how many requests wait for it."""
    status = pool.status(entry)
    row: dict[str, Any] = {"state": status.phase.value, "queue_depth": status.queued}
    if status.draining_for is not None:
        row["draining_for"] = status.draining_for
    if status.phase is Phase.STARTING:
        progress = loading_progress(entry)
        if progress is not None:
            row["loading"] = progress
    return row


def loading_progress(entry: ModelEntry) -> str | None:
    """The engine's own last progress line while it loads (vLLM's "Loading safetensors checkpoint shards:
    50% Completed | 1/2"), when it prints one: read from the log ring, never from the engine."""
    for replica in entry.replicas:
        for line in reversed(replica.log.tail(20)):
            if "%" in line and ("Loading" in line or "Completed" in line):
                return line.strip()[-160:]
    return None


def _replica_summary(entry: ModelEntry, ejected: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for replica in entry.replicas:
        s = replica.snapshot()
        rows.append(
            {
                "replica": s.replica,
                "state": s.state.value,
                "pid": s.engine_pid or s.pid,  # kept for old readers; the two below say which is which
                "engine_pid": s.engine_pid,  # the engine's main process (null briefly after a restart)
                "reaper_pid": s.pid,  # the launch's reaper, the process group a stop signals
                "restarts": s.restarts,
                "last_exit_code": s.last_exit_code,
                "last_error": s.last_error,
                "since": s.state_since,
                "in_flight": replica.inflight,
                "gpus": list(replica.spec.gpus),
                "ejected": s.replica in ejected,
            }
        )
    return rows


def not_ready(state: OwnerState) -> list[str]:
    """Eager models that cannot serve. A model the scheduler stopped on purpose (idle, swapped out for
    another) or put to sleep comes back on its next request, and one a config reload added or changed loads
    while the gateway keeps serving the others: none of them makes the gateway unready."""
    waiting = []
    for entry in state.pool.entries():
        if entry.spec.load != "eager" or not entry.gates_ready:
            continue
        status = state.pool.status(entry)
        if status.phase in (Phase.READY, Phase.SLEEPING):
            continue
        if not (status.phase is Phase.STOPPED and status.standby):
            waiting.append(entry.spec.name)
    return waiting


def detailed(state: OwnerState, request: Request) -> bool:
    """An open gateway, or a caller whose key has the ``admin`` permission."""
    keys = state.keys
    if keys.open:
        return True
    identity = keys.identify(request.headers.get("authorization", "").encode("latin-1"))
    return identity is not None and identity.grants("admin")


@router.get("/health")
@router.get("/v1/health")
async def health(request: Request, state: OwnerStateDep) -> Response:
    status = "draining" if state.draining else "ok"
    if not detailed(state, request):
        entries = state.pool.entries()
        ready = sum(1 for e in entries if state.pool.status(e).phase is Phase.READY)
        return _json(
            {
                "status": status,
                "uptime_s": round(time.time() - state.started_at, 1),
                "gpus": state.gpus.count(),
                "models_ready": ready,
                "models_total": len(entries),
            }
        )
    models = {
        e.spec.name: {
            "engine": e.spec.engine,
            "load": e.spec.load,
            **model_state(state.pool, e),
            "replicas": _replica_summary(e, state.pool.status(e).ejected),
        }
        for e in state.pool.entries()
    }
    body: dict[str, Any] = {
        "status": status,
        "uptime_s": round(time.time() - state.started_at, 1),
        "gpus": state.gpus.count(),
        "models": models,
    }
    if state.workers is not None:
        body["workers"] = state.workers.summary()
    return _json(body)


@router.get("/ready")
async def ready(request: Request, state: OwnerStateDep) -> Response:
    if state.draining:
        return _json({"status": "draining"}, 503)
    waiting = not_ready(state)
    if waiting:
        if not detailed(state, request):
            return _json({"status": "not_ready", "waiting_for": len(waiting)}, 503)
        return _json({"status": "not_ready", "waiting_for": waiting}, 503)
    return _json({"status": "ready"})


@router.get("/metrics")
async def metrics(state: OwnerStateDep) -> Response:
    body = state.metrics.render()
    if state.workers is not None:  # the request path's series live in the workers: added up with the owner's
        body = merge_expositions([body.decode(), *await state.workers.scrape()])
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
