"""Which models run and which request goes where, and when: the decisions, with no side effects of their own.

llama-swap's split (internal/router/scheduler): the scheduler decides, an ``Effects`` object acts — start
or stop a model's engines, wake a waiting request, refuse one. Every method here is synchronous and
never awaits, so on one event loop each call is atomic: no lock, and no read-then-act race between a
request and a swap. What takes time (a stop, a start) runs in the effects' tasks, which report back by
calling the scheduler again (``replica_changed``, ``release``). Unit tests drive it with a fake Effects.

Per model:
  * a request gets a READY replica at once — the one with the fewest requests in flight (ties taken in
    turn), not ejected, under ``max_concurrency`` — or waits in the model's FIFO queue (at most
    ``max_queue``; the caller keeps the deadline and ``withdraw``s a waiter that left or timed out);
  * a request for a stopped model queues and asks for a start. If running models stand in the way
    (placement.must_stop_for, ``max_loaded``) they are drained first: new requests for them queue, their
    in-flight requests finish, then they are stopped (the supervisor verifies the process tree is gone),
    and only then does the new model start. Demands are served in the order of their oldest waiter, and
    a model is never drained for a demand younger than its own oldest waiter (FIFO across models);
  * a model that is crash-restarting (it was ready, it is not now) answers 503 at once, as before: only
    a cold start, a swap or a full model makes requests wait;
  * an ``on_demand`` model unused for ``idle_timeout`` is drained and stopped (``tick``).

Swaps (``SwapPolicy``, engines/scheduling/placement.py), so that models sharing GPUs do not thrash:
  * a resident model keeps its GPUs while it has work (in flight, queued, or used within ``linger``) for its
    residency since it could serve: at least ``min_residency``, and as long as the swap's measured round trip
    (``_residency``: rent or buy); a waiter for the GPUs waits at most ``max_wait`` for it to yield. An
    idle resident yields at once. A blocker whose demand left (every waiter gone) is not drained after all,
    and a cold start launched only for waiters that all left is cancelled (stopped);
  * the waiter order, within a queue and across models, is: overdue (waited ``max_wait``) first by age,
    then higher ``priority``, then age. Nothing starves: every waiter becomes overdue;
  * a model whose spec says ``sleep:`` and whose engine can is put to sleep when drained for a swap (or by
    an operator), not stopped: its GPUs are free once every replica is SLEEPING, and its next request wakes
    it. Sleepers hold host RAM: past ``sleep_ram_gb`` the least recently used one is stopped.

Replica choice: the fewest requests in flight; with an affinity (a conversation's hash) the replica that
rendezvous hashing gives it, unless that one has more than ``AFFINITY_SLACK`` times the average load and
``AFFINITY_SPREAD`` more than the least busy (consistent hashing with bounded loads): a hot conversation
spills over, and comes back when it cools.

Each model is in one ``ModelPhase`` (engines/scheduling/phases.py), moved only along that table's moves
(``checked``: an illegal one raises ``BadMove``). The replicas' lease counts here are the one count of requests in
flight: a grant adds one, a release takes it back; nobody else writes it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from engines.replica.outlier import Outlier
from engines.replica.state import EngineState
from engines.scheduling.phases import COLD, PARKED_BY_OPERATOR, STOP_SENT, UP, ModelPhase, checked
from engines.scheduling.placement import ModelPlan, SwapPolicy, must_stop_for
from engines.scheduling.tickets import Effects, ModelStatus, Phase, Refusal, Refused, Ticket

__all__ = ["Effects", "ModelStatus", "Phase", "Refused", "Scheduler", "Ticket"]

S = EngineState
P = ModelPhase
# A process exists or will, and holds (or will hold) its GPUs. A SLEEPING replica's process lives on without them.
_RUNNING = frozenset({S.STARTING, S.READY, S.UNHEALTHY, S.BACKOFF, S.STOPPING, S.WAKING})
_DOWN = frozenset({S.STOPPED, S.FAILED})
_COMING = frozenset({S.READY, S.STARTING, S.WAKING})  # serving, or on its way to it
# A request with affinity goes where hashing sends it while that replica's load stays under this many times
# the average (+1), the bound of "consistent hashing with bounded loads" (Mirrokni et al.)...
AFFINITY_SLACK = 1.25
# ... or within this many requests of the least busy replica: an engine batches a few more requests at almost
# no cost, and a spill loses the prefix cache. Without it, two requests in flight on two replicas sent the third
# away: 16 % of a real-vLLM run's follow-up turns (tests/bench/affinity_vllm.py). SGLang's router spills on
# an absolute and a relative imbalance together, for the same reason.
AFFINITY_SPREAD = 4
_MASK = (1 << 64) - 1


def _weight(affinity: int, replica: int) -> int:
    """Rendezvous (highest random weight) hashing: a splitmix64 finaliser over the pair. Adding or losing a
    replica moves only the conversations that hashed to it."""
    z = (affinity + (replica + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@dataclass(eq=False)
class _Replica:
    state: EngineState = S.STOPPED
    active: int = 0  # granted and not yet released
    outlier: Outlier = field(default_factory=Outlier)


@dataclass(eq=False)
class _Model:
    key: int
    plan: ModelPlan
    replicas: list[_Replica]
    queue: deque[Ticket] = field(default_factory=deque)
    phase: ModelPhase = P.DOWN  # moved only by ``move``, along engines/scheduling/phases.py's table
    want: float | None = None  # a start asked for without a waiter (eager, operator, reload), and when
    # Why it goes down once its requests are done (idle, swap:<model>, sleep, abandoned, evicted, reload,
    # operator); kept while it sleeps, so that nothing is granted on a replica on its way to sleep.
    drain: str | None = None
    swap_for: int | None = None  # the model whose demand the drain is for: undone if that demand leaves
    retiring: bool = False  # a reload removed or replaced this version: once down it is RETIRED, never back
    last_used: float = 0.0
    resident_since: float = 0.0  # when it last became able to serve (a start's or a wake's first READY)
    for_waiters: bool = False  # launched for waiting requests only: cancelled if they all leave first
    launched_at: float = 0.0  # when its last start or wake was sent
    # What bringing it up cost the last time, measured (send → first READY), by way: None until seen once.
    start_cost: float | None = None
    wake_cost: float | None = None
    ranked: int = 0  # waiters with a priority: the queue is plain FIFO while there are none
    turn: int = 0  # where the next tie between replicas starts
    sticky: int = 0  # grants with an affinity that went where hashing sent them
    spilled: int = 0  # ... and that went elsewhere, their replica being over the load bound

    def move(self, new: ModelPhase) -> None:
        self.phase = checked(self.plan.name, self.phase, new)

    @property
    def up(self) -> bool:
        """Started by the scheduler and not asked to stop."""
        return self.phase in UP

    @property
    def cold(self) -> bool:
        """Started (or woken) and not READY since: requests wait for it instead of a 503."""
        return self.phase in COLD

    @property
    def stop_sent(self) -> bool:
        return self.phase in STOP_SENT

    @property
    def parked(self) -> bool:
        return self.phase in PARKED_BY_OPERATOR

    @property
    def active(self) -> int:
        return sum(r.active for r in self.replicas)

    def running(self) -> bool:
        """Holds its GPUs, or will: up, or a replica with a process that is not asleep."""
        return self.up or any(r.state in _RUNNING for r in self.replicas)

    def alive(self) -> bool:
        """A process exists, asleep or not: a stop has something to stop."""
        return self.running() or any(r.state is S.SLEEPING for r in self.replicas)

    def asleep(self) -> bool:
        """Put to sleep, and its GPUs are free: no replica holds them any more."""
        return self.phase is P.SLEEPING and not any(r.state in _RUNNING for r in self.replicas)


_NO_RANK = (2, 0, math.inf)  # no demand: ranks after every waiter


class Scheduler:
    def __init__(
        self,
        effects: Effects,
        *,
        max_loaded: int = 0,
        policy: SwapPolicy | None = None,
        sleep_ram_gb: float = math.inf,
    ) -> None:
        self._effects = effects
        self.max_loaded = max_loaded
        self.policy = policy or SwapPolicy()
        self.sleep_ram_gb = sleep_ram_gb  # the budget for sleeping models' host RAM (the pool resolves "None")
        self._models: dict[int, _Model] = {}
        self._closed = False
        self._busy = False
        self._again = False

    # -- the set of models (start-up and reload) ----------------------------------------------------

    def add(self, key: int, plan: ModelPlan, now: float, *, start: bool = False) -> None:
        self._models[key] = _Model(
            key, plan, [_Replica() for _ in range(plan.replicas)], last_used=now, want=now if start else None
        )
        self._advance(now)

    def set_plan(self, key: int, plan: ModelPlan) -> None:
        """New limits or group for an unchanged model (same replicas): applied to the next decisions."""
        model = self._models[key]
        if plan.replicas != len(model.replicas):
            raise ValueError("set_plan cannot change the number of replicas; replace the model")
        model.plan = plan

    def replace(self, old: int, new: int, plan: ModelPlan, now: float, *, start: bool) -> None:
        """A reload changed the model: the old version drains and stops, its waiters move to the new one,
        which starts (``start``, or for those waiters) once the old one is gone."""
        previous = self._models[old]
        start = start or previous.up or previous.want is not None
        waiting, previous.queue = previous.queue, deque()
        self._retire(previous)
        self._models[new] = _Model(
            new,
            plan,
            [_Replica() for _ in range(plan.replicas)],
            last_used=now,
            want=now if start else None,
            queue=waiting,
            ranked=previous.ranked,
        )
        previous.ranked = 0
        for ticket in waiting:
            ticket.key = new
        self._advance(now)

    def retire(self, key: int, now: float) -> None:
        """A reload removed the model: its waiters are refused, its requests in flight finish, it stops."""
        model = self._models[key]
        self._refuse_all(model, "removed")
        self._retire(model)
        self._advance(now)

    def _retire(self, model: _Model) -> None:
        model.retiring = True
        model.want = None
        model.drain = "reload"

    # -- operator commands --------------------------------------------------------------------------

    def start(self, key: int, now: float) -> None:
        """Start the model (an operator, or an eager model at start-up), stopping what stands in its way."""
        model = self._models[key]
        if model.phase is P.PARKED:
            model.move(P.DOWN)
        elif model.phase is P.PARKING:
            model.move(P.STOPPING)
        if model.up and model.drain is None:
            self._effects.start(key)  # starts replicas that are STOPPED or FAILED; running ones ignore it
        else:
            model.want = now
        self._advance(now)

    def stop(self, key: int, now: float) -> None:
        """Stop now, without a drain (an operator's stop), and refuse requests until started again."""
        model = self._models[key]
        model.want = None
        self._refuse_all(model, "stopped")
        if model.alive():
            model.drain = "operator"
            model.move(P.PARKING)
            self._effects.stop(key)
        else:
            model.move(P.PARKED)
        self._advance(now)

    def sleep(self, key: int, now: float) -> None:
        """Put the model to sleep once its requests in flight are over (an operator's sleep); its next
        request wakes it. Raises ValueError for a model that cannot sleep (no ``sleep:``, or its engine)."""
        model = self._models[key]
        if not model.plan.sleeps:
            raise ValueError(f"{model.plan.name} cannot sleep: no 'sleep:' in its spec, or no sleep mode in its engine")
        if model.phase is P.RUNNING and model.drain is None:
            model.drain = "sleep"
        self._advance(now)

    def is_up(self, key: int) -> bool:
        model = self._models.get(key)
        return model is not None and model.up

    def phase(self, key: int) -> ModelPhase:
        """Where the model is in its lifecycle (RETIRED once forgotten)."""
        model = self._models.get(key)
        return P.RETIRED if model is None else model.phase

    def inflight(self, key: int, replica: int) -> int:
        """Leases granted on the replica and not yet released: the one count of its requests in flight."""
        model = self._models.get(key)
        return 0 if model is None else model.replicas[replica].active

    # -- the request path ---------------------------------------------------------------------------

    def admit_now(self, key: int, now: float, exclude: int = -1, affinity: int | None = None) -> int | None:
        """The common case, allocation-free: a replica when one is free and nobody waits, else None (then
        ``request`` with a Ticket, which queues or refuses). Never replica ``exclude`` (a failover)."""
        model = self._models.get(key)
        if model is None or self._closed or model.parked or model.drain is not None or model.queue:
            return None
        index = self._pick(model, now, exclude, affinity)
        if index is not None:
            self._admit(model, index, now)
        return index

    def request(self, ticket: Ticket, now: float) -> int | None:
        """A replica index at once, or None: queued (``effects.grant``/``refuse`` will answer it later).

        Raises Refused when it can neither be served nor queued.
        """
        model = self._models.get(ticket.key)
        if model is None or model.retiring:
            raise Refused("removed", model.plan.name if model else "?")
        if self._closed:
            raise Refused("shutdown", model.plan.name)
        if model.parked:
            raise Refused("stopped", model.plan.name)
        if model.drain is None and not model.queue:
            index = self._pick(model, now, affinity=ticket.affinity)
            if index is not None:
                self._admit(model, index, now)
                return index
        if not model.running() and all(r.state is S.FAILED for r in model.replicas):
            raise Refused("failed", model.plan.name)
        waits = (
            model.drain is not None
            or not model.running()
            or model.cold
            or any(r.state is S.READY for r in model.replicas)
        )
        if not waits:
            raise Refused("unavailable", model.plan.name)  # crash-restarting: 503 now, not a long wait
        if len(model.queue) >= model.plan.max_queue:
            raise Refused("queue_full", model.plan.name)
        model.queue.append(ticket)
        if ticket.priority:
            model.ranked += 1
        self._advance(now)
        return None

    def withdraw(self, ticket: Ticket, now: float) -> None:
        """A waiter left (client gone, deadline passed): out of the queue, it never reaches the engine."""
        model = self._models.get(ticket.key)
        if model is None:
            return
        try:
            model.queue.remove(ticket)
        except ValueError:
            return
        if ticket.priority:
            model.ranked -= 1
        if model.phase is P.STARTING and model.for_waiters and not model.queue and model.want is None:
            # Launched only for waiters, and every one of them left: the start is cancelled (stopped) rather
            # than finishing a minutes-long load nobody waits for (llama-swap #727).
            model.drain = model.drain or "abandoned"
        self._advance(now)  # a shorter queue may let another model's demand through, or undo a swap

    def release(self, key: int, replica: int, now: float) -> None:
        model = self._models.get(key)
        if model is None:
            return
        model.replicas[replica].active -= 1
        model.last_used = now  # a float store: the idle clock costs the request path nothing more
        if model.queue or model.drain is not None:  # only then can a freed slot change anything
            self._advance(now)

    def report(self, key: int, replica: int, ok: bool, now: float) -> float | None:
        """Passive evidence about a replica; returns the ejection's length when this one ejects it."""
        model = self._models.get(key)
        if model is None:
            return None
        rep, policy = model.replicas[replica], model.plan.outlier
        if ok:
            rep.outlier.success()
            return None
        if rep.outlier.ejected(now) or not rep.outlier.failure(policy):
            return None
        healthy = [r for r in model.replicas if r.state is S.READY and not r.outlier.ejected(now)]
        ejected = sum(1 for r in model.replicas if r.outlier.ejected(now))
        allowed = math.floor(len(model.replicas) * policy.max_ejection_percent / 100)
        if not [r for r in healthy if r is not rep] or ejected >= allowed:
            return None  # never the last healthy replica, never more than the share: keep counting
        return rep.outlier.eject(policy, now)

    # -- what the engines and the clock say ---------------------------------------------------------

    def replica_changed(self, key: int, replica: int, state: EngineState, now: float) -> None:
        model = self._models.get(key)
        if model is None:
            return
        rep = model.replicas[replica]
        old, rep.state = rep.state, state
        if state is S.READY:
            if model.cold:
                cost = now - model.launched_at
                if model.phase is P.WAKING:
                    model.wake_cost = cost
                else:
                    model.start_cost = cost
                model.move(P.RUNNING)
                model.resident_since = now
                model.for_waiters = False
            model.last_used = max(model.last_used, now)  # the idle clock starts when it can first serve
            if old is S.STARTING:
                rep.outlier.reset()
        if state is S.BACKOFF and model.cold and not any(r.state in _COMING for r in model.replicas):
            # It crashed before it ever served: its waiters get a 503 now, not a wait through the backoff.
            model.move(P.RUNNING)
            self._refuse_all(model, "unavailable")
        if all(r.state in _DOWN for r in model.replicas):
            if model.stop_sent or model.phase is P.SLEEPING:
                self._stopped(model)  # stopped as asked; or asleep and died, or stopped because it could not sleep
            elif state is S.FAILED and all(r.state is S.FAILED for r in model.replicas):
                self._went_down(model)  # crash-looped: its GPUs are free; an operator must start it
                self._refuse_all(model, "failed")
            elif state is S.STOPPED and old is not S.STOPPED:
                self._went_down(model)  # stopped behind our back (admin per replica, shutdown)
        self._advance(now)

    def tick(self, now: float) -> None:
        """Idle stops; ejections that ended are noticed by the next pick on their own."""
        for model in self._models.values():
            plan = model.plan
            resting = (model.phase is P.RUNNING and model.drain is None) or (model.asleep() and model.drain != "idle")
            if (
                plan.on_demand
                and plan.idle_timeout > 0
                and resting
                and not model.queue
                and model.active == 0
                and now - model.last_used >= plan.idle_timeout
            ):
                model.drain = "idle"
        self._advance(now)

    def shutdown(self) -> None:
        self._closed = True
        for model in self._models.values():
            self._refuse_all(model, "shutdown")

    def status(self, key: int, now: float) -> ModelStatus:
        model = self._models[key]
        states = [r.state for r in model.replicas]
        if model.asleep() and S.SLEEPING in states:
            phase = Phase.SLEEPING
        elif (model.drain is not None and model.running()) or (S.STOPPING in states and S.READY not in states):
            phase = Phase.DRAINING
        elif S.READY in states:
            phase = Phase.READY
        elif model.up or S.STARTING in states or S.BACKOFF in states or S.WAKING in states:
            phase = Phase.STARTING
        elif states and all(s is S.FAILED for s in states):
            phase = Phase.FAILED
        else:
            phase = Phase.STOPPED
        return ModelStatus(
            phase,
            len(model.queue),
            model.active,
            model.parked,
            model.phase is P.STANDBY,
            model.drain,
            tuple(i for i, r in enumerate(model.replicas) if r.outlier.ejected(now)),
            model.sticky,
            model.spilled,
        )

    # -- decisions ----------------------------------------------------------------------------------

    def _pick(self, model: _Model, now: float, exclude: int = -1, affinity: int | None = None) -> int | None:
        limit = model.plan.max_concurrency
        reps = model.replicas
        if affinity is not None and len(reps) > 1 and model.plan.affinity:
            index = self._pick_home(model, now, exclude, affinity)
            if index is not None:
                return index
        best = fallback = None
        healthy = False
        for offset in range(len(reps)):
            i = (model.turn + offset) % len(reps)
            rep = reps[i]
            if rep.state is not S.READY or i == exclude:
                continue
            ejected = now < rep.outlier.ejected_until
            healthy = healthy or not ejected
            if limit and rep.active >= limit:
                continue
            if ejected:
                if fallback is None or rep.active < reps[fallback].active:
                    fallback = i
            elif best is None or rep.active < reps[best].active:
                best = i
        if best is None and not healthy:
            best = fallback  # only ejected replicas are up: passive evidence alone never empties a model
        if best is not None:
            model.turn = best + 1
        return best

    def _pick_home(self, model: _Model, now: float, exclude: int, affinity: int) -> int | None:
        """The replica rendezvous hashing gives ``affinity``, or the next one in its order while the first is
        over the load bound; None when no healthy replica has room (the plain pick decides then)."""
        limit = model.plan.max_concurrency
        reps = model.replicas
        open_ = [
            i
            for i, rep in enumerate(reps)
            if rep.state is S.READY
            and i != exclude
            and now >= rep.outlier.ejected_until
            and not (limit and rep.active >= limit)
        ]
        if not open_:
            return None
        loads = [reps[i].active for i in open_]
        bound = max(math.ceil(AFFINITY_SLACK * (sum(loads) + 1) / len(open_)), min(loads) + AFFINITY_SPREAD)
        order = sorted(open_, key=lambda i: _weight(affinity, i), reverse=True)
        for i in order:
            if reps[i].active < bound:
                if i == order[0]:
                    model.sticky += 1
                else:
                    model.spilled += 1
                return i
        return None

    def _admit(self, model: _Model, index: int, now: float) -> None:
        model.replicas[index].active += 1
        model.last_used = now

    def _advance(self, now: float) -> None:
        if self._busy:  # an effect called back in: finish this pass, then run another
            self._again = True
            return
        self._busy = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._undo_stale_drains()
                for model in list(self._models.values()):
                    self._serve_queue(model, now)
                self._place(now)
                for model in list(self._models.values()):
                    self._maybe_stop(model)
        finally:
            self._busy = False

    # Waiter order: overdue (waited max_wait) first, then higher priority, then older. A tuple, smaller first.

    def _rank(self, ticket: Ticket, now: float) -> tuple[int, int, float]:
        bound = self.policy.max_wait
        return (0 if bound and now - ticket.arrived >= bound else 1, -ticket.priority, ticket.arrived)

    def _next(self, model: _Model, now: float) -> int:
        """Where in the queue the next waiter to serve is: the head while nobody has a priority (FIFO)."""
        if not model.ranked:
            return 0
        queue = model.queue
        return min(range(len(queue)), key=lambda i: self._rank(queue[i], now))

    def _demand_rank(self, model: _Model, now: float) -> tuple[int, int, float]:
        """The model's claim on GPUs: its best waiter's rank; a start asked for (operator, eager, reload)
        ranks as overdue from when it was asked."""
        best = self._rank(model.queue[self._next(model, now)], now) if model.queue else _NO_RANK
        if model.want is not None:
            best = min(best, (0, 0, model.want))
        return best

    def _serve_queue(self, model: _Model, now: float) -> None:
        if model.drain is not None:
            return
        queue = model.queue
        while queue:
            at = self._next(model, now)
            ticket = queue[at]
            index = self._pick(model, now, affinity=ticket.affinity)
            if index is None:
                return
            del queue[at]
            if ticket.priority:
                model.ranked -= 1
            if self._effects.grant(ticket, index):
                self._admit(model, index, now)

    def _undo_stale_drains(self) -> None:
        """Never swap for requests that have left: a drain for a model nobody waits for any more is called off
        (its own requests are served again), unless its stop or sleep is already sent."""
        for model in self._models.values():
            if model.swap_for is None or model.phase not in (P.RUNNING, P.STARTING):
                continue
            demand = self._models.get(model.swap_for)
            if demand is None or (not demand.running() and not demand.queue and demand.want is None):
                model.drain = model.swap_for = None

    def _place(self, now: float) -> None:
        """Start (or wake) the demanded models that can; drain what stands in their way, when it may yield
        (best demand first: overdue, priority, age)."""
        if self._closed:
            return
        demands = [(self._demand_rank(m, now), m) for m in self._models.values() if self._wants_up(m)]
        demands.sort(key=lambda d: d[0])
        for rank, model in demands:
            blockers = [b for b in self._holding_others(model) if must_stop_for(model.plan, b.plan)]
            extra = self._over_cap(model, blockers, rank, now)
            if extra is None or not all(b.drain is not None or self._yields(b, model, rank, now) for b in blockers):
                continue  # what holds the GPUs keeps them for now (a better demand, or its residency)
            for b in (*blockers, *extra):
                if b.drain is None:
                    b.drain = f"swap:{model.plan.name}"
                    b.swap_for = model.key
                    b.want = None
            leaving = (*blockers, *extra)
            if not any(self._holds(b, model) for b in leaving) and self._fits(model):
                self._launch(model, now)

    def _yields(self, model: _Model, demand: _Model, rank: tuple[int, int, float], now: float) -> bool:
        """Whether ``model`` may be drained for ``demand`` (whose best waiter ranks ``rank``): none of its own
        waiters ranks before it, and it is not a resident with work inside its residency (unless the demand
        is overdue)."""
        if model.queue and self._demand_rank(model, now) <= rank:
            return False  # a tie keeps what runs: two equal demands must not drain each other in turn
        if rank[0] == 0 or model.phase is not P.RUNNING:
            return True  # overdue, or an operator's start; a model still starting has no residency to keep
        if now - model.resident_since >= self._residency(model, demand):
            return True
        return not (model.active or model.queue or now - model.last_used < self.policy.linger)

    def _residency(self, resident: _Model, demand: _Model) -> float:
        """How long ``resident`` keeps the GPUs from ``demand`` while it has work: at least ``min_residency``,
        and as long as the swap's round trip costs (``demand`` coming up now, ``resident`` coming back later,
        each as measured the last time it came up that way). The rent-or-buy rule (ski rental: keep paying
        rent until it adds up to the price of buying; never worse than twice the best choice in hindsight):
        a swap of minutes is amortised over minutes of serving, a wake of a second costs a second of holding,
        and nobody tunes the residency to their engines' start times. ``max_wait`` bounds it from above (an
        overdue waiter drains the resident whatever its residency). A cost not yet seen counts as nothing."""
        there = demand.wake_cost if demand.phase is P.SLEEPING else demand.start_cost
        back = resident.wake_cost if resident.plan.sleeps else resident.start_cost
        if not self.policy.round_trip:
            return self.policy.min_residency
        return max(self.policy.min_residency, (there or 0.0) + (back or 0.0))

    def _wants_up(self, model: _Model) -> bool:
        return (
            not model.running()
            and not model.stop_sent  # on its way down (a sleeper's stop): it comes back once it is
            and not model.parked
            and not model.retiring
            and (bool(model.queue) or model.want is not None)
        )

    def _running_others(self, model: _Model) -> Iterator[_Model]:
        return (m for m in self._models.values() if m is not model and m.running())

    @staticmethod
    def _holds(other: _Model, model: _Model) -> bool:
        """Whether ``other`` still holds what ``model`` needs: its GPUs while it runs; for an older version of
        the same model (a reload), its port and name too, so even asleep it must be gone first."""
        return other.alive() if other.plan.name == model.plan.name else other.running()

    def _holding_others(self, model: _Model) -> Iterator[_Model]:
        return (m for m in self._models.values() if m is not model and self._holds(m, model))

    def _over_cap(
        self, model: _Model, blockers: list[_Model], rank: tuple[int, int, float], now: float
    ) -> list[_Model] | None:
        """Models to stop so ``model`` fits under max_loaded (least recently used first); None: cannot."""
        if not self.max_loaded or not model.plan.spawns:
            return []
        loaded = [m for m in self._running_others(model) if m.plan.spawns]
        staying = [m for m in loaded if m.drain is None and m not in blockers]
        excess = len(staying) + 1 - self.max_loaded
        if excess <= 0:
            return []
        candidates = sorted(
            (m for m in staying if self._yields(m, model, rank, now)), key=lambda m: (m.active > 0, m.last_used)
        )
        return candidates[:excess] if len(candidates) >= excess else None

    def _fits(self, model: _Model) -> bool:
        if not self.max_loaded or not model.plan.spawns:
            return True
        return sum(1 for m in self._running_others(model) if m.plan.spawns) < self.max_loaded

    def _launch(self, model: _Model, now: float) -> None:
        model.last_used = model.launched_at = now
        if model.phase is P.SLEEPING:
            model.move(P.WAKING)
            model.drain = model.swap_for = model.want = None
            self._effects.wake(model.key)
            return
        model.for_waiters = model.want is None
        model.move(P.STARTING)
        model.want = None
        self._effects.start(model.key)

    def _maybe_stop(self, model: _Model) -> None:
        if model.drain is None or model.stop_sent or model.active:
            return
        if not model.alive():
            self._stopped(model)  # nothing to stop (never started, or crashed down)
            return
        sleeps_for = model.drain == "sleep" or model.drain.startswith("swap:")
        if model.phase is P.SLEEPING:
            if sleeps_for:
                return  # asleep, or on its way, as asked
        elif model.phase is P.RUNNING and sleeps_for and model.plan.sleeps and self._room_to_sleep(model):
            model.move(P.SLEEPING)
            self._effects.sleep(model.key)
            return
        model.move(P.STOPPING)
        self._effects.stop(model.key)

    def _room_to_sleep(self, model: _Model) -> bool:
        """Whether ``model`` fits the sleepers' host-RAM budget, once the least recently used sleepers are
        stopped to make room (they are, here); False: it alone is over the budget, and is stopped instead."""
        need = model.plan.sleep_ram_gb
        if need > self.sleep_ram_gb:
            return False
        sleepers = sorted(
            (m for m in self._models.values() if m is not model and m.phase is P.SLEEPING and not m.queue),
            key=lambda m: m.last_used,
        )  # a sleeper with waiters is about to wake: never the one to make room
        used = sum(m.plan.sleep_ram_gb for m in sleepers)
        for old in sleepers:
            if used + need <= self.sleep_ram_gb:
                break
            used -= old.plan.sleep_ram_gb
            old.drain = "evicted"
            old.move(P.STOPPING)
            self._effects.stop(old.key)
        return True

    def _went_down(self, model: _Model) -> None:
        """Every replica is down and nobody asked for it: a model that was up is DOWN (a drain asked for is
        then over: ``_maybe_stop`` finds nothing to stop)."""
        if model.up:
            model.move(P.DOWN)

    def _stopped(self, model: _Model) -> None:
        model.drain = model.swap_for = None
        if model.retiring:
            model.move(P.RETIRED)
            del self._models[model.key]
            self._effects.retired(model.key)
        elif model.parked:
            model.move(P.PARKED)
        else:
            model.move(P.STANDBY)

    def _refuse_all(self, model: _Model, reason: Refusal) -> None:
        waiting, model.queue = model.queue, deque()
        model.ranked = 0
        for ticket in waiting:
            self._effects.refuse(ticket, Refused(reason, model.plan.name))
