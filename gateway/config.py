"""The gateway's YAML config: loaded once, validated whole, with errors that name the offending key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engines.spec import ModelSpec
from gateway.auth_config import AuthConfig
from gateway.media.config import MediaConfig
from gateway.settings import ServerSettings


class ConfigError(ValueError):
    """The config cannot be used; the message names every offending key."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    media: MediaConfig = Field(default_factory=MediaConfig)
    models_dir: str | None = None
    models: tuple[ModelSpec, ...] = ()

    @model_validator(mode="after")
    def _served_names_are_unique(self) -> Config:
        owner: dict[str, str] = {}
        for spec in self.models:
            for served in spec.served_names:
                if served in owner and owner[served] != spec.name:
                    raise ValueError(f"served name {served!r} is used by both {owner[served]!r} and {spec.name!r}")
                if served in owner:
                    raise ValueError(f"model {spec.name!r} lists {served!r} twice")
                owner[served] = spec.name
        return self

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)


def _location(loc: tuple[int | str, ...], raw_models: Mapping[str, Any]) -> str:
    """Pydantic's location, with a model's index turned back into its YAML key."""
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[0] == "models" and parts[1].isdigit():
        keys = list(raw_models)
        index = int(parts[1])
        if index < len(keys):
            parts[1] = keys[index]
    return ".".join(parts)


def build_config(raw: Mapping[str, Any] | None) -> Config:
    raw = dict(raw or {})
    raw_models = raw.get("models") or {}
    if not isinstance(raw_models, Mapping):
        raise ConfigError("models: must be a mapping of served name → model settings")
    models = []
    for name, body in raw_models.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"models.{name}: must be a mapping (engine, model, ...)")
        if "name" in body:
            raise ConfigError(f"models.{name}.name: the key of the entry is its name; remove 'name'")
        models.append({"name": str(name), **body})
    raw["models"] = models
    server = raw.get("server") or {}
    if not isinstance(server, Mapping):
        raise ConfigError("server: must be a mapping (host, port, timeouts, ...)")
    try:
        raw["server"] = ServerSettings(**server)
        return Config.model_validate(raw)
    except ValidationError as exc:
        prefix = "server." if exc.title == ServerSettings.__name__ else ""
        lines = []
        for err in exc.errors():
            where = prefix + _location(tuple(err["loc"]), raw_models)
            lines.append(f"{where}: {err['msg']}" if where else err["msg"])
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | os.PathLike[str] | None) -> Config:
    if path is None:
        return build_config({})
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {file}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{file}: the top level must be a mapping (server, auth, media, models)")
    return build_config(raw)
