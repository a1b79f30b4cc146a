"""vLLM 0.33: ``vllm serve MODEL``; refuses connections while loading; ``/health`` 200 when up, 503 when dead.

What it serves natively (``capabilities``), as observed of 0.32 (docs/real-vllm/transcripts/openapi.json and
the responses*/messages*/tokenize*/detokenize transcripts): ``/v1/responses`` (stream: named events from
``response.created`` to ``response.completed``), ``/v1/messages`` and ``/v1/messages/count_tokens``
(Anthropic, its errors in Anthropic's shape, streams end at ``message_stop`` with no ``[DONE]``), ``/tokenize``
and ``/detokenize``. The task-dependent routes are registered only for a model of that task (a generative
model answers them 404, which the gateway relays): ``/v1/embeddings``, ``/pooling``, ``/classify`` and
``/v1/classify``, ``/score`` and ``/v1/score``, ``/rerank`` and ``/v1/rerank`` (pooling models),
``/v1/audio/transcriptions`` and ``/v1/audio/translations`` (speech-to-text models). Not in vLLM itself:
``/v1/audio/speech`` and ``/v1/images/generations`` (vLLM-Omni's), which are refused here.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, render_flags
from engines.spec import ModelSpec


@dataclass(frozen=True)
class VLLMAdapter(EngineAdapter):
    kind = "vllm"
    default_startup_timeout = 1800.0  # big models: download, load, torch.compile, CUDA graphs
    capabilities = frozenset(
        {
            "chat",
            "completions",
            "embeddings",
            "rerank",
            "responses",
            "messages",
            "count_tokens",
            "tokenize",
            "transcription",
            "score",
            "classify",
            "pooling",
        }
    )
    # Responses and Anthropic Messages natively (docs/real-vllm/transcripts/responses*.txt, messages*.txt).

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
