"""SGLang: ``python -m sglang.launch_server --model-path MODEL``; ``/health`` 200 when up."""

from __future__ import annotations

from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, python_module, render_flags
from engines.spec import ModelSpec


@dataclass(frozen=True)
class SGLangAdapter(EngineAdapter):
    kind = "sglang"
    default_startup_timeout = 1800.0
    # http_server.py serves /v1/responses (and GET /v1/responses/{id}), not Anthropic's /v1/messages.
    capabilities = EngineAdapter.capabilities | {"responses"}

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
