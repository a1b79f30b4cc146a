"""``transformers serve`` on CPU: the engine that runs where there is no GPU.

It addresses a local model by its path (requests send the path as ``model``), lists only hub-cache
models in ``/v1/models`` (and fails without a cache directory), so readiness is ``/health`` and the
environment pins an offline, existing cache.

What 5.23 serves (``transformers/cli/serving/server.py``): ``/v1/chat/completions``, ``/v1/completions``,
``/v1/responses``, ``/v1/audio/transcriptions``, ``/v1/systemone``. Its Responses endpoint streams when the
body has no ``stream`` (``serving/response.py``: ``body.get("stream", True)``), and the openai SDK leaves
``stream`` out of a non-stream call, which would then get events where it expects JSON: Responses is
translated to chat instead. No Messages (translated), no ``/tokenize``.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, render_flags
from engines.spec import ModelSpec


@dataclass(frozen=True)
class TransformersAdapter(EngineAdapter):
    kind = "transformers"
    default_startup_timeout = 300.0
    dialect = "transformers"
    capabilities = frozenset({"chat", "completions", "transcription"})
    stream_end = "finish"  # 5.23 sends no [DONE]; the last event carries finish_reason and usage

    def model_ref(self, spec: ModelSpec) -> str:
        assert spec.model is not None
        # A local folder is named by its absolute path; anything else is a hub id.
        return os.path.abspath(spec.model) if os.path.isdir(spec.model) else spec.model

    def argv(self, spec: ModelSpec, host: str, port: int) -> list[str]:
        argv = [
            *self.executable(spec, [_transformers_cli()]),
            "serve",
            self.model_ref(spec),
            "--host",
            host,
            "--port",
            str(port),
        ]
        if "device" not in spec.args:
            argv += ["--device", "cpu"]
        return argv + render_flags(spec.args)

    def env(self, spec: ModelSpec) -> dict[str, str]:
        # Offline: a local model must never send the engine to a hub. (Its /v1/models needs an existing
        # HF_HUB_CACHE, but the gateway never asks it: readiness is /health.)
        return {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **super().env(spec)}

    def request_model(self, spec: ModelSpec) -> str:
        return self.model_ref(spec)

    def response_model(self, spec: ModelSpec) -> str | None:
        return f"{self.model_ref(spec)}@main"


def _transformers_cli() -> str:
    """The CLI of the environment the gateway runs in, also when that environment is not activated."""
    beside = os.path.join(os.path.dirname(sys.executable), "transformers")
    return beside if os.access(beside, os.X_OK) else shutil.which("transformers") or "transformers"
