"""LMDeploy 0.18: ``lmdeploy serve api_server MODEL``; one served name, which requests must use exactly."""

from __future__ import annotations

from dataclasses import dataclass

from engines.adapters.base import EngineAdapter, render_flags
from engines.spec import ModelSpec


@dataclass(frozen=True)
class LMDeployAdapter(EngineAdapter):
    kind = "lmdeploy"
    default_startup_timeout = 1800.0
    dialect = "lmdeploy"
    capabilities = EngineAdapter.capabilities | {"responses", "messages"}  # both since 0.13/0.14

    def argv(self, spec: ModelSpec, host: str, port: int) -> list[str]:
        assert spec.model is not None
        argv = [
            *self.executable(spec, ["lmdeploy"]),
            "serve",
            "api_server",
            spec.model,
            "--server-name",
            host,
            "--server-port",
            str(port),
            "--model-name",
            spec.name,
        ]
        if spec.tp_size > 1:
            argv += ["--tp", str(spec.tp_size)]
        return argv + render_flags(spec.args)

    def is_ready(self, status: int, body: bytes) -> bool:
        # ≥0.14 answers 200 for healthy/sleeping and 503 while initializing; older ones an empty 200.
        return status == 200
