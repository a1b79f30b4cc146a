"""LightLLM: ``python -m lightllm.server.api_server --model_dir MODEL``; raw-prompt ``/generate``, ``/health``.

What it serves (ModelTC/lightllm, ``lightllm/server/api_http.py``): ``/generate``, ``/generate_stream``,
``/v1/chat/completions``, ``/v1/completions``, and its own ``/tokens`` and ``/get_score`` (not vLLM's
``/tokenize`` or ``/score`` shapes, so not those capabilities). No Responses or Messages: both are translated
to chat.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, python_module, render_flags
from engines.spec import ModelSpec


@dataclass(frozen=True)
class LightLLMAdapter(EngineAdapter):
    kind = "lightllm"
    default_startup_timeout = 1800.0
    dialect = "lightllm"
    capabilities = frozenset({"chat", "completions", "generate"})
    stream_end = "eof"  # /generate_stream sends no [DONE]

    def argv(self, spec: ModelSpec, host: str, port: int) -> list[str]:
        assert spec.model is not None
        argv = [
            *self.executable(spec, python_module("lightllm.server.api_server")),
            "--model_dir",
            spec.model,
            "--model_name",
            spec.name,
            "--host",
            host,
            "--port",
            str(port),
            "--tp",
            str(spec.tp_size),
        ]
        return argv + render_flags(spec.args)
