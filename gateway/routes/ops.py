"""What operators and orchestrators poll: liveness, readiness, metrics. Cached state only, never engine I/O."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Response

from engines import EngineState, ModelEntry
from gateway.deps import GatewayState, StateDep

router = APIRouter()


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def model_state(entry: ModelEntry) -> str:
    """A model's state is its best replica's."""
    states = [r.snapshot().state for r in entry.replicas]
    for candidate in (EngineState.READY, EngineState.STARTING, EngineState.BACKOFF, EngineState.STOPPING,
                      EngineState.FAILED):
        if candidate in states:
            return candidate.value
    return EngineState.STOPPED.value


def _replica_summary(entry: ModelEntry) -> list[dict[str, Any]]:
    rows = []
    for replica in entry.replicas:
        s = replica.snapshot()
        rows.append({
            "replica": s.replica, "state": s.state.value, "pid": s.engine_pid or s.pid, "restarts": s.restarts,
            "last_exit_code": s.last_exit_code, "last_error": s.last_error, "since": s.state_since,
            "in_flight": replica.inflight,
        })
    return rows


def not_ready(state: GatewayState) -> list[str]:
    return [e.spec.name for e in state.pool.entries()
            if e.spec.load == "eager" and state.pool.pick(e) is None]


@router.get("/health")
@router.get("/v1/health")
async def health(state: StateDep) -> Response:
    models = {
        e.spec.name: {"engine": e.spec.engine, "load": e.spec.load, "state": model_state(e),
                      "replicas": _replica_summary(e)}
        for e in state.pool.entries()
    }
    return _json({
        "status": "draining" if state.draining else "ok",
        "uptime_s": round(time.time() - state.started_at, 1),
        "gpus": state.gpus.count(),
        "models": models,
    })


@router.get("/ready")
async def ready(state: StateDep) -> Response:
    if state.draining:
        return _json({"status": "draining"}, 503)
    waiting = not_ready(state)
    if waiting:
        return _json({"status": "not_ready", "waiting_for": waiting}, 503)
    return _json({"status": "ready"})


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
