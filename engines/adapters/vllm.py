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

Sleep (``sleep:`` in the config): the dev-mode routes ``POST /sleep?level=N``, ``POST /wake_up`` and
``GET /is_sleeping`` (``entrypoints/serve/dev/sleep/api_router.py``), with ``--enable-sleep-mode`` on GPUs.
While asleep its ``/health`` says 200 and new requests are taken and held until the wake.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, render_flags
from engines.adapters.sleep import HttpCall, SleepApi
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
        if spec.sleep is not None and spec.gpus and not {"enable-sleep-mode", "enable_sleep_mode"} & set(spec.args):
            # Only with GPUs: without the flag a CUDA vLLM still answers /sleep 200 but frees nothing (its cumem
            # allocator holds no allocation: "Sleep mode freed 0.00 GiB"), and the CPU build refuses the flag at
            # start ("Sleep mode is not supported on current platform.", config/model.py) while its /sleep still
            # works there: it pauses the scheduler, and cpu_worker.sleep is a no-op that frees nothing
            # (docs/real-vllm/transcripts/sleep-mode.md). An explicit enable-sleep-mode in args wins.
            argv.append("--enable-sleep-mode")
        return argv + render_flags(spec.args, negate_false=True)

    def env(self, spec: ModelSpec) -> dict[str, str]:
        # The gateway fetches media itself; the engine must never reach the network on a client's behalf.
        env = {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"}
        if spec.sleep is not None:
            # /sleep, /wake_up and /is_sleeping exist only in dev mode (entrypoints/serve/dev/sleep), which also
            # opens /collective_rpc, /reset_prefix_cache and /server_info on the engine's port: that port is the
            # gateway's alone (host 127.0.0.1 by default), and the gateway relays none of those paths unless a
            # passthrough: entry names them.
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return {**env, **super().env(spec)}

    def sleep_api(self, spec: ModelSpec) -> SleepApi | None:
        if spec.sleep is None:
            return None
        level = spec.sleep.level
        # mode=abort, vLLM's default, said explicitly so that a new default cannot change what a sleep does. The
        # scheduler asks only once its leases are released, so anything still in the engine is a request whose
        # client left (its abort under way) or one that did not come through the gateway: a stop would end those
        # too. "wait" would hold the sleep for as long as the longest of them (past our timeout: a stop anyway),
        # and "keep" would hold them across a sleep that discards their KV cache. A vLLM without pause modes
        # ignores the unknown query parameter.
        sleep = HttpCall("POST", f"/sleep?level={level}&mode=abort")
        if level == 1:
            wake: tuple[HttpCall, ...] = (HttpCall("POST", "/wake_up"),)
        else:
            # Level 2 discards the weights: wake them, reload them from the model's files, then wake the KV
            # cache (vLLM's sleep-mode docs; the scheduler resumes only once everything is awake again).
            wake = (
                HttpCall("POST", "/wake_up?tags=weights"),
                HttpCall("POST", "/collective_rpc", json.dumps({"method": "reload_weights"})),
                HttpCall("POST", "/wake_up?tags=kv_cache"),
            )
        return SleepApi(level, sleep, wake, is_sleeping="/is_sleeping")
