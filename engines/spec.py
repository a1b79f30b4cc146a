"""What the config says about one served model: the frozen description every other piece reads."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EngineKind = Literal["vllm", "lmdeploy", "lightllm", "sglang", "transformers", "openai"]
ENGINE_KINDS: tuple[str, ...] = ("vllm", "lmdeploy", "lightllm", "sglang", "transformers", "openai")
# What a model does, as read from its own files (engines/discovery): it decides the engine and its flags.
ModelKind = Literal["chat", "vision", "embedding", "rerank"]
MODEL_KINDS: tuple[str, ...] = ("chat", "vision", "embedding", "rerank")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthPolicy(_Frozen):
    """How a running engine is probed. Thresholds give hysteresis, so one slow probe changes nothing."""

    interval: float = Field(5.0, gt=0)
    timeout: float = Field(3.0, gt=0)
    unhealthy_threshold: int = Field(3, ge=1)  # failed probes in a row before a READY engine leaves rotation
    healthy_threshold: int = Field(1, ge=1)  # passing probes in a row before it is READY (again)
    startup_interval: float = Field(0.5, gt=0)  # probe period while loading
    # How long an engine may stay UNHEALTHY (out of rotation, its requests in flight left to finish) before it
    # is restarted: a busy engine whose probes time out for a while is not killed mid-answer. 0: at once.
    restart_grace: float = Field(30.0, ge=0)


class RestartPolicy(_Frozen):
    """Backoff between restarts, in stamina's terms; too many crashes in a window means FAILED."""

    initial_delay: float = Field(1.0, ge=0)
    max_delay: float = Field(60.0, ge=0)
    jitter: float = Field(1.0, ge=0)
    exp_base: float = Field(2.0, ge=1)
    max_restarts: int = Field(5, ge=0)  # crashes allowed within `window` before FAILED
    window: float = Field(600.0, gt=0)
    stable_after: float = Field(120.0, ge=0)  # this long READY resets the backoff


class OutlierPolicy(_Frozen):
    """Passive health on real traffic, Envoy's outlier detection: ``consecutive_failures`` in a row (connect
    errors, 5xx, broken streams, timeouts) take a replica out of rotation for ``base_ejection_time`` times the
    times it was ejected, at most ``max_ejection_time``; at most ``max_ejection_percent`` of a model's
    replicas are out at once, and never its last healthy one."""

    consecutive_failures: int = Field(5, ge=1)
    base_ejection_time: float = Field(10.0, gt=0)
    max_ejection_time: float = Field(300.0, gt=0)
    max_ejection_percent: float = Field(50.0, ge=0, le=100)
    # This many failed requests in a row and a launched engine is restarted, though its health check passes
    # (an engine whose /health says 200 while every answer is a 500 or never comes). Counted as a crash, so
    # one that stays broken ends FAILED. 0: never.
    restart_after: int = Field(10, ge=0)


class SleepSpec(_Frozen):
    """Put to sleep instead of stopped when a swap takes its GPUs (engines that can: vLLM, SGLang, LMDeploy).

    A sleeping engine keeps its process, its compiled graphs and (level 1) its weights in host RAM, and
    gives its GPU memory back; waking it takes seconds where a cold start takes minutes. Level 2 discards
    the weights too (reloaded from disk on wake: less host RAM, a slower wake). ``ram_gb``: the host RAM it
    holds asleep, counted against the ``swap.sleep_ram_gb`` budget (None: estimated from its weights on
    disk at level 1, 0 at level 2)."""

    level: int = Field(1, ge=1, le=2)
    ram_gb: float | None = Field(None, ge=0)


