"""``discover``: a models folder → served specs, each with engine and GPUs, plus the folders it skipped and why.

Pure apart from reading the folder: the GPU inventory comes in as plain data (the gateway reads NVML), and
nothing is logged or started. The config loader calls it on every load, so a reload re-scans too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from engines.discovery.classify import Classified, Unsupported, classify
from engines.discovery.policy import GPU_ENGINE_KINDS, OFFLOAD_FLAG, DiscoveryPolicy, GpuEntry, kind_args
from engines.discovery.sizing import Fit, GiB, GpuSlot, Limits, Need, fits_on, place
from engines.discovery.weights import Weights, read_weights
from engines.spec import EngineKind, ModelSpec


@dataclass(frozen=True)
class Skipped:
    folder: str
    reason: str


@dataclass(frozen=True)
class Planned:
    """One discovered model as ``gateway check`` shows it."""

    name: str
    folder: str
    kind: str
    engine: str
    evidence: str
    gpus: tuple[int, ...]
    weights_bytes: int
    need_per_gpu: int  # 0 on CPU
    offload_gib: int = 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiscoveryResult:
    models_dir: str
    specs: tuple[ModelSpec, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    overridden: tuple[Skipped, ...] = ()  # folders an explicit entry serves; reason names the entry
    plan: tuple[Planned, ...] = ()
    gpus: tuple[GpuSlot, ...] = ()  # the inventory placement used
    notes: tuple[str, ...] = ()

    def planned(self, name: str) -> Planned | None:
        return next((p for p in self.plan if p.name == name), None)


def sanitize(folder_name: str) -> str:
    """A folder name made into a served name (ModelSpec's rule: 1-256 characters, no whitespace/control)."""
    clean = "".join("-" if c.isspace() or ord(c) < 32 or ord(c) == 127 else c for c in folder_name)
    return clean.strip("-")[:256]


def inventory(policy: DiscoveryPolicy, nvml: Sequence[GpuSlot]) -> tuple[tuple[GpuSlot, ...], tuple[str, ...]]:
    """The GPUs discovery may use: NVML's, narrowed or replaced by ``discovery.gpus``."""
    if policy.gpus is None:
        return tuple(nvml), ()
    seen = {s.index: s for s in nvml}
    out: list[GpuSlot] = []
    notes: list[str] = []
    for item in policy.gpus:
        if isinstance(item, GpuEntry):
            out.append(GpuSlot(item.index, int(item.memory_gib * GiB), "from config"))
        elif item in seen:
            out.append(seen[item])
        else:
            notes.append(f"discovery.gpus lists GPU {item}, which NVML does not see: not used")
    return tuple(out), tuple(notes)


def explicit_gpus(specs: Iterable[ModelSpec]) -> dict[int, str]:
    """GPUs explicit entries use. A GPU engine with no ``gpus`` sees every GPU and starts on the first
    ``tp_size`` of them (CUDA's default order), so those count as taken."""
    taken: dict[int, str] = {}
    for spec in specs:
        if spec.engine not in GPU_ENGINE_KINDS:
            continue
        for index in spec.gpus or tuple(range(spec.tp_size)):
            taken.setdefault(index, spec.name)
    return taken


def _real(path: str | None) -> str | None:
    return os.path.realpath(path) if path and os.path.isdir(path) else None


@dataclass
class _Candidate:
    name: str
    folder: Path
    what: Classified
    weights: Weights
    engine: EngineKind


def _candidates(
    root: Path,
    policy: DiscoveryPolicy,
    has_gpus: bool,
    explicit: Sequence[ModelSpec],
    skipped: list[Skipped],
    overridden: list[Skipped],
) -> list[_Candidate]:
    by_name = {n: s.name for s in explicit for n in s.served_names}
    by_path = {p: s.name for s in explicit if (p := _real(s.model)) is not None}
    owners: dict[str, str] = {}
    out: list[_Candidate] = []
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        # Hidden folders are caches and half-written downloads (demo_model writes .NAME.partial first).
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        if not (folder / "config.json").is_file():
            skipped.append(Skipped(folder.name, "no config.json: not a Hugging Face model folder"))
            continue
        name = sanitize(folder.name)
        owner = by_name.get(name) or by_path.get(os.path.realpath(folder))
        if owner is not None:
            overridden.append(Skipped(folder.name, f"served by the explicit models: entry {owner!r}"))
            continue
        if not name:
            skipped.append(Skipped(folder.name, "the folder name makes no valid model name"))
            continue
        if name in owners:
            skipped.append(Skipped(folder.name, f"served name {name!r} is already taken by folder {owners[name]!r}"))
            continue
        try:
            what = classify(folder)
            weights = read_weights(folder)
        except Unsupported as exc:
            skipped.append(Skipped(folder.name, str(exc)))
            continue
        except OSError as exc:  # a folder that vanished or is not readable mid-scan
            skipped.append(Skipped(folder.name, f"cannot be read: {exc.strerror or exc}"))
            continue
        engine = policy.engine_for(what.kind, has_gpus=has_gpus)
        if engine is None:
            host = "with GPUs" if has_gpus else "without GPUs (transformers serve has no such endpoint)"
            table = "engines" if has_gpus else "cpu_engines"
            skipped.append(
                Skipped(
                    folder.name,
                    f"{what.kind} model: no engine serves it on a host {host}; set discovery.{table}.{what.kind}",
                )
            )
            continue
        owners[name] = folder.name
        out.append(_Candidate(name, folder, what, weights, engine))
    return out


def discover(
    models_dir: str | os.PathLike[str],
    policy: DiscoveryPolicy | None = None,
    *,
    gpus: Sequence[GpuSlot] = (),
    explicit: Sequence[ModelSpec] = (),
    previous: Mapping[str, tuple[int, ...]] | None = None,
) -> DiscoveryResult:
    """Scan ``models_dir`` (one model per subfolder) and plan each model's engine and GPUs.

    ``gpus`` is the host's inventory (NVML), before ``policy.gpus`` narrows it; empty means a CPU-only
    host. ``explicit`` are the config's own entries: they win on served name and on model path, and
    their GPUs are not handed out. ``previous`` maps a discovered name to the GPUs it had before a
    reload: it keeps them when they still fit, so adding a folder does not move running models.
    """
    policy = policy or DiscoveryPolicy()
    root = Path(models_dir)
    if not root.is_dir():
        return DiscoveryResult(str(models_dir), skipped=(Skipped(str(models_dir), "models_dir is not a folder"),))
    slots, notes = inventory(policy, gpus)
    skipped: list[Skipped] = []
    overridden: list[Skipped] = []
    try:
        candidates = _candidates(root, policy, bool(slots), explicit, skipped, overridden)
    except OSError as exc:
        reason = f"models_dir cannot be listed: {exc.strerror or exc}"
        return DiscoveryResult(str(models_dir), skipped=(Skipped(str(models_dir), reason),))

    taken = explicit_gpus(explicit)
    free = {s.index: s for s in slots if s.index not in taken}
    owners = {i: f"{name} (config)" for i, name in taken.items()}
    fits = _place_all(candidates, policy, free, owners, bool(slots), previous or {}, skipped)
    specs: list[ModelSpec] = []
    plan: list[Planned] = []
    for c in sorted(candidates, key=lambda c: c.name):
        if c.name not in fits:
            continue
        fit, per_gpu = fits[c.name]
        args = kind_args(c.engine, c.what.kind, c.what.generative)
        if fit.offload_gib:
            args[OFFLOAD_FLAG[c.engine]] = fit.offload_gib
        try:
            spec = ModelSpec(
                name=c.name,
                engine=c.engine,
                model=str(c.folder.absolute()),
                display_name=c.folder.name if c.folder.name != c.name else None,
                gpus=fit.gpus,
                command=policy.command.get(c.engine),
                args={**args, **policy.args.get(c.engine, {})},
                load=policy.load,
                kind=c.what.kind,
                source="discovered",
            )
        except ValidationError as exc:
            skipped.append(Skipped(c.folder.name, f"cannot make a model entry: {exc.errors()[0]['msg']}"))
            continue
        specs.append(spec)
        plan.append(
            Planned(
                c.name,
                c.folder.name,
                c.what.kind,
                c.engine,
                c.what.evidence,
                fit.gpus,
                c.weights.bytes,
                per_gpu,
                fit.offload_gib,
                c.what.notes,
            )
        )
    if taken and slots:
        notes += (f"GPUs of explicit entries: {', '.join(f'{i} ({n})' for i, n in sorted(taken.items()))}",)
    return DiscoveryResult(
        str(models_dir),
        tuple(specs),
        tuple(sorted(skipped, key=lambda s: s.folder)),
        tuple(overridden),
        tuple(plan),
        slots,
        notes,
    )


def _place_all(
    candidates: Sequence[_Candidate],
    policy: DiscoveryPolicy,
    free: dict[int, GpuSlot],
    owners: dict[int, str],
    has_gpus: bool,
    previous: Mapping[str, tuple[int, ...]],
    skipped: list[Skipped],
) -> dict[str, tuple[Fit, int]]:
    """Place models that keep their previous GPUs first, then the rest largest first (first-fit
    decreasing packs more onto the same GPUs than folder order would)."""
    overhead = int(policy.gpu_overhead_gib * GiB)

    def need(c: _Candidate) -> Need:
        return Need(c.weights.bytes, policy.kv_cache_headroom, overhead)

    # CPU engines, and any engine on a host without GPUs (cpu_engines may name a CPU build of vLLM).
    out: dict[str, tuple[Fit, int]] = {
        c.name: (Fit(()), 0) for c in candidates if not has_gpus or c.engine not in GPU_ENGINE_KINDS
    }
    pending = [c for c in candidates if c.name not in out]
    for c in sorted(pending, key=lambda c: c.name):
        before = previous.get(c.name, ())
        slots = [free[i] for i in before if i in free]
        if before and len(slots) == len(before) and fits_on(need(c), slots, policy.gpu_memory_fraction):
            out[c.name] = (Fit(tuple(before)), need(c).per_gpu(len(before)))
            for i in before:
                del free[i]
                owners[i] = c.name
    for c in sorted((c for c in pending if c.name not in out), key=lambda c: (-c.weights.bytes, c.name)):
        limits = Limits(policy.gpu_memory_fraction, OFFLOAD_FLAG.get(c.engine), policy.max_cpu_offload_gib)
        if free:
            result = place(need(c), list(free.values()), limits, c.what.attention_heads)
        else:
            held = ", ".join(f"{i} → {owner}" for i, owner in sorted(owners.items()))
            result = f"no free GPU left (GPUs are given to one model each: {held})"
        if isinstance(result, str):
            skipped.append(Skipped(c.folder.name, f"cannot be placed: {result}"))
            continue
        out[c.name] = (result, need(c).per_gpu(len(result.gpus)))
        for i in result.gpus:
            del free[i]
            owners[i] = c.name
    return out
