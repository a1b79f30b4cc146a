"""What the config says about one served model: the frozen description every other piece reads."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EngineKind = Literal["vllm", "lmdeploy", "lightllm", "sglang", "transformers", "openai"]
ENGINE_KINDS: tuple[str, ...] = ("vllm", "lmdeploy", "lightllm", "sglang", "transformers", "openai")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthPolicy(_Frozen):
    """How a running engine is probed. Thresholds give hysteresis, so one slow probe changes nothing."""

    interval: float = Field(5.0, gt=0)
    timeout: float = Field(3.0, gt=0)
    unhealthy_threshold: int = Field(3, ge=1)  # failed probes in a row before a READY engine is restarted
    healthy_threshold: int = Field(1, ge=1)  # passing probes in a row before it is READY
    startup_interval: float = Field(0.5, gt=0)  # probe period while loading


class RestartPolicy(_Frozen):
    """Backoff between restarts, in stamina's terms; too many crashes in a window means FAILED."""

    initial_delay: float = Field(1.0, ge=0)
    max_delay: float = Field(60.0, ge=0)
    jitter: float = Field(1.0, ge=0)
    exp_base: float = Field(2.0, ge=1)
    max_restarts: int = Field(5, ge=0)  # crashes allowed within `window` before FAILED
    window: float = Field(600.0, gt=0)
    stable_after: float = Field(120.0, ge=0)  # this long READY resets the backoff


class ModelSpec(_Frozen):
    """One entry of ``models:``. ``name`` is the key clients send as ``model``."""

    name: str
    engine: EngineKind
    model: str | None = None
    url: str | None = None  # engine "openai": the remote server's base URL (…/v1)
    api_key_env: str | None = None  # engine "openai": the variable that holds the remote key
    aliases: tuple[str, ...] = ()
    display_name: str | None = None
    gpus: tuple[int, ...] = ()
    command: tuple[str, ...] | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)
    load: Literal["eager", "on_demand"] = "eager"
    idle_timeout: float = Field(0, ge=0)
    startup_timeout: float | None = Field(None, gt=0)  # None: the engine kind's default
    stop_grace: float = Field(20.0, ge=0)
    tensor_parallel: int | None = Field(None, ge=1)
    health: HealthPolicy = HealthPolicy()
    restart: RestartPolicy = RestartPolicy()

    @field_validator("name", "aliases")
    @classmethod
    def _names_are_sane(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for name in (value,) if isinstance(value, str) else value:
            if not name or len(name) > 256 or any(c.isspace() or ord(c) < 32 for c in name):
                raise ValueError(f"invalid model name {name!r}: 1-256 characters, no whitespace")
        return value

    @model_validator(mode="after")
    def _engine_needs(self) -> ModelSpec:
        if self.engine == "openai":
            if not self.url:
                raise ValueError("engine 'openai' needs 'url' (the remote server's base URL, e.g. http://host:8000/v1)")
        elif not self.model:
            raise ValueError(f"engine {self.engine!r} needs 'model' (a model path or hub id)")
        return self

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def tp_size(self) -> int:
        return self.tensor_parallel or max(1, len(self.gpus))
