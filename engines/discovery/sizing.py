"""Which GPUs a discovered model gets: memory estimate, tensor parallel size, CPU offload or a reason.

The rule (``gateway check`` prints its numbers for each model):

* need = weights * (1 + kv_cache_headroom): the bytes of the weight files, +20 % by default for the KV
  cache and activations.
* per GPU with tensor parallel n: need / n + gpu_overhead (1 GiB: CUDA context, graphs, buffers).
* a GPU offers gpu_memory_fraction (0.9) * its *total* memory. Total, not NVML's momentary "free": GPUs
  are given to one model each, and a re-scan on reload, while this gateway's own engines fill them,
  must produce the same plan.
* n is the smallest power of two (1, 2, 4, 8, ...) that divides the model's attention heads and whose
  first n free GPUs (by index) each offer the per-GPU need. GPUs of explicit config entries and of
  models placed earlier are not free.
* nothing fits: an engine with CPU offload (vLLM ``--cpu-offload-gb``, GiB per GPU) runs on the largest
  such n with the missing GiB offloaded, if that is at most the weights per GPU and at most
  max_cpu_offload_gib in total; otherwise the model is not placed, with the numbers in the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class GpuSlot:
    """One GPU as placement sees it: plain data, read from NVML by the gateway or given in the config."""

    index: int
    memory_total: int  # bytes
    name: str = ""


@dataclass(frozen=True)
class Need:
    weights: int  # bytes
    headroom: float  # fraction of the weights, for the KV cache and activations
    overhead: int  # bytes per GPU

    @property
    def total(self) -> int:
        return math.ceil(self.weights * (1 + self.headroom))

    def per_gpu(self, n: int) -> int:
        return math.ceil(self.total / n) + self.overhead


@dataclass(frozen=True)
class Fit:
    gpus: tuple[int, ...]
    offload_gib: int = 0  # per GPU; 0 = none


@dataclass(frozen=True)
class Limits:
    fraction: float  # of a GPU's total memory one model may use
    offload_flag: str | None  # the engine's CPU-offload flag; None: it has none
    max_offload_gib: float  # summed over the model's GPUs


def gib(n: int | float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def budget(slot: GpuSlot, fraction: float) -> int:
    return int(slot.memory_total * fraction)


def tp_sizes(free: int, heads: int | None) -> list[int]:
    """Powers of two up to ``free`` that divide the attention heads (engines shard heads evenly)."""
    sizes, n = [], 1
    while n <= free:
        if heads is None or heads % n == 0:
            sizes.append(n)
        n *= 2
    return sizes


def fits_on(need: Need, slots: Sequence[GpuSlot], fraction: float) -> bool:
    return bool(slots) and all(need.per_gpu(len(slots)) <= budget(s, fraction) for s in slots)


def place(need: Need, free: Sequence[GpuSlot], limits: Limits, heads: int | None = None) -> Fit | str:
    """GPUs for one model (smallest tensor parallel size that fits), else offload, else the reason."""
    if not free:
        return f"no free GPU left for {gib(need.total)} (weights {gib(need.weights)} + KV headroom)"
    ordered = sorted(free, key=lambda s: s.index)
    sizes = tp_sizes(len(ordered), heads)
    for n in sizes:
        chosen = [s for s in ordered if need.per_gpu(n) <= budget(s, limits.fraction)][:n]
        if len(chosen) == n:
            return Fit(tuple(s.index for s in chosen))
    n = sizes[-1]  # 1 always divides, so there is one
    # Offload on the n roomiest GPUs: the least to move to host memory.
    chosen = sorted(sorted(ordered, key=lambda s: -s.memory_total)[:n], key=lambda s: s.index)
    smallest = min(budget(s, limits.fraction) for s in chosen)
    short = need.per_gpu(n) - smallest
    why = (
        f"needs {gib(need.per_gpu(n))} per GPU on {n} GPU(s) (weights {gib(need.weights)} "
        f"+ {need.headroom * 100:g} % KV headroom, + {gib(need.overhead)} overhead per GPU); "
        f"the free GPUs {','.join(str(s.index) for s in chosen)} offer {gib(smallest)}"
    )
    if limits.offload_flag is None:
        return f"{why}, and this engine has no CPU offload"
    offload = math.ceil(short / GiB)
    if offload * GiB > need.weights / n:
        return f"{why}; offloading every weight would still not leave room for the KV cache"
    if offload * n > limits.max_offload_gib:
        return (
            f"{why}; it would need {offload * n} GiB of CPU offload, over max_cpu_offload_gib "
            f"({limits.max_offload_gib:g})"
        )
    return Fit(tuple(s.index for s in chosen), offload)
