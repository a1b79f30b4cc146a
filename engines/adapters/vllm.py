"""vLLM 0.33: ``vllm serve MODEL``; refuses connections while loading; ``/health`` 200 when up, 503 when dead."""

from __future__ import annotations

from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, render_flags
from engines.spec import ModelSpec


@dataclass(frozen=True)
class VLLMAdapter(EngineAdapter):
    kind = "vllm"
    default_startup_timeout = 1800.0  # big models: download, load, torch.compile, CUDA graphs
    # Responses and Anthropic Messages natively (docs/real-vllm/transcripts/responses*.txt, messages*.txt).
    capabilities = EngineAdapter.capabilities | {"responses", "messages"}

    def argv(self, spec: ModelSpec, host: str, port: int) -> list[str]:
        assert spec.model is not None
        argv = [
            *self.executable(spec, ["vllm"]),
            "serve",
            spec.model,
            "--served-model-name",
            *spec.served_names,
            "--host",
            host,
            "--port",
            str(port),
        ]
        if spec.tp_size > 1:
            argv += ["--tensor-parallel-size", str(spec.tp_size)]
        return argv + render_flags(spec.args, negate_false=True)

    def env(self, spec: ModelSpec) -> dict[str, str]:
        # The gateway fetches media itself; the engine must never reach the network on a client's behalf.
        return {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0", **super().env(spec)}
