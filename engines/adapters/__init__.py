"""One adapter per engine kind; ``adapter_for`` is the only lookup."""

from __future__ import annotations

from engines.adapters.base import Capability, Dialect, EngineAdapter, StreamEnd, render_flags
from engines.adapters.lightllm import LightLLMAdapter
from engines.adapters.lmdeploy import LMDeployAdapter
from engines.adapters.remote import RemoteOpenAIAdapter
from engines.adapters.sglang import SGLangAdapter
from engines.adapters.transformers import TransformersAdapter
from engines.adapters.vllm import VLLMAdapter

ADAPTERS: dict[str, EngineAdapter] = {
    a.kind: a
    for a in (
        VLLMAdapter(),
        LMDeployAdapter(),
        LightLLMAdapter(),
        SGLangAdapter(),
        TransformersAdapter(),
        RemoteOpenAIAdapter(),
    )
}


def adapter_for(kind: str) -> EngineAdapter:
    return ADAPTERS[kind]


__all__ = ["ADAPTERS", "Capability", "Dialect", "EngineAdapter", "StreamEnd", "adapter_for", "render_flags"]
