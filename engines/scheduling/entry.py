"""One served model as the pool keeps it: its spec, its engine's description, and its replicas' supervisors."""

from __future__ import annotations

from dataclasses import dataclass, field

from engines.adapters.base import EngineAdapter
from engines.replica.supervisor import Supervisor
from engines.spec import ModelSpec


@dataclass
class ModelEntry:
    spec: ModelSpec
    adapter: EngineAdapter
    replicas: list[Supervisor] = field(default_factory=list)
    request_model: str = ""  # the ``model`` value the engine expects in a request body
    key: int = -1  # the scheduler's handle: a reload that changes a model gives the new version a new key
    # Whether /ready waits for it: the eager models the gateway started with. One a reload added or changed
    # loads while the gateway keeps serving, rather than taking it out of rotation for minutes.
    gates_ready: bool = True

    @property
    def name(self) -> str:
        return self.spec.name
