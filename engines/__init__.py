"""The process side: engine descriptions, processes, supervisors and the pool. Knows nothing of HTTP serving."""

from engines.logs import LogRing
from engines.pool import EnginePool, ModelEntry
from engines.snapshot import ReplicaSnapshot
from engines.state import EngineState, StateChanged
from engines.supervisor import Supervisor

__all__ = ["EnginePool", "EngineState", "LogRing", "ModelEntry", "ReplicaSnapshot", "StateChanged", "Supervisor"]
