"""LMDeploy 0.18: ``lmdeploy serve api_server MODEL``; one served name, which requests must use exactly.

Natively (InternLM/lmdeploy, ``lmdeploy/serve/anthropic/router.py`` and ``endpoints/messages.py``,
``lmdeploy/serve/openai/responses/``, since 0.13/0.14): ``/v1/messages`` (400 "Missing required header:
anthropic-version" without that header, which the gateway forwards; errors in Anthropic's shape; ids
``msg_…``), ``/v1/messages/count_tokens``, and ``/v1/responses`` (whose stream may end with
``response.incomplete``). No ``/tokenize`` (its tokenizer endpoint is ``/v1/encode``), no audio, scoring or
pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, render_flags
from engines.spec import ModelSpec


@dataclass(frozen=True)
class LMDeployAdapter(EngineAdapter):
    kind = "lmdeploy"
    default_startup_timeout = 1800.0
    dialect = "lmdeploy"
    capabilities = frozenset({"chat", "completions", "embeddings", "rerank", "responses", "messages", "count_tokens"})

    def argv(self, spec: ModelSpec, host: str, port: int) -> list[str]:
        assert spec.model is not None
        argv = [
            *self.executable(spec, ["lmdeploy"]),
            "serve",
            "api_server",
            spec.model,
            "--server-name",
            host,
            "--server-port",
            str(port),
            "--model-name",
            spec.name,
        ]
        if spec.tp_size > 1:
            argv += ["--tp", str(spec.tp_size)]
        return argv + render_flags(spec.args)

    def is_ready(self, status: int, body: bytes) -> bool:
        # ≥0.14 answers 200 for healthy/sleeping and 503 while initializing; older ones an empty 200.
        return status == 200