class ModelSpec(_Frozen):
    """One entry of ``models:``. ``name`` is the key clients send as ``model``."""

    name: str
    engine: EngineKind
    model: str | None = None
    url: str | None = None  # engine "openai": the remote server's base URL (…/v1)
    api_key_env: str | None = None  # engine "openai": the variable that holds the remote key
    aliases: tuple[str, ...] = ()
    display_name: str | None = None
    # Flat: every GPU of the model, split evenly across its replicas. Written as one list per replica
    # (``[[0, 1], [2, 3]]``) it is flattened here and the split kept in ``replica_gpus``.
    gpus: tuple[int, ...] = ()
    replicas: int = Field(1, ge=1)
    replica_gpus: tuple[tuple[int, ...], ...] = ()  # derived from gpus and replicas (one tuple per replica)
    command: tuple[str, ...] | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)
    load: Literal["eager", "on_demand"] = "eager"
    idle_timeout: float = Field(0, ge=0)  # on_demand models: stopped after this long unused (0: never)
    sleep: SleepSpec | None = None  # a swap puts it to sleep rather than stopping it (None: stopped)
    # Requests wait in a FIFO queue while the model starts, swaps in, or is at max_concurrency: at most
    # max_queue of them (then 429), each at most queue_timeout (then 503; None: server.queue_timeout).
    max_queue: int = Field(64, ge=0)
    queue_timeout: float | None = Field(None, ge=0)
    max_concurrency: int = Field(0, ge=0)  # requests in flight per replica (0: no limit)
    # Several replicas: a conversation goes to the replica that holds its prefix in cache (X-Session-ID, the
    # body's user, else the prompt's start; bounded load). False: always the least busy replica.
    affinity: bool = True
    outlier: OutlierPolicy = OutlierPolicy()
    startup_timeout: float | None = Field(None, gt=0)  # None: the engine kind's default
    stop_grace: float = Field(20.0, ge=0)
    tensor_parallel: int | None = Field(None, ge=1)
    health: HealthPolicy = HealthPolicy()
    restart: RestartPolicy = RestartPolicy()
    kind: ModelKind | None = None  # None: not said (explicit entries); discovered ones always say
    source: Literal["config", "discovered"] = "config"  # discovered: made from a models_dir folder

    @field_validator("name", "aliases")
    @classmethod
    def _names_are_sane(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for name in (value,) if isinstance(value, str) else value:
            if not name or len(name) > 256 or any(c.isspace() or ord(c) < 32 for c in name):
                raise ValueError(f"invalid model name {name!r}: 1-256 characters, no whitespace")
        return value

    @model_validator(mode="before")
    @classmethod
    def _split_gpus(cls, data: Any) -> Any:
        """``gpus`` as one list per replica → flat ``gpus`` + ``replica_gpus`` (+ ``replicas`` if unsaid)."""
        if not isinstance(data, dict):
            return data
        gpus = data.get("gpus")
        if isinstance(gpus, list | tuple) and gpus and all(isinstance(g, list | tuple) for g in gpus):
            data = {**data, "gpus": [g for group in gpus for g in group], "replica_gpus": gpus}
            data.setdefault("replicas", len(gpus))
        return data

    @model_validator(mode="after")
    def _replicas_fit(self) -> ModelSpec:
        if self.replicas > 1 and self.engine == "openai":
            raise ValueError("engine 'openai' is one remote server: 'replicas' must be 1")
        if self.replica_gpus:
            if len(self.replica_gpus) != self.replicas:
                raise ValueError(f"'gpus' has {len(self.replica_gpus)} lists but 'replicas' is {self.replicas}")
            if tuple(g for group in self.replica_gpus for g in group) != self.gpus:
                raise ValueError("'replica_gpus' must list exactly the GPUs of 'gpus', in order")
        elif self.gpus and len(self.gpus) % self.replicas:
            raise ValueError(
                f"{len(self.gpus)} GPUs cannot be split evenly across {self.replicas} replicas; "
                "give one list per replica (gpus: [[0, 1], [2]])"
            )
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError("a GPU is listed twice: two replicas of one model never share a GPU")
        if not self.replica_gpus:
            size = len(self.gpus) // self.replicas
            object.__setattr__(
                self, "replica_gpus", tuple(self.gpus[i * size : (i + 1) * size] for i in range(self.replicas))
            )
        return self

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

    def engine_key(self) -> str | None:
        """The key the engine wants in ``Authorization: Bearer``: from ``api_key_env``, else the engine's own
        ``--api-key`` (vLLM, SGLang) / ``--api-keys`` (LMDeploy) in ``args``, else ``VLLM_API_KEY`` in ``env``.
        Without it, an engine started with a key would answer every forwarded request with its 401."""
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        for flag in ("api-key", "api_key", "api-keys", "api_keys"):
            value = self.args.get(flag)
            if isinstance(value, list | tuple):
                value = value[0] if value else None
            if value:
                return str(value)
        return self.env.get("VLLM_API_KEY") if self.engine == "vllm" else None

    @property
    def tp_size(self) -> int:
        return self.tensor_parallel or max(1, len(self.gpus) // self.replicas)

    def for_replica(self, index: int) -> ModelSpec:
        """The spec one replica's supervisor runs: its own GPUs, port ``port + index``, and ``{replica}`` in
        ``env`` values replaced by the index (a log or record file per replica)."""
        env = {k: v.replace("{replica}", str(index)) for k, v in self.env.items()}
        if self.replicas == 1 and env == self.env:
            return self
        gpus = self.replica_gpus[index]
        return self.model_copy(
            update={
                "gpus": gpus,
                "replica_gpus": (gpus,),
                "replicas": 1,
                "env": env,
                "port": None if self.port is None else self.port + index,
            }
        )
