"""Model folders found under ``models_dir``, served without a config entry.

``discover(models_dir, policy, gpus=..., explicit=...)`` reads each subfolder's own files to tell its
kind (classify), sizes its weights from safetensors headers (weights), picks the engine from the
policy's table (policy) and GPUs from the inventory it is given (placement). Nothing here reads NVML,
logs or starts a process: the gateway's config loader passes GPU readings in and reports the result.

Default engines (``discovery.engines`` / ``discovery.cpu_engines`` override one kind at a time):

    kind        host with GPUs                       host without GPUs (NVML sees none)
    chat        vllm                                 transformers
    vision      lmdeploy                             transformers
    embedding   vllm --runner pooling [--convert embed]     none: skipped (no CPU engine serves it)
    rerank      vllm --runner pooling [--convert classify]  none: skipped

Placement: see ``placement.py`` (weights from safetensors headers, +20 % KV headroom, +1 GiB per GPU,
smallest power-of-two tensor parallel on unassigned GPUs, then vLLM CPU offload, else skipped with why).
"""

from engines.discovery.classify import Classified, Unsupported, classify
from engines.discovery.policy import CPU_ENGINES, GPU_ENGINES, DiscoveryPolicy, GpuEntry
from engines.discovery.scan import DiscoveryResult, Planned, Skipped, discover, sanitize
from engines.discovery.sizing import Fit, GiB, GpuSlot, Need, place
from engines.discovery.weights import Weights, read_weights

__all__ = [
    "CPU_ENGINES",
    "GPU_ENGINES",
    "Classified",
    "DiscoveryPolicy",
    "DiscoveryResult",
    "Fit",
    "GiB",
    "GpuEntry",
    "GpuSlot",
    "Need",
    "Planned",
    "Skipped",
    "Unsupported",
    "Weights",
    "classify",
    "discover",
    "place",
    "read_weights",
    "sanitize",
]
