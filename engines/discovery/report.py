"""The discovery plan as text lines, for ``gateway check`` and the log (no I/O here)."""

from __future__ import annotations

from engines.discovery.scan import DiscoveryResult, Planned
from engines.discovery.sizing import gib


def header(result: DiscoveryResult) -> str:
    found = f"models_dir {result.models_dir}: {len(result.plan)} model(s) found, {len(result.skipped)} skipped"
    if not result.gpus:
        return f"{found}; GPUs: none (the CPU-engine table applies)"
    gpus = ", ".join(f"{g.index} {g.name} {gib(g.memory_total)}".replace("  ", " ") for g in result.gpus)
    return f"{found}; GPUs: {gpus}"


def plan_line(p: Planned) -> str:
    """``folder → kind → engine → GPUs``, with the numbers behind the placement."""
    if p.gpus:
        where = f"GPUs {','.join(map(str, p.gpus))} (tp {len(p.gpus)})" if len(p.gpus) > 1 else f"GPU {p.gpus[0]}"
        where += f", plans {gib(p.need_per_gpu)} per GPU"
    else:
        where = "CPU"
    line = f"discovered: {p.folder} → {p.kind} → {p.engine} → {where}; weights {gib(p.weights_bytes)}"
    if p.offload_gib:
        line += f"; cpu offload {p.offload_gib} GiB per GPU"
    return f"{line} ({p.evidence})"


def footer(result: DiscoveryResult) -> list[str]:
    lines = [f"note: {n}" for n in result.notes]
    lines += [f"note: {p.name}: {n}" for p in result.plan for n in p.notes]
    lines += [f"overridden: {o.folder}: {o.reason}" for o in result.overridden]
    lines += [f"skipped: {s.folder}: {s.reason}" for s in result.skipped]
    return lines
