"""A remote OpenAI-compatible server, given by ``url``: probed for health, never launched.

What it serves cannot be known from here. It is taken to serve the paths every OpenAI-compatible server
has (chat, completions) and those a client would only send it on purpose (embeddings, rerank, audio,
images: a path it lacks is its own 404, relayed). Responses and Messages are translated to chat: most
OpenAI-compatible servers lack both, and translation works on every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.adapters.base import EngineAdapter
from engines.spec import ModelSpec


@dataclass(frozen=True)
class RemoteOpenAIAdapter(EngineAdapter):
    kind = "openai"
    spawns = False
    capabilities = frozenset({"chat", "completions", "embeddings", "rerank", "transcription", "speech", "images"})
    default_startup_timeout = float("inf")  # a remote server is waited for, never given up on

    def base_url(self, spec: ModelSpec, host: str, port: int) -> str:
        assert spec.url is not None
        url = spec.url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    def health_url(self, spec: ModelSpec, host: str, port: int) -> str:
        return self.base_url(spec, host, port) + "/v1/models"

    def request_model(self, spec: ModelSpec) -> str:
        # The remote's own name for the model may differ from ours: `model:` says it when set.
        return spec.model or spec.name

    def response_model(self, spec: ModelSpec) -> str | None:
        return spec.model if spec.model and spec.model != spec.name else None
