"""LMDeploy 0.18: ``lmdeploy serve api_server MODEL``; one served name, which requests must use exactly.

Natively (InternLM/lmdeploy, ``lmdeploy/serve/anthropic/router.py`` and ``endpoints/messages.py``,
``lmdeploy/serve/openai/responses/``, since 0.13/0.14): ``/v1/messages`` (400 "Missing required header:
anthropic-version" without that header, which the gateway forwards; errors in Anthropic's shape; ids
``msg_…``), ``/v1/messages/count_tokens``, and ``/v1/responses`` (whose stream may end with
``response.incomplete``). No ``/tokenize`` (its tokenizer endpoint is ``/v1/encode``), no audio, scoring or
pooling.

Sleep (``serve/openai/endpoints/management.py``): ``POST /sleep?level=1|2`` and ``POST /wakeup`` (both refused
without ``Content-Type: application/json``, and behind ``--api-keys`` like every path but /health), ``GET
/is_sleeping``; no start flag. A sleep aborts the requests in flight; while asleep ``/health`` says 200
``{"status": "sleeping"}`` and the inference routes answer 503 at once (``EngineSleepingMiddleware``).
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, render_flags
from engines.adapters.sleep import HttpCall, SleepApi
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

    def sleep_api(self, spec: ModelSpec) -> SleepApi | None:
        # Level 2 is not offered: it moves the weights to the "meta" device and its wakeup rebuilds an empty
        # model ("user should update weights after wakeup", pytorch/engine/model_agent/agent.py), which only
        # /update_weights with serialized tensors fills again: nothing the gateway can send.
        if spec.sleep is None or spec.sleep.level != 1:
            return None
        return SleepApi(1, HttpCall("POST", "/sleep?level=1"), (HttpCall("POST", "/wakeup"),), "/is_sleeping")

    def no_sleep_reason(self, spec: ModelSpec) -> str:
        if spec.sleep is not None and spec.sleep.level != 1:
            return (
                "LMDeploy sleeps at level 1 only: at level 2 it discards the weights and its wakeup does not "
                "reload them (set sleep.level to 1)"
            )
        return super().no_sleep_reason(spec)
