"""What the gateway must know about one kind of engine, as a small description.

An adapter builds the command line and environment, says where health is read and what counts as
ready, names the model the engine expects in requests, and the message dialect it accepts. It holds
no state and runs nothing: supervisors and the request path read it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from engines.adapters.sleep import SleepApi
from engines.spec import ModelSpec

# How an engine wants multimodal parts (gateway/media reshapes messages accordingly).
Dialect = Literal["openai", "lmdeploy", "lightllm", "transformers"]

# What an engine can be asked for, by name: the gateway's endpoint table (gateway/http/endpoints.py) maps
# each of its paths to one capability and to the path it is posted to, the same on every engine kind.
# "responses" (OpenAI Responses) and "messages" (Anthropic Messages) are client dialects: an engine without
# them but with "chat" answers them by translation (gateway/dialects). The others are served natively or not
# at all: "count_tokens" (/v1/messages/count_tokens), "tokenize" (/tokenize and /detokenize), "transcription"
# (/v1/audio/transcriptions and /translations), "speech" (/v1/audio/speech), "score", "classify", "pooling",
# "images" (/v1/images/generations).
Capability = Literal[
    "chat",
    "completions",
    "embeddings",
    "rerank",
    "generate",
    "responses",
    "messages",
    "count_tokens",
    "tokenize",
    "transcription",
    "speech",
    "score",
    "classify",
    "pooling",
    "images",
]
# How a complete stream ends: see gateway.proxy.relay.Target.stream_end.
StreamEnd = Literal["done", "finish", "eof"]


def render_flags(args: dict[str, Any], *, negate_false: bool = False) -> list[str]:
    """Config ``args`` as flags: ``True`` is a bare flag, lists are nargs, dicts are JSON, ``None`` is left out."""
    out: list[str] = []
    for key, value in args.items():
        flag = key if key.startswith("-") else f"--{key}"
        if value is None:
            continue
        if value is True:
            out.append(flag)
        elif value is False:
            if negate_false:
                out.append(f"--no-{flag.lstrip('-')}")
        elif isinstance(value, list | tuple):
            out.append(flag)
            out.extend(str(v) for v in value)
        elif isinstance(value, dict):
            out += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            out += [flag, str(value)]
    return out


@dataclass(frozen=True)
class EngineAdapter:
    kind: ClassVar[str]
    default_startup_timeout: ClassVar[float] = 900.0
    health_path: ClassVar[str] = "/health"
    dialect: ClassVar[Dialect] = "openai"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({"chat", "completions", "embeddings", "rerank"})
    spawns: ClassVar[bool] = True  # False for remote engines: probed, never launched
    stream_end: ClassVar[StreamEnd] = "done"

    def executable(self, spec: ModelSpec, default: list[str]) -> list[str]:
        return list(spec.command) if spec.command else default

    def argv(self, spec: ModelSpec, host: str, port: int) -> list[str]:
        raise NotImplementedError

    def env(self, spec: ModelSpec) -> dict[str, str]:
        env = dict(spec.env)
        if spec.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in spec.gpus)
        return env

    def base_url(self, spec: ModelSpec, host: str, port: int) -> str:
        """Where the OpenAI paths live, without the ``/v1``."""
        return f"http://{host}:{port}"

    def health_url(self, spec: ModelSpec, host: str, port: int) -> str:
        return self.base_url(spec, host, port) + self.health_path

    def request_model(self, spec: ModelSpec) -> str:
        """The ``model`` value the engine expects in a request body."""
        return spec.name

    def response_model(self, spec: ModelSpec) -> str | None:
        """The ``model`` the engine writes in its answers when that is not the client's name (else None)."""
        return None

    def is_ready(self, status: int, body: bytes) -> bool:
        return status == 200

    def startup_timeout(self, spec: ModelSpec) -> float:
        return spec.startup_timeout or self.default_startup_timeout

    def sleep_api(self, spec: ModelSpec) -> SleepApi | None:
        """How this engine sleeps and wakes for ``spec`` (engines/adapters/sleep.py); None when it cannot, or
        when the spec has no ``sleep:`` (a swap then stops it)."""
        return None

    def no_sleep_reason(self, spec: ModelSpec) -> str:
        """Why ``sleep_api(spec)`` is None, in words fit for an operator."""
        if spec.sleep is None:
            return f"the model '{spec.name}' has no 'sleep:' in its config"
        return f"engine '{self.kind}' has no sleep API"


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]
