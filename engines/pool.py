"""All served models: one entry per configured model, one supervisor task per replica, one probe session.

The pool owns the supervisors' tasks and the aiohttp session their probes share. Lookups by name or
alias are one dict read. Everything it says about state is a snapshot for advisory choices; commands go
to the supervisors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from engines.adapters import adapter_for
from engines.adapters.base import EngineAdapter
from engines.process import sweep_leftovers
from engines.spec import ModelSpec
from engines.state import EngineState, StateChanged
from engines.supervisor import Supervisor

_log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    spec: ModelSpec
    adapter: EngineAdapter
    replicas: list[Supervisor] = field(default_factory=list)
    request_model: str = ""  # the ``model`` value the engine expects in a request body

    @property
    def name(self) -> str:
        return self.spec.name


class EnginePool:
    def __init__(self, specs: Sequence[ModelSpec], *, on_event: Callable[[StateChanged], None] | None = None,
                 probe_connections: int = 100, sweep: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self._on_event = on_event
        self._probe_connections = probe_connections
        self._sweep = sweep
        self._clock = clock
        self._sleep = sleep
        self._entries: dict[str, ModelEntry] = {}
        self._by_name: dict[str, ModelEntry] = {}
        for spec in specs:
            adapter = adapter_for(spec.engine)
            entry = ModelEntry(spec, adapter, request_model=adapter.request_model(spec))
            for name in spec.served_names:
                if name in self._by_name:
                    raise ValueError(f"model name {name!r} is used twice (by {self._by_name[name].name!r} "
                                     f"and {spec.name!r})")
                self._by_name[name] = entry
            self._entries[spec.name] = entry
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopped = False

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Sweep leftovers of a dead gateway, start every supervisor, launch the eager models (without
        waiting for them to be ready: ``wait_ready`` is for that)."""
        if self._started:
            return
        self._started = True
        if self._sweep:
            await asyncio.to_thread(sweep_leftovers)
        # force_close: an engine restarts on a new port, and a kept-alive connection to a dead one only
        # turns into a confusing probe failure. trust_env stays off: probes never go through a proxy.
        connector = aiohttp.TCPConnector(limit=self._probe_connections, force_close=True)
        self._session = aiohttp.ClientSession(connector=connector)
        for entry in self._entries.values():
            entry.replicas = [Supervisor(entry.spec, entry.adapter, replica=0, session=self._session,
                                         on_event=self._on_event, clock=self._clock, sleep=self._sleep)]
            for sup in entry.replicas:
                task = asyncio.create_task(sup.run(), name=f"supervise {entry.name}/{sup.replica}")
                task.add_done_callback(self._supervisor_ended)
                self._tasks.append(task)
        eager = [sup.start() for entry in self._entries.values() if entry.spec.load == "eager"
                 for sup in entry.replicas]
        await asyncio.gather(*eager)

    async def stop(self) -> None:
        """Stop every replica in parallel (each: SIGTERM → its stop_grace → SIGKILL), then end the tasks and
        close the probe session. Safe to call twice, and after a failed start."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        sups = [sup for entry in self._entries.values() for sup in entry.replicas]
        results = await asyncio.gather(*(sup.stop() for sup in sups), return_exceptions=True)
        for sup, result in zip(sups, results, strict=True):
            if isinstance(result, BaseException):
                _log.error("stopping %s/%d failed: %r", sup.model, sup.replica, result)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _supervisor_ended(task: asyncio.Task[None]) -> None:
        # A supervisor ends only when cancelled by stop(); anything else is a bug worth shouting about
        # (its engine was ended on the way out, and the replica stays STOPPED).
        if not task.cancelled() and task.exception() is not None:
            _log.error("%s ended unexpectedly", task.get_name(), exc_info=task.exception())

    async def __aenter__(self) -> EnginePool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- lookups ------------------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelEntry | None:
        """The entry served under ``name`` (its name or an alias)."""
        return self._by_name.get(name)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def pick(self, entry: ModelEntry) -> Supervisor | None:
        """A READY replica, the least busy one if several (advisory: it may change state right after)."""
        ready = [sup for sup in entry.replicas if sup.state is EngineState.READY]
        return min(ready, key=lambda sup: sup.inflight) if ready else None

    async def ensure_started(self, entry: ModelEntry) -> None:
        """Start an on_demand model's STOPPED replicas; leaves FAILED ones alone (that takes an explicit
        start) and does not wait for readiness."""
        await asyncio.gather(*(sup.start() for sup in entry.replicas if sup.state is EngineState.STOPPED))
