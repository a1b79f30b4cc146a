"""The gateway's YAML config: loaded once, validated whole, with errors that name the offending key."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from engines.discovery import DiscoveryPolicy, DiscoveryResult, GpuSlot, discover
from engines.scheduling.placement import GroupSpec, Placement, SwapPolicy, check_placement
from engines.spec import ModelSpec
from gateway.config.auth import AuthConfig
from gateway.config.passthrough import Passthrough
from gateway.config.server import ServerSettings
from gateway.http.endpoints import endpoint_table
from gateway.media.settings import MediaConfig
from gateway.observability.gpu_probe import GpuInfo, GpuProbe

log = logging.getLogger("gateway.discovery")

# Wins over ``models_dir:`` in the file, like the server block's variables: a container points the
# gateway at its mounted models without editing a baked-in config.
MODELS_DIR_ENV = "GATEWAY_MODELS_DIR"


class ConfigError(ValueError):
    """The config cannot be used; the message names every offending key."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    media: MediaConfig = Field(default_factory=MediaConfig)
    models_dir: str | None = None
    discovery: DiscoveryPolicy = Field(default_factory=DiscoveryPolicy)
    models: tuple[ModelSpec, ...] = ()  # explicit entries first, then the ones found in models_dir
    # Which models may share GPUs and how many run at once (engines/scheduling/placement.py).
    groups: dict[str, GroupSpec] = Field(default_factory=dict)
    max_loaded: int = Field(0, ge=0)
    swap: SwapPolicy = SwapPolicy()  # when a model gives its GPUs to another's requests, and sleeping models' RAM
    # More POST paths the engines serve (gateway/config/passthrough.py): rows of the endpoint table.
    passthrough: Passthrough = Field(default_factory=dict)
    _discovered: DiscoveryResult | None = PrivateAttr(default=None)

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

    @model_validator(mode="after")
    def _passthrough_is_free(self) -> Config:
        endpoint_table(self.passthrough)  # a configured path the gateway answers itself: a ValueError
        return self

    @model_validator(mode="after")
    def _placement_is_possible(self) -> Config:
        check_placement(self.models, self.placement)
        return self

    @property
    def placement(self) -> Placement:
        return Placement(groups=self.groups, max_loaded=self.max_loaded, swap=self.swap)

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def discovered(self) -> DiscoveryResult | None:
        """What the scan of ``models_dir`` found and skipped; None when there is no models_dir."""
        return self._discovered


def _location(loc: tuple[int | str, ...], raw_models: Mapping[str, Any]) -> str:
    """Pydantic's location, with a model's index turned back into its YAML key."""
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[0] == "models" and parts[1].isdigit():
        keys = list(raw_models)
        index = int(parts[1])
        if index < len(keys):
            parts[1] = keys[index]
    return ".".join(parts)


def build_config(
    raw: Mapping[str, Any] | None, *, gpus: Sequence[GpuSlot] | None = None, previous: Config | None = None
) -> Config:
    """Validate ``raw`` and add the models found in ``models_dir``.

    ``gpus`` is the GPU inventory for placing discovered models (None: read NVML, only when there is a
    models_dir). ``previous`` is the config being replaced on a reload: discovered models keep its GPUs.
    """
    config = _validate(raw)
    models_dir = os.environ.get(MODELS_DIR_ENV) or config.models_dir
    if not models_dir:
        return config
    inventory = gpus if gpus is not None else read_gpus(config.discovery)
    kept = {m.name: m.gpus for m in previous.models if m.source == "discovered"} if previous else {}
    result = discover(models_dir, config.discovery, gpus=inventory, explicit=config.models, previous=kept)
    _log(result)
    # Validated again as a whole (not model_copy), so every config-wide rule also holds for found models.
    fields = {name: getattr(config, name) for name in Config.model_fields}
    try:
        config = Config.model_validate({**fields, "models_dir": models_dir, "models": (*config.models, *result.specs)})
    except ValidationError as exc:
        raise ConfigError(
            f"models_dir {models_dir}: the models found there clash with the config: "
            + "; ".join(e["msg"] for e in exc.errors())
        ) from None
    config._discovered = result
    return config


def read_gpus(policy: DiscoveryPolicy) -> list[GpuSlot]:
    """NVML's GPUs as plain data for placement; none (a CPU-only host) when NVML is absent."""
    if not policy.needs_nvml:
        return []
    probe = GpuProbe(ttl=0)
    try:
        return gpu_slots(probe.read().devices)
    finally:
        probe.close()


def gpu_slots(devices: Iterable[GpuInfo]) -> list[GpuSlot]:
    """NVML readings as the plain data engines/discovery takes."""
    return [GpuSlot(d.index, d.memory_total, d.name) for d in devices]


def _log(result: DiscoveryResult) -> None:
    for skipped in result.skipped:
        log.warning("models_dir %s: skipped %s: %s", result.models_dir, skipped.folder, skipped.reason)
    for over in result.overridden:
        log.info("models_dir %s: %s is %s", result.models_dir, over.folder, over.reason)
    for note in result.notes:
        log.info("models_dir %s: %s", result.models_dir, note)
    for p in result.plan:
        gpus = ",".join(map(str, p.gpus)) or "cpu"
        log.info(
            "models_dir %s: serving %s as %r (%s, %s, GPUs %s%s)",
            result.models_dir,
            p.folder,
            p.name,
            p.kind,
            p.engine,
            gpus,
            f", cpu offload {p.offload_gib} GiB per GPU" if p.offload_gib else "",
        )


def _validate(raw: Mapping[str, Any] | None) -> Config:
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
        if "source" in body:
            raise ConfigError(f"models.{name}.source: only discovery sets it; remove 'source'")
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


def load_config(
    path: str | os.PathLike[str] | None, *, gpus: Sequence[GpuSlot] | None = None, previous: Config | None = None
) -> Config:
    """The config file, validated, with ``models_dir`` scanned (see ``build_config``)."""
    if path is None:
        return build_config({}, gpus=gpus, previous=previous)
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
    return build_config(raw, gpus=gpus, previous=previous)
