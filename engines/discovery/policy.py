"""How discovered models are served: the default engine table, its overrides, and the placement knobs.

The ``discovery:`` block of the config (all keys optional)::

    discovery:
      engines: {chat: vllm, vision: lmdeploy, embedding: vllm, rerank: vllm}   # host with GPUs
      cpu_engines: {chat: transformers, vision: transformers}                  # host without GPUs
      command: {vllm: [/opt/vllm/bin/vllm], lmdeploy: [/opt/lmdeploy/bin/lmdeploy]}
      args: {vllm: {gpu-memory-utilization: 0.85}}   # extra flags for every discovered model of that engine
      load: eager                    # eager | on_demand, for discovered models
      gpus: [0, 1, 2, 3]             # only these NVML GPUs; or [{index: 0, memory_gib: 80}, ...] without NVML
      kv_cache_headroom: 0.2         # KV cache and activations, as a fraction of the weights' bytes
      gpu_overhead_gib: 1.0          # per GPU: CUDA context, graphs, buffers
      gpu_memory_fraction: 0.9       # of each GPU's total memory that one model may plan to use
      max_cpu_offload_gib: 64        # vLLM --cpu-offload-gb, summed over the model's GPUs; 0 = never offload

An entry in ``engines`` or ``cpu_engines`` replaces the default for that kind only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engines.spec import EngineKind, ModelKind

# The default engine for each kind. Why: vLLM is the fastest general server and serves pooling models
# (embeddings, rerank); LMDeploy's TurboMind/PyTorch VL pipeline is the one this deployment trusts for
# vision-language models. Without a GPU only `transformers serve` runs, and it has no embeddings or
# rerank endpoint, so those kinds have no CPU default (they are skipped with that reason).
GPU_ENGINES: dict[ModelKind, EngineKind] = {"chat": "vllm", "vision": "lmdeploy", "embedding": "vllm", "rerank": "vllm"}
CPU_ENGINES: dict[ModelKind, EngineKind] = {"chat": "transformers", "vision": "transformers"}

# Engines that get GPUs (CUDA_VISIBLE_DEVICES, tensor parallel). transformers runs on CPU (--device cpu).
GPU_ENGINE_KINDS: frozenset[EngineKind] = frozenset({"vllm", "lmdeploy", "sglang", "lightllm"})
# The engine flag that moves part of the weights to host memory, GiB per GPU. LMDeploy has none.
OFFLOAD_FLAG: dict[EngineKind, str] = {"vllm": "cpu-offload-gb"}
# Which engines a kind may be given: pooling kinds need an engine whose flags for them are known here.
ALLOWED: dict[ModelKind, frozenset[EngineKind]] = {
    "chat": frozenset({"vllm", "lmdeploy", "sglang", "lightllm", "transformers"}),
    "vision": frozenset({"vllm", "lmdeploy", "sglang", "transformers"}),
    "embedding": frozenset({"vllm"}),
    "rerank": frozenset({"vllm"}),
}


def kind_args(engine: EngineKind, kind: ModelKind, generative: bool) -> dict[str, Any]:
    """Flags an engine needs to serve this kind. vLLM spells pooling ``--runner pooling`` since 0.10 (the
    older ``--task embed|score`` is deprecated), plus ``--convert embed|classify`` for an architecture it
    must adapt: a causal LM shipped as an embedder (e.g. Qwen3-Embedding) needs ``--convert embed``;
    encoders and ``*ForSequenceClassification`` heads are pooling models already. (Source: vLLM's
    "Pooling Models" docs, 0.10-0.18; docs/ENGINES.md does not cover pooling flags.)"""
    if engine != "vllm" or kind not in ("embedding", "rerank"):
        return {}
    args: dict[str, Any] = {"runner": "pooling"}
    if generative:
        args["convert"] = "embed" if kind == "embedding" else "classify"
    return args


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuEntry(_Frozen):
    """A GPU described in the config, for hosts where the gateway cannot read NVML."""

    index: int = Field(ge=0)
    memory_gib: float = Field(gt=0)


class DiscoveryPolicy(_Frozen):
    engines: dict[ModelKind, EngineKind] = Field(default_factory=dict)
    cpu_engines: dict[ModelKind, EngineKind] = Field(default_factory=dict)
    command: dict[EngineKind, tuple[str, ...]] = Field(default_factory=dict)
    args: dict[EngineKind, dict[str, Any]] = Field(default_factory=dict)
    load: Literal["eager", "on_demand"] = "eager"
    gpus: tuple[int | GpuEntry, ...] | None = None  # None: every GPU NVML sees; () : none (CPU only)
    kv_cache_headroom: float = Field(0.2, ge=0)
    gpu_overhead_gib: float = Field(1.0, ge=0)
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    max_cpu_offload_gib: float = Field(64.0, ge=0)

    @field_validator("engines", "cpu_engines")
    @classmethod
    def _engine_serves_kind(cls, table: dict[ModelKind, EngineKind]) -> dict[ModelKind, EngineKind]:
        for kind, engine in table.items():
            if engine not in ALLOWED[kind]:
                raise ValueError(
                    f"{kind}: engine {engine!r} cannot serve {kind} models here "
                    f"(choose from {', '.join(sorted(ALLOWED[kind]))})"
                )
        return table

    @field_validator("command")
    @classmethod
    def _commands_not_empty(cls, table: dict[EngineKind, tuple[str, ...]]) -> dict[EngineKind, tuple[str, ...]]:
        for engine, argv in table.items():
            if not argv or not all(argv):
                raise ValueError(f"command.{engine}: give the executable, e.g. [/opt/{engine}/bin/{engine}]")
        return table

    def engine_for(self, kind: ModelKind, *, has_gpus: bool) -> EngineKind | None:
        """The engine for ``kind`` on this host, or None when no engine serves it here."""
        if has_gpus:
            return self.engines.get(kind) or GPU_ENGINES.get(kind)
        return self.cpu_engines.get(kind) or CPU_ENGINES.get(kind)

    @property
    def needs_nvml(self) -> bool:
        """False when the config lists every GPU with its memory (or none): NVML is then not read."""
        return self.gpus is None or any(isinstance(g, int) for g in self.gpus)
