"""SGLang: ``python -m sglang.launch_server --model-path MODEL``; ``/health`` 200 when up.

Natively (sgl-project/sglang, ``python/sglang/srt/entrypoints/http_server.py``): ``/v1/responses`` (and
``GET /v1/responses/{id}``, ``/cancel``), ``/tokenize`` and ``/detokenize`` (also under ``/v1``),
``/v1/score`` (decoder-only scoring, its own body), ``/v1/classify``, ``/v1/rerank``, ``/v1/embeddings``.
No Anthropic Messages (translated to chat), no audio, no ``/pooling``.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, python_module, render_flags
from engines.spec import ModelSpec


@dataclass(frozen=True)
class SGLangAdapter(EngineAdapter):
    kind = "sglang"
    default_startup_timeout = 1800.0
    capabilities = frozenset(
        {"chat", "completions", "embeddings", "rerank", "responses", "tokenize", "score", "classify"}
    )
    # http_server.py serves /v1/responses (and GET /v1/responses/{id}), not Anthropic's /v1/messages.

    def argv(self, spec: ModelSpec, host: str, port: int) -> list[str]:
        assert spec.model is not None
        argv = [
            *self.executable(spec, python_module("sglang.launch_server")),
            "--model-path",
            spec.model,
            "--served-model-name",
            spec.name,
            "--host",
            host,
            "--port",
            str(port),
        ]
        if spec.tp_size > 1:
            argv += ["--tp-size", str(spec.tp_size)]
        return argv + render_flags(spec.args)
