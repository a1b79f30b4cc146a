"""``GET /gpu/status``: each GPU as NVML sees it, joined with the engines that hold it.

An engine holds a GPU two ways, both shown: by config (its ``gpus``, which become CUDA_VISIBLE_DEVICES)
and by evidence (NVML lists one of its processes on that GPU). They differ when CUDA and NVML number the
GPUs differently (CUDA_DEVICE_ORDER), when ``gpus`` is unset, or when a leftover holds memory.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Response

from engines import EngineState, ReplicaSnapshot
from engines.process import procfs
from gateway.deps import OwnerStateDep
from gateway.observability.gpu_probe import GpuInfo, GpuReport

router = APIRouter()

_MAX_TREE = 4096  # processes walked per engine: a fork bomb under an engine must not stall the answer


@dataclass(frozen=True)
class Holder:
    """One replica as the join needs it: read on the event loop, used on a worker thread."""

    model: str
    gpus: tuple[int, ...]
    snapshot: ReplicaSnapshot


def _engine_tag(pid: int) -> tuple[str, int] | None:
    """(model, replica) from the launch tag in the process's environment, if this gateway launched it."""
    tagged = procfs.engine_tag(pid)
    if tagged is None or tagged.owner_pid != os.getpid():
        return None  # another gateway's engine (or its leftover) is not ours to name
    head, _, _launch = tagged.engine_id.rpartition("/")  # <model>/<replica>/<launch>
    model, _, replica = head.rpartition("/")  # a model name may itself hold slashes
    return (model, int(replica)) if model and replica.isdigit() else None


def owners_of(pids: Iterable[int], holders: Sequence[Holder]) -> dict[int, tuple[str, int]]:
    """Which replica each GPU process belongs to. Blocking (/proc): run it on a worker thread.

    The launch tag comes first (every descendant inherits it, also after setsid or reparenting); the
    reaper's process tree catches an engine that scrubbed its environment.
    """
    owners: dict[int, tuple[str, int]] = {}
    untagged = []
    for pid in pids:
        tag = _engine_tag(pid)
        if tag is not None:
            owners[pid] = tag
        else:
            untagged.append(pid)
    if untagged:
        for holder in holders:
            snap = holder.snapshot
            roots = {p for p in (snap.pid, snap.engine_pid) if p}
            tree = set().union(*(procfs.descendants(root, _MAX_TREE) for root in roots)) if roots else set()
            for pid in untagged:
                if pid in tree:
                    owners.setdefault(pid, (snap.model, snap.replica))
    return owners


def _gpu_row(gpu: GpuInfo, holders: Sequence[Holder], owners: dict[int, tuple[str, int]]) -> dict[str, Any]:
    by_key = {(h.model, h.snapshot.replica): h for h in holders}
    engines: dict[tuple[str, int], dict[str, Any]] = {}

    def engine(key: tuple[str, int]) -> dict[str, Any]:
        if key not in engines:
            holder = by_key.get(key)
            snap = holder.snapshot if holder else None
            engines[key] = {
                "model": key[0],
                "replica": key[1],
                "state": snap.state.value if snap else None,
                "pid": snap.pid if snap else None,
                "engine_pid": snap.engine_pid if snap else None,
                "configured": bool(holder and gpu.index in holder.gpus),
                "pids": [],
            }
        return engines[key]

    for holder in holders:
        if gpu.index in holder.gpus:
            engine((holder.model, holder.snapshot.replica))
    processes = []
    for proc in gpu.processes:
        owner = owners.get(proc.pid)
        if owner is not None:
            engine(owner)["pids"].append(proc.pid)
        processes.append(
            {
                "pid": proc.pid,
                "used_memory_bytes": proc.used_memory,
                "model": owner[0] if owner else None,
                "replica": owner[1] if owner else None,
            }
        )
    return {
        "index": gpu.index,
        "name": gpu.name,
        "uuid": gpu.uuid,
        "memory_total_bytes": gpu.memory_total,
        "memory_used_bytes": gpu.memory_used,
        "memory_free_bytes": gpu.memory_free,
        "utilization": gpu.utilization,
        "temperature_c": gpu.temperature_c,
        "power_w": gpu.power_w,
        "engines": list(engines.values()),
        "processes": processes,
    }


def status_body(report: GpuReport, holders: Sequence[Holder], owners: dict[int, tuple[str, int]]) -> dict[str, Any]:
    gpus = [_gpu_row(gpu, holders, owners) for gpu in report.devices]
    seen = {gpu.index for gpu in report.devices}
    # Only claimed when NVML answered: without it every configured GPU would look missing.
    unseen = [] if not report.devices else sorted({(h.model, g) for h in holders for g in h.gpus if g not in seen})
    return {
        "object": "gpu.status",
        "count": len(gpus),
        "reason": report.reason,
        "read_at": report.read_at,
        "gpus": gpus,
        "unseen": [{"model": m, "gpu": g} for m, g in unseen],
    }


@router.get("/gpu/status")
async def gpu_status(state: OwnerStateDep) -> Response:
    report = await state.gpus.report()
    holders = [Holder(e.spec.name, r.spec.gpus, r.snapshot()) for e in state.pool.entries() for r in e.replicas]
    pids = {p.pid for gpu in report.devices for p in gpu.processes}
    live = [h for h in holders if h.snapshot.state is not EngineState.STOPPED]
    owners = await asyncio.to_thread(owners_of, pids, live) if pids else {}
    return Response(orjson.dumps(status_body(report, holders, owners)), media_type="application/json")
