"""The process side: engine descriptions, processes, supervisors and the pool. Knows nothing of HTTP serving.

Packages::

    adapters    one small description per engine kind (command line, health, dialect, endpoints)
    process     one launch as OS processes: reaper, /proc, ports, output
    replica     one replica's lifecycle, owned by its supervisor task
    scheduling  the pool and its scheduler: which models run, which replica answers
    discovery   model folders found under models_dir, served without a config entry

``spec`` (top level): what the config says about one served model.
"""

from engines.process.log_ring import LogRing
from engines.replica.snapshot import ReplicaSnapshot
from engines.replica.state import EngineState, StateChanged
from engines.replica.supervisor import Supervisor
from engines.scheduling.pool import EnginePool, ModelEntry

__all__ = ["EnginePool", "EngineState", "LogRing", "ModelEntry", "ReplicaSnapshot", "StateChanged", "Supervisor"]
