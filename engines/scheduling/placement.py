"""Which models may run side by side: GPUs, groups, and the cap on loaded models.

The rule is simple on purpose. Two models never run on the same GPU, unless both are members of one
``groups:`` entry (members are meant to stay loaded together, e.g. a chat model and a small embedding
model that fit one GPU with their memory fractions set). A group marked ``exclusive`` goes further:
starting one of its members stops every running model outside the group, GPUs or not. ``max_loaded``
caps how many spawned models run at once (0: no cap); remote (``openai``) engines hold no GPU and never
count. Two versions of one model (a reload changed it) never overlap either: the old one goes first.

Config (top level)::

    groups:
      small: {members: [chat, embed], exclusive: false}
    max_loaded: 2
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field

from engines.spec import ModelSpec, OutlierPolicy, _Frozen


class GroupSpec(_Frozen):
    members: tuple[str, ...] = Field(min_length=1)
    exclusive: bool = False


class SwapPolicy(_Frozen):
    """When a model that holds GPUs gives them up to another one's waiting requests (``swap:`` in the config).

    A resident model keeps its GPUs while it has work (requests in flight or queued, or a request within
    ``linger`` s: its client's pause between two requests) for its residency since it could serve: at least
    ``min_residency`` s, and as long as the swap's round trip costs (the other model coming up, this one coming
    back: each measured the last time, so a cold start of minutes is amortised over minutes and a wake of a
    second over a second). A request waiting for it to yield waits at most ``max_wait`` s before it is drained
    anyway, and goes ahead of higher priorities then (0: no such bound, and priorities alone order the
    queues). An idle resident yields at once. ``min_residency: 0, max_wait: 0, linger: 0`` is
    swap-on-arrival (``on_arrival()``: every request for another model swaps at once, llama-swap's behaviour
    and this gateway's before). ``sleep_ram_gb``: host RAM for sleeping models (None: half the host's
    memory); beyond it the least recently used sleeper is stopped.
    """

    min_residency: float = Field(5.0, ge=0)
    max_wait: float = Field(60.0, ge=0)
    linger: float = Field(2.0, ge=0)
    round_trip: bool = True  # residency at least the measured round trip of a swap (False: min_residency only)
    sleep_ram_gb: float | None = Field(None, ge=0)

    @classmethod
    def on_arrival(cls) -> SwapPolicy:
        """Swap the moment a request for another model arrives (the baseline the trace benchmark compares)."""
        return cls(min_residency=0, max_wait=0, linger=0, round_trip=False)


class Placement(_Frozen):
    groups: dict[str, GroupSpec] = Field(default_factory=dict)
    max_loaded: int = Field(0, ge=0)
    swap: SwapPolicy = SwapPolicy()

    def group_of(self, model: str) -> tuple[str, GroupSpec] | None:
        for name, group in self.groups.items():
            if model in group.members:
                return name, group
        return None


@dataclass(frozen=True)
class ModelPlan:
    """What the scheduler knows of one model: its config, reduced to the facts it decides on."""

    name: str
    gpus: frozenset[int]
    group: str | None = None
    exclusive: bool = False
    spawns: bool = True  # False: a remote engine (no process, no GPU)
    on_demand: bool = False
    replicas: int = 1
    max_queue: int = 64
    max_concurrency: int = 0
    idle_timeout: float = 0.0
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    sleeps: bool = False  # a swap puts it to sleep (its spec asks, its engine can) rather than stopping it
    sleep_ram_gb: float = 0.0  # host RAM it holds asleep
    affinity: bool = True  # requests with an affinity keep to their replica (else: the least busy)


def plan_for(
    spec: ModelSpec, placement: Placement, *, spawns: bool = True, sleeps: bool = False, sleep_ram_gb: float = 0.0
) -> ModelPlan:
    found = placement.group_of(spec.name)
    return ModelPlan(
        name=spec.name,
        gpus=frozenset(spec.gpus) if spawns else frozenset(),
        group=found[0] if found else None,
        exclusive=bool(found and found[1].exclusive),
        spawns=spawns,
        on_demand=spec.load == "on_demand",
        replicas=spec.replicas,
        max_queue=spec.max_queue,
        max_concurrency=spec.max_concurrency,
        idle_timeout=spec.idle_timeout,
        outlier=spec.outlier,
        sleeps=sleeps,
        sleep_ram_gb=sleep_ram_gb,
        affinity=spec.affinity,
    )


def must_stop_for(starting: ModelPlan, running: ModelPlan) -> bool:
    """Whether ``running`` has to stop before ``starting`` may start."""
    if starting.name == running.name:
        return True  # an older version of the same model (same port, same GPUs): replaced, never overlapped
    if not (starting.spawns and running.spawns):
        return False
    if starting.group is not None and starting.group == running.group:
        return False
    if starting.exclusive:
        return True
    return bool(starting.gpus & running.gpus)


def check_placement(specs: Sequence[ModelSpec], placement: Placement) -> None:
    """Refuse a config the scheduler could not honour: unknown or repeated group members, eager models
    that could never run together, more eager models than ``max_loaded``. Raises ValueError."""
    names = {spec.name for spec in specs}
    seen: dict[str, str] = {}
    for group_name, group in placement.groups.items():
        for member in group.members:
            if member not in names:
                raise ValueError(f"groups.{group_name}: {member!r} is not a configured model")
            if member in seen:
                raise ValueError(f"model {member!r} is in two groups ({seen[member]!r} and {group_name!r})")
            seen[member] = group_name
    eager = [plan_for(s, placement, spawns=s.engine != "openai") for s in specs if s.load == "eager"]
    for i, a in enumerate(eager):
        for b in eager[i + 1 :]:
            if must_stop_for(a, b) or must_stop_for(b, a):
                shared = a.gpus & b.gpus
                why = f"share GPU {min(shared)}" if shared else "cannot run together (exclusive group)"
                raise ValueError(
                    f"eager models {a.name!r} and {b.name!r} {why}; put them in one group "
                    "or make one of them load: on_demand"
                )
    spawned = sum(1 for p in eager if p.spawns)
    if placement.max_loaded and spawned > placement.max_loaded:
        raise ValueError(f"{spawned} eager models but max_loaded is {placement.max_loaded}")
