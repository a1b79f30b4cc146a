"""SGLang: ``python -m sglang.launch_server --model-path MODEL``; ``/health`` 200 when up.

Natively (sgl-project/sglang, ``python/sglang/srt/entrypoints/http_server.py``): ``/v1/responses`` (and
``GET /v1/responses/{id}``, ``/cancel``), ``/tokenize`` and ``/detokenize`` (also under ``/v1``),
``/v1/score`` (decoder-only scoring, its own body), ``/v1/classify``, ``/v1/rerank``, ``/v1/embeddings``.
No Anthropic Messages (translated to chat), no audio, no ``/pooling``.

Sleep (``--enable-memory-saver``): ``POST /release_memory_occupation`` and ``POST /resume_memory_occupation``
with a JSON body (``tags`` absent: weights, KV cache and CUDA graphs), no is-sleeping route. Its weights survive
a release only with ``--enable-weights-cpu-backup`` (0.5.3+); without it they are reloaded from the model's
files on wake (``/update_weights_from_disk``). A release while a request runs trips the scheduler's
``assert is_fully_idle()`` and ends the engine (the sleep fails: the replica is stopped, not restarted). While
released, its ``/health`` request is skipped by the scheduler and answered 200.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, python_module, render_flags
from engines.adapters.sleep import HttpCall, SleepApi
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
        if spec.sleep is not None:
            argv += _absent(spec, "enable-memory-saver")
            if spec.sleep.level == 1:  # weights kept in host RAM; at level 2 they are reloaded from disk on wake
                argv += _absent(spec, "enable-weights-cpu-backup")
        return argv + render_flags(spec.args)

    def sleep_api(self, spec: ModelSpec) -> SleepApi | None:
        if spec.sleep is None:
            return None
        release = HttpCall("POST", "/release_memory_occupation")
        wake: tuple[HttpCall, ...] = (HttpCall("POST", "/resume_memory_occupation"),)
        if spec.sleep.level == 2:
            assert spec.model is not None
            reload = json.dumps({"model_path": spec.model})
            wake += (HttpCall("POST", "/update_weights_from_disk", reload),)
        return SleepApi(spec.sleep.level, release, wake)


def _absent(spec: ModelSpec, flag: str) -> list[str]:
    """``--flag``, unless ``args`` says it (either spelling): the config's word wins."""
    return [] if {flag, flag.replace("-", "_")} & set(spec.args) else [f"--{flag}"]
