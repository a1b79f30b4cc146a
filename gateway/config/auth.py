"""The ``auth:`` block: API keys with names, permissions and priorities."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# What an endpoint row requires (gateway/http/endpoints.py): "audio" for /v1/audio/*, "images" for image
# generation; the client dialects and the tokenizer need "chat".
Permission = Literal[
    "chat", "completions", "embeddings", "rerank", "audio", "images", "models", "admin", "metrics", "all"
]
# A request's priority (its X-Priority header, a key's ``priority``): higher is served sooner.
MIN_PRIORITY = -10
MAX_PRIORITY = 10


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    key: str | None = None
    key_env: str | None = None
    key_file: str | None = None
    permissions: tuple[Permission, ...] = ("all",)
    # The default priority of this key's requests, and the highest its X-Priority header may ask for (a
    # higher one is clamped to it): clients may lower their own priority (batch jobs), never raise it.
    priority: int = Field(0, ge=MIN_PRIORITY, le=MAX_PRIORITY)

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        if sum(x is not None for x in (self.key, self.key_env, self.key_file)) != 1:
            raise ValueError(f"api key {self.name!r}: give exactly one of key, key_env, key_file")
        return self

    def secret(self) -> str:
        """The key's value; read at start so a missing variable or file fails loudly then, not per request."""
        if self.key is not None:
            value = self.key
        elif self.key_env is not None:
            value = os.environ.get(self.key_env, "")
            if not value:
                raise ValueError(f"api key {self.name!r}: environment variable {self.key_env} is not set")
        else:
            assert self.key_file is not None
            try:
                value = Path(self.key_file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"api key {self.name!r}: cannot read {self.key_file}: {exc.strerror}") from None
        if len(value) < 8:
            raise ValueError(f"api key {self.name!r}: too short (at least 8 characters)")
        return value


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: tuple[ApiKey, ...] = ()
    # Prometheus scrapers rarely carry keys; an operator may require one by setting this false.
    metrics_public: bool = True
