"""How an engine is put to sleep and woken over HTTP, and how much host RAM it holds asleep.

A swap that takes a model's GPUs may put its engine to sleep instead of stopping it (``sleep:`` in the
model's config): the process, its compiled graphs and (level 1) its weights in host RAM stay, its GPU memory
is given back, and a wake takes seconds where a cold start takes minutes. Each engine has its own calls for
it; an adapter describes them as a ``SleepApi`` (``EngineAdapter.sleep_api``) and the supervisor makes them
(engines/replica/supervisor.py). Nothing here does I/O but ``sleep_ram_gb``, which reads safetensors headers.

Why a wake is a list of calls: at level 2 an engine discards its weights, and the ones here do not reload
them by themselves (vLLM wants ``reload_weights`` between waking the weights and the KV cache; SGLang wants
``/update_weights_from_disk`` after ``/resume_memory_occupation``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engines.spec import ModelSpec

GiB = 1024**3


@dataclass(frozen=True)
class HttpCall:
    """One request to the engine: ``path`` with its query; ``body`` is sent as JSON (``{}`` when none is needed:
    LMDeploy refuses its management routes without ``Content-Type: application/json``)."""

    method: Literal["GET", "POST"]
    path: str
    body: str = "{}"


@dataclass(frozen=True)
class SleepApi:
    """How one engine kind sleeps and wakes, for one spec.

    ``sleep``: the call that puts it to sleep (it answers once asleep). ``wake``: the calls, in order, that
    wake it; each must answer 2xx. ``is_sleeping``: a GET path whose JSON says whether it sleeps (None: the
    engine has none, and a 2xx from ``sleep``/``wake`` is all the word there is). ``field``: the key of that
    JSON object that holds the boolean."""

    level: int
    sleep: HttpCall
    wake: tuple[HttpCall, ...]
    is_sleeping: str | None = None
    field: str = "is_sleeping"

    def asleep(self, body: bytes) -> bool | None:
        """What an ``is_sleeping`` answer says: True or False, or None when it says neither (not JSON, no
        such key, not a boolean)."""
        try:
            data = json.loads(body)
        except ValueError:
            return None
        value = data.get(self.field) if isinstance(data, dict) else None
        return value if isinstance(value, bool) else None


def sleep_ram_gb(spec: ModelSpec) -> float:
    """The host RAM (GiB, as the budget counts it) an engine of ``spec`` holds while asleep, for the
    scheduler's ``swap.sleep_ram_gb`` budget: ``sleep.ram_gb`` when the config gives it; else at level 1
    (weights offloaded to host RAM) the weights' size on disk when ``model`` is a local folder whose weights
    can be read, 0 when unknown (a hub id, no readable weights); at level 2 (weights discarded) 0. 0 when the
    spec has no ``sleep:``."""
    sleep = spec.sleep
    if sleep is None:
        return 0.0
    if sleep.ram_gb is not None:
        return sleep.ram_gb
    if sleep.level != 1 or not spec.model:
        return 0.0
    # Imported here: the discovery package is not needed by anything else an adapter does.
    from engines.discovery.classify import Unsupported
    from engines.discovery.weights import read_weights

    folder = Path(spec.model)
    if not folder.is_dir():
        return 0.0
    try:
        return read_weights(folder).bytes / GiB
    except (Unsupported, OSError):
        return 0.0
