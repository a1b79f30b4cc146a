"""The ``server:`` block of the config; every scalar in it can also be set by environment (``GATEWAY_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # uvicorn's access log costs ~10 % of throughput (docs/PERFORMANCE.md); the gateway logs errors itself.
    access_log: bool = False

    # The four clocks of an upstream call. First byte is long: a big prompt's prefill can take minutes.
    connect_timeout: float = Field(5.0, gt=0)
    first_byte_timeout: float = Field(300.0, gt=0)
    idle_timeout: float = Field(60.0, gt=0)  # between two chunks of a stream
    total_timeout: float = Field(1800.0, gt=0)

    # Client side: a body larger than this is refused before parsing; a body that trickles is cut off.
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    body_timeout: float = Field(30.0, gt=0)
    # From a request's first byte to the end of its headers (uvicorn itself has no such deadline).
    header_timeout: float = Field(10.0, gt=0)
    # How long a request may wait for a model that is starting (on-demand load) before a 503.
    queue_timeout: float = Field(30.0, ge=0)
    retry_after: float = Field(5.0, gt=0)
    # On SIGTERM: how long in-flight requests may finish before the engines are stopped.
    drain_timeout: float = Field(30.0, ge=0)
    # Requests to engines on plain HTTP go over raw keep-alive connections, a stream's body relayed in protocol
    # callbacks (proxy/upstream/raw.py); false: through aiohttp, like https:// remotes (the slower path, kept for
    # comparison and as an escape hatch).
    raw_connections: bool = True
    # Processes answering clients on the port (gateway/workers). 1: the one process does everything. N > 1: the
    # process started stays the engines' only owner and N workers share the port, each ~35,000 streamed
    # events/s on its own core; size it as min(cores - 1, expected events/s / 30,000 + 1).
    workers: int = Field(1, ge=1, le=64)
    # The owner pings each worker this often; one silent for worker_ping_timeout (stopped, its loop blocked)
    # is killed and replaced, its leases given back.
    worker_ping_interval: float = Field(5.0, gt=0)
    worker_ping_timeout: float = Field(20.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file: a container overrides a baked-in config without editing it.
        return (env_settings, init_settings)
