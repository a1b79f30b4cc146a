"""All served models: one entry per configured model, one supervisor task per replica, one probe session,
and the scheduler that decides which models run and which replica answers a request.

The pool is the scheduler's ``Effects``: it turns "start"/"stop" into commands to the supervisors (their
owners), "grant"/"refuse" into the result of a waiting request's future, and feeds the supervisors'
state changes, the request path's releases and passive failures, and a clock tick back into it.
Lookups by name or alias are one dict read. Everything it says about state is a snapshot for advisory
choices; commands go to the supervisors.

One writer each: a replica's state is its supervisor's; its requests in flight are the scheduler's lease
count (``Supervisor.inflight`` and the snapshots read it); a hurried stop is a stop command's argument.
A lease is granted only on a replica that is READY when the request gets it, on both paths (a worker's
leases are the hub's, taken here): a queued request whose replica crashed before it woke is refused
``not_ready``, a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from engines.adapters import adapter_for
from engines.adapters.sleep import sleep_ram_gb
from engines.process.launch import sweep_leftovers
from engines.replica.state import EngineState, StateChanged
from engines.replica.supervisor import Supervisor
from engines.scheduling.contract import NO_CLAIM, Claim, LeaseSource, QueuePlace, ReplicaHandle, ReplicaLease
from engines.scheduling.entry import ModelEntry
from engines.scheduling.lease import Granted, Lease, Waiting
from engines.scheduling.placement import ModelPlan, Placement, SwapPolicy, check_placement, plan_for
from engines.scheduling.scheduler import ModelStatus, Phase, Refused, Scheduler, Ticket
from engines.spec import ModelSpec

__all__ = ["Action", "EnginePool", "ModelEntry", "ReloadReport"]

_log = logging.getLogger(__name__)
Action = Literal["start", "stop", "restart", "sleep", "wake"]
Job = Literal["start", "stop", "sleep", "wake"]
TICK_S = 0.5  # how often idle timeouts are checked


@dataclass(frozen=True)
class ReloadReport:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]


class _Effects:
    """What the scheduler's decisions do (a separate object: its verbs would clash with the pool's)."""

    def __init__(self, pool: EnginePool) -> None:
        self._pool = pool

    def start(self, key: int) -> None:
        self._pool._job(key, "start")

    def stop(self, key: int) -> None:
        self._pool._job(key, "stop")

    def sleep(self, key: int) -> None:
        self._pool._job(key, "sleep")

    def wake(self, key: int) -> None:
        self._pool._job(key, "wake")

    def grant(self, ticket: Ticket, replica: int) -> bool:
        future: asyncio.Future[int] = ticket.waiter
        if future.done():
            return False
        future.set_result(replica)
        return True

    def refuse(self, ticket: Ticket, error: Refused) -> None:
        future: asyncio.Future[int] = ticket.waiter
        if not future.done():
            future.set_exception(error)

    def retired(self, key: int) -> None:
        self._pool._retired(key)


class _Desk:
    """What leases and waiters talk back to (engines/scheduling/lease.py's ``Desk``): the pool's scheduler."""

    def __init__(self, pool: EnginePool) -> None:
        self._pool = pool

    def lease(self, key: int, index: int) -> Lease:
        return self._pool._grant(key, index)

    def release(self, key: int, index: int) -> None:
        self._pool._scheduler.release(key, index, self._pool._clock())

    def report(self, key: int, index: int, ok: bool) -> None:
        entry = self._pool._by_key.get(key)
        if entry is None or index >= len(entry.replicas):
            return  # retired meanwhile: its record went with it
        sup = entry.replicas[index]
        if ok:
            sup.report_success()
        else:
            sup.report_failure()

    def withdraw(self, ticket: Ticket) -> None:
        self._pool._scheduler.withdraw(ticket, self._pool._clock())


class EnginePool:
    def __init__(
        self,
        specs: Sequence[ModelSpec],
        *,
        placement: Placement | None = None,
        on_event: Callable[[StateChanged], None] | None = None,
        probe_connections: int = 100,
        sweep: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        tick: float = TICK_S,
    ) -> None:
        self.placement = placement or Placement()
        check_placement(specs, self.placement)
        self._on_event = on_event
        self._probe_connections = probe_connections
        self._sweep = sweep
        self._clock = clock
        self._sleep = sleep
        self._tick_s = tick
        self._scheduler = Scheduler(
            _Effects(self),
            max_loaded=self.placement.max_loaded,
            policy=self.placement.swap,
            sleep_ram_gb=sleep_budget(self.placement.swap),
        )
        self._desk = _Desk(self)
        self._hurried = False
        self.event_errors = 0  # times the on_event subscriber raised (each logged with its traceback)
        self._next_key = 0
        self._by_key: dict[int, ModelEntry] = {}  # current and retiring entries
        self._tasks: dict[int, list[asyncio.Task[None]]] = {}
        self._jobs: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._entries, self._by_name = self._index([self._new_entry(spec) for spec in specs])
        for entry in self._entries.values():
            self._scheduler.add(entry.key, self._plan(entry), clock())
        self._session: aiohttp.ClientSession | None = None
        self._ticker: asyncio.Task[None] | None = None
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
            self._supervise(entry)
        self._ticker = asyncio.create_task(self._tick(), name="pool ticker")
        eager = [entry for entry in self._entries.values() if entry.spec.load == "eager"]
        await asyncio.gather(*(self._command_model(entry, "start") for entry in eager))

    def close_queues(self) -> None:
        """A drain begins: the requests waiting for a model are refused now (a 503 they can retry elsewhere,
        not a wait for an engine that will be stopped), nothing new starts; answers in flight go on."""
        self._scheduler.shutdown()

    def hurry(self) -> None:
        """The stop to come is in a hurry (a second signal): SIGKILL after a second, whatever stop_grace says.
        Every stop the pool sends from now on says so; the supervisors apply it (a stop under way keeps
        the grace it began with)."""
        self._hurried = True

    async def stop(self) -> None:
        """Refuse the waiters, stop every replica in parallel (each: SIGTERM → its stop_grace → SIGKILL),
        then end the tasks and close the probe session. Safe to call twice, and after a failed start."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        self._scheduler.shutdown()
        if self._ticker is not None:
            self._ticker.cancel()
        sups = [sup for entry in self._by_key.values() for sup in entry.replicas]
        results = await asyncio.gather(*(sup.stop(hurried=self._hurried) for sup in sups), return_exceptions=True)
        for sup, result in zip(sups, results, strict=True):
            if isinstance(result, BaseException):
                _log.error("stopping %s/%d failed: %r", sup.model, sup.replica, result)
        tasks = [t for ts in self._tasks.values() for t in ts]
        for task in tasks:
            task.cancel()
        leftovers = [*tasks, *self._jobs.values(), *self._background, *([self._ticker] if self._ticker else [])]
        await asyncio.gather(*leftovers, return_exceptions=True)
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
        return min(ready, key=lambda sup: self.inflight(entry, sup.replica)) if ready else None

    def inflight(self, entry: ModelEntry, replica: int) -> int:
        """Leases held on the replica now: the one count of its requests in flight."""
        return self._scheduler.inflight(entry.key, replica)

    def status(self, entry: ModelEntry) -> ModelStatus:
        """The model as a whole: phase, queue depth, in flight (advisory)."""
        if entry.key not in self._by_key:
            return ModelStatus(Phase.STOPPED, 0, 0, False, False, None, ())
        return self._scheduler.status(entry.key, self._clock())

    # -- the request path ---------------------------------------------------------------------------

    def request(self, entry: ModelEntry, claim: Claim = NO_CLAIM) -> Lease | Waiting:
        """A Lease at once (the common case: no await, no task), or a place in the model's queue.

        Raises Refused when neither: queue full, failed, stopped by an operator, crash-restarting, removed.
        """
        current = self._entries.get(entry.name)
        if current is not None and current.key != entry.key:
            entry = current  # resolved before a reload replaced it: the new version serves it
        now = self._clock()
        index = self._scheduler.admit_now(entry.key, now, affinity=claim.affinity)
        if index is not None:
            return self._grant(entry.key, index)
        ticket = Ticket(entry.key, now, asyncio.get_running_loop().create_future(), claim.priority, claim.affinity)
        index = self._scheduler.request(ticket, now)
        if index is not None:
            return self._grant(entry.key, index)
        return Waiting(self._desk, ticket, entry.name)

    async def admit(self, entry: ModelEntry, claim: Claim = NO_CLAIM) -> Lease | Waiting:
        """``request``, as the request path calls it: the same call on a worker's pool is a round trip."""
        return self.request(entry, claim)

    async def reroute(self, entry: ModelEntry, failed: ReplicaLease) -> Lease | None:
        """``failover`` away from ``failed``'s replica, as the request path calls it."""
        return self.failover(entry, failed.replica)

    def failover(self, entry: ModelEntry, failed: ReplicaHandle) -> Lease | None:
        """A lease on another ready replica at once, or None: where a request goes whose connection
        ``failed`` refused (nothing was sent, so sending it elsewhere cannot run it twice)."""
        current = self._entries.get(entry.name)
        if current is None or current.key != entry.key:
            return None
        index = self._scheduler.admit_now(entry.key, self._clock(), exclude=failed.replica)
        if index is None:
            return None
        try:
            return self._grant(entry.key, index)
        except Refused:
            return None

    def _grant(self, key: int, index: int) -> Lease:
        """The Lease for a slot the scheduler granted, if its replica is READY now; else the slot goes back
        and the request is refused ``not_ready`` (a queued one is woken a loop turn after its grant, and
        the replica may have crashed in between)."""
        entry = self._by_key.get(key)
        sup = entry.replicas[index] if entry is not None and index < len(entry.replicas) else None
        url = sup.base_url if sup is not None and sup.state is EngineState.READY else None
        if url is None:
            self._scheduler.release(key, index, self._clock())
            raise Refused("not_ready", entry.name if entry is not None else "?")
        return Lease(self._desk, key, index, Granted(index, url))

    # -- commands (admin, start-up) -----------------------------------------------------------------

    async def command(self, entry: ModelEntry, action: Action, replicas: Sequence[Supervisor] | None = None) -> None:
        """An operator's start/stop/restart. The whole model goes through the scheduler (a start may first
        drain what holds its GPUs, and then returns before it launches); single replicas of a running
        model go straight to their supervisors."""
        whole = replicas is None or len(replicas) == len(entry.replicas)
        up = self._scheduler.is_up(entry.key)
        if action == "sleep":
            self._scheduler.sleep(entry.key, self._clock())  # a ValueError for a model that cannot sleep
        elif action == "wake":
            await self._command_model(entry, "start")  # a sleeping model's start is a wake
        elif action == "stop" and whole:
            await self._command_model(entry, "stop")
        elif action != "stop" and (not up or (action == "start" and whole)):
            await self._command_model(entry, "start")  # a model that is down starts whole, by the rules
        else:
            results = await asyncio.gather(
                *(self._order(sup, action) for sup in replicas or entry.replicas), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def ensure_started(self, entry: ModelEntry) -> None:
        """Start a model unless it runs (a FAILED one needs ``command(entry, "start")``); no readiness wait."""
        if not self._scheduler.is_up(entry.key) and self.status(entry).phase is not Phase.FAILED:
            await self._command_model(entry, "start")

    async def _command_model(self, entry: ModelEntry, action: Literal["start", "stop"]) -> None:
        before = self._jobs.get((entry.key, action))
        now = self._clock()
        if action == "start":
            self._scheduler.start(entry.key, now)
        else:
            self._scheduler.stop(entry.key, now)
        job = self._jobs.get((entry.key, action))
        if job is not None and job is not before:
            await asyncio.shield(job)

    # -- reload ---------------------------------------------------------------------------------------

    async def reload(self, specs: Sequence[ModelSpec], placement: Placement) -> ReloadReport:
        """Apply a new set of models: added ones start (if eager), removed ones drain and stop, changed ones
        drain and come back with the new spec, untouched ones are not touched. All or nothing: a bad set
        raises ValueError before anything changes."""
        check_placement(specs, placement)
        served: dict[str, str] = {}
        for spec in specs:  # a name served twice: refused before anything changes
            for name in spec.served_names:
                if served.setdefault(name, spec.name) != spec.name or spec.served_names.count(name) > 1:
                    raise ValueError(f"model name {name!r} is used twice")
            adapter_for(spec.engine)
        old = self._entries
        fresh = {
            spec.name: self._new_entry(spec, gates_ready=False)
            for spec in specs
            if spec.name not in old or old[spec.name].spec != spec
        }
        entries = {spec.name: fresh.get(spec.name) or old[spec.name] for spec in specs}
        by_name = self._index(list(entries.values()))[1]
        self.placement = placement
        self._scheduler.max_loaded = placement.max_loaded
        self._scheduler.policy = placement.swap
        self._scheduler.sleep_ram_gb = sleep_budget(placement.swap)
        self._entries, self._by_name = entries, by_name
        now = self._clock()
        removed = [name for name in old if name not in entries]
        for name in removed:
            self._scheduler.retire(old[name].key, now)
        for name, entry in entries.items():
            eager = entry.spec.load == "eager"
            if name not in fresh:
                self._scheduler.set_plan(entry.key, self._plan(entry))
                continue
            if self._started:
                self._supervise(entry)
            if name in old:
                self._scheduler.replace(old[name].key, entry.key, self._plan(entry), now, start=eager)
            else:
                self._scheduler.add(entry.key, self._plan(entry), now, start=eager)
        return ReloadReport(
            added=tuple(n for n in fresh if n not in old),
            removed=tuple(removed),
            changed=tuple(n for n in fresh if n in old),
            unchanged=tuple(n for n in entries if n not in fresh),
        )

    # -- plumbing -----------------------------------------------------------------------------------

    def _new_entry(self, spec: ModelSpec, *, gates_ready: bool = True) -> ModelEntry:
        adapter = adapter_for(spec.engine)
        self._next_key += 1
        entry = ModelEntry(
            spec, adapter, request_model=adapter.request_model(spec), key=self._next_key, gates_ready=gates_ready
        )
        self._by_key[entry.key] = entry
        return entry

    @staticmethod
    def _index(entries: list[ModelEntry]) -> tuple[dict[str, ModelEntry], dict[str, ModelEntry]]:
        by_name: dict[str, ModelEntry] = {}
        for entry in entries:
            for name in entry.spec.served_names:
                if name in by_name:
                    raise ValueError(
                        f"model name {name!r} is used twice (by {by_name[name].name!r} and {entry.name!r})"
                    )
                by_name[name] = entry
        return {entry.name: entry for entry in entries}, by_name

    def _order(self, sup: Supervisor, action: Action) -> Awaitable[None]:
        if action == "stop":
            return sup.stop(hurried=self._hurried)
        if action == "sleep":
            return sup.sleep()
        if action == "wake":
            return sup.wake()
        return sup.start() if action == "start" else sup.restart()

    def _plan(self, entry: ModelEntry) -> ModelPlan:
        spec, adapter = entry.spec, entry.adapter
        sleeps = adapter.spawns and adapter.sleep_api(spec) is not None
        ram = sleep_ram_gb(spec) if sleeps else 0.0
        return plan_for(spec, self.placement, spawns=adapter.spawns, sleeps=sleeps, sleep_ram_gb=ram)

    def _supervise(self, entry: ModelEntry) -> None:
        assert self._session is not None
        entry.replicas = [
            Supervisor(
                entry.spec.for_replica(i),
                entry.adapter,
                replica=i,
                session=self._session,
                on_event=functools.partial(self._replica_event, entry.key),
                on_report=functools.partial(self._report, entry.key),
                inflight=functools.partial(self._scheduler.inflight, entry.key, i),
                clock=self._clock,
                sleep=self._sleep,
            )
            for i in range(entry.spec.replicas)
        ]
        tasks = self._tasks[entry.key] = []
        for sup in entry.replicas:
            task = asyncio.create_task(sup.run(), name=f"supervise {entry.name}/{sup.replica}")
            task.add_done_callback(self._supervisor_ended)
            tasks.append(task)

    def _replica_event(self, key: int, event: StateChanged) -> None:
        # The owner tells the scheduler directly, unguarded: if this raises (a bug), the supervisor's task
        # ends loudly rather than leaving the scheduler's copy of the state behind.
        self._scheduler.replica_changed(key, event.replica, event.new, self._clock())
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                # The gateway's subscriber (metrics, logs): its bug must not take the replica down with it.
                self.event_errors += 1
                _log.exception("state-change subscriber failed on %s/%d → %s", event.model, event.replica, event.new)

    def _report(self, key: int, replica: int, ok: bool) -> None:
        ejected_for = self._scheduler.report(key, replica, ok, self._clock())
        if ejected_for is not None:
            entry = self._by_key.get(key)
            _log.warning(
                "%s/%d: ejected from rotation for %.0fs after failures in a row on real traffic",
                entry.name if entry else key,
                replica,
                ejected_for,
            )

    def _job(self, key: int, action: Job) -> None:
        entry = self._by_key.get(key)
        if entry is None or self._stopped or not entry.replicas:
            return
        if action in ("stop", "sleep", "wake"):
            why = self._scheduler.status(key, self._clock()).draining_for if action != "wake" else None
            _log.info(
                "%s: %s%s",
                entry.name,
                {"stop": "stopping", "sleep": "going to sleep", "wake": "waking"}[action],
                f" ({why})" if why else "",
            )

        async def job() -> None:
            results = await asyncio.gather(
                *(self._order(sup, action) for sup in entry.replicas), return_exceptions=True
            )
            for sup, result in zip(entry.replicas, results, strict=True):
                if isinstance(result, BaseException):
                    _log.error("%s of %s/%d failed: %r", action, sup.model, sup.replica, result)

        self._jobs[(key, action)] = asyncio.get_running_loop().create_task(job(), name=f"{action} {entry.name}")

    def _retired(self, key: int) -> None:
        entry = self._by_key.pop(key, None)
        for action in ("start", "stop", "sleep", "wake"):
            self._jobs.pop((key, action), None)
        tasks = self._tasks.pop(key, [])
        for task in tasks:
            task.cancel()  # the replicas are STOPPED: their supervisors end at once
        if tasks:
            ending = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
            self._background.add(ending)
            ending.add_done_callback(self._background.discard)
        if entry is not None:
            _log.info("%s: previous version stopped and retired", entry.name)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            try:
                self._scheduler.tick(self._clock())
            except Exception:  # a bug, but idle stops must not end for good because of it
                _log.exception("scheduler tick failed")


def sleep_budget(policy: SwapPolicy) -> float:
    """The sleepers' host-RAM budget in GB: ``swap.sleep_ram_gb``, or half of this host's memory."""
    if policy.sleep_ram_gb is not None:
        return policy.sleep_ram_gb
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20 / 2  # kB → GiB, half of it
    except (OSError, ValueError, IndexError):
        pass
    return 0.0  # unknown: nothing sleeps (a swap stops, as without sleep mode), never an unbounded guess


# The request path's contract (engines/scheduling/contract.py), held by the type checker: a change here
# that breaks it fails mypy, not a request.
_source: type[LeaseSource] = EnginePool
_lease: type[ReplicaLease] = Lease
_place: type[QueuePlace] = Waiting
_handle: type[ReplicaHandle] = Granted
