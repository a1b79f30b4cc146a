"""Model swaps on one shared GPU under recorded-style traces: cold starts, wakes and waits, per swap policy.

    .venv/bin/python tests/bench/swap_trace.py                       # = make bench-swap: 2 traces x 3 policies, ~9 min
    .venv/bin/python tests/bench/swap_trace.py --trace two_clients_agents --policies on-arrival --out swap.json
    .venv/bin/python tests/bench/swap_trace.py --make-trace          # rewrite both traces under tests/bench/traces/

What it measures, and why (issue 17): two models that share GPU 0 (``gpus: [0]`` both; no GPU is touched, the
engines are vLLM stand-ins, tests/standin) serve mixed traffic. Swapping on every arrival (llama-swap's policy,
and this gateway's before issue 17) pays a cold start for nearly every change of model and makes requests queue
behind other models' loads; a policy that keeps a busy model resident for a while (``swap: min_residency``,
``max_wait``, ``linger``) and puts the loser to sleep instead of stopping it (``sleep: {level: 1}``: vLLM's
/sleep and /wake_up) should pay far fewer cold starts and bound the waits. Two seeded JSON-lines traces
(tests/bench/traces/, ``--trace NAME``, repeatable, or ``all``, the default):

* ``agent_mix``: an agent alternating between the big and the small model every turn (sequential turns, short
  think times), an interactive client on the small model, and bursts of background batch requests to the big
  one (``X-Priority: -5``). Every policy must swap twice per agent turn here;
* ``two_clients_agents``: two sequential clients, one on each model, each sending its next request 0.1-0.5 s
  after its previous answer for the whole trace (the issue's "every single request caused a cold start"),
  three agents alternating big/small every turn at once, and two batch bursts to big.

Each trace is replayed against a fresh gateway per policy:

1. ``on-arrival``: ``swap: {min_residency: 0, max_wait: 0, linger: 0, round_trip: false}``, no ``sleep:`` (the
   baseline);
2. ``residency``: the new policy (the trace's ``swap``, ``RESIDENCY`` below, or ``--swap`` for every trace),
   no ``sleep:``;
3. ``residency+sleep``: the same, with ``sleep: {level: 1}`` on both models.

The stand-ins model the costs (STANDIN_FAULTS): a cold start (``startup-delay``: 4 s big, 2 s small), prefill
(``first-token-delay``) and decoding (``token-interval``), and, where the stand-in knows them, ``sleep-delay``
and ``wake-delay`` (0.3 / 0.4 s). Clients are asyncio tasks on httpx, every request a stream with
``ignore_eos`` (so an answer is exactly ``max_tokens`` tokens): a sequential client's next request starts when
its previous answer is done plus its think time (and never before its recorded time ``t``); batch requests are
sent at their recorded time whatever happens. Before the replay each gateway is warmed up (one request to the
small model, then one to the big one, so big is resident and small stopped or asleep, as on a gateway that has
run a while): the figures are the policy's steady state, not the two first loads every policy pays alike
(``--cold`` starts with nothing loaded; the warm-up's launches are shown apart).

Per policy: swaps (a change of the model holding the GPU: a cold start or a wake of the other model, read from
the stand-ins' record files); cold starts (engine launches: the admin rows' ``launches``, next to
``gateway_engine_startup_seconds_count``, the launches that became ready, and the stand-ins' ``start``
records); wakes (the stand-ins' ``wake`` records, else the POST /wake_up that reached them); each request's wait
(the time to the response headers: the gateway sends them once a replica holds the request and the engine
answered, and a stand-in's stream headers go out at once, before its ``first-token-delay``; the gateway has no
queue-wait metric), as p50, p99 and max; p50/p99 completion time (to ``data: [DONE]``); failed requests (not
200, an error event, no ``[DONE]``, a timeout). Prints a markdown table and the targets' checks per trace;
``--out`` writes every figure and every request as JSON. Exit status 0, 1 when a required check fails (on any
trace), 2 when a gateway could not be started. Every gateway is stopped with SIGTERM (its own drain and engine
stop), and nothing it launched may outlive it, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import REPO, Gateway, free_port, standin_command, stop_gateway, wait_until
from tests.standin import _faults

TRACES_DIR = Path(__file__).resolve().parent / "traces"
SEED = 17
TWO_CLIENTS_AGENT_TURNS = 3  # two_clients_agents: each agent's turns (a big call, then a small one)


@dataclass(frozen=True)
class Cost:
    """What a stand-in engine charges (STANDIN_FAULTS): load, prefill, one token, sleep and wake."""

    startup: float
    first_token: float
    token: float
    sleep: float = 0.3
    wake: float = 0.4

    def service(self, tokens: int) -> float:
        return self.first_token + tokens * self.token


COSTS = {
    "big": Cost(startup=4.0, first_token=0.25, token=0.025),
    "small": Cost(startup=2.0, first_token=0.08, token=0.01),
}
SLEEP_RAM_GB = {"big": 8.0, "small": 2.0}
SWAP_SLACK_S = 1.0  # a swap's time beyond the load itself: the stop, the probes that see the new engine ready


@dataclass(frozen=True)
class Record:
    """One request of the trace. ``think``: a sequential client's pause after its previous answer (None: sent
    at ``t`` whatever happened before, as a batch job does)."""

    t: float
    client: str
    model: str
    max_tokens: int
    prompt_words: int
    priority: int = 0
    think: float | None = None


# -- the trace -----------------------------------------------------------------------------------------------


Turn = tuple[str, int, int, float]  # model, max_tokens, prompt words, think time before it


def _sequential(records: list[Record], client: str, start: float, turns: list[Turn]) -> None:
    """A client that sends its next request when its previous answer is done plus its think time."""
    done = start
    for i, (model, max_tokens, words, think) in enumerate(turns):
        t = start if i == 0 else done + think
        records.append(Record(round(t, 2), client, model, max_tokens, words, 0, 0.0 if i == 0 else think))
        done = t + COSTS[model].service(max_tokens)


def _agent_turns(rng: random.Random, turns: int) -> list[Turn]:
    """An agent: each turn a call to the big model (its context grows), then a short one to the small model."""
    out: list[Turn] = []
    for turn in range(turns):
        out.append(
            ("big", rng.randint(40, 64), 400 + 150 * turn + rng.randint(0, 100), round(rng.uniform(0.5, 1.5), 2))
        )
        out.append(("small", rng.randint(8, 24), rng.randint(100, 300), round(rng.uniform(0.3, 1.0), 2)))
    return out


def _batch_bursts(records: list[Record], rng: random.Random, times: tuple[float, ...], size: int) -> None:
    """Background batch jobs on the big model: bursts of ``size``, low priority, sent at their time."""
    for burst, at in enumerate(times):
        start = at + rng.uniform(-1.0, 1.0)
        for _ in range(size):
            start += rng.uniform(0.0, 0.15)
            records.append(
                Record(round(start, 2), f"batch{burst}", "big", rng.randint(64, 96), rng.randint(200, 500), -5)
            )


def make_agent_mix(seed: int = SEED) -> list[Record]:
    """One agent alternating big/small per turn, an interactive user of small, batch bursts to big.
    Deterministic for a seed; ``t`` is when each request was sent in the recording, i.e. with no waiting at all
    (every answer took its engine's service time)."""
    rng = random.Random(seed)
    records: list[Record] = []
    _sequential(records, "agent", 1.0, _agent_turns(rng, 6))
    # An interactive user of the small model: a question, reading, the next question.
    chat = [("small", rng.randint(16, 48), rng.randint(20, 80), round(rng.uniform(2.5, 6.0), 2)) for _ in range(9)]
    _sequential(records, "chat", 3.0, chat)
    _batch_bursts(records, rng, (12.0, 28.0, 44.0), 5)
    return sorted(records, key=lambda r: (r.t, r.client))


def _until(rng: random.Random, start: float, end: float, draw: Callable[[random.Random], Turn]) -> list[Turn]:
    """A sequential client's requests: the first at ``start``, each next one sent before ``end``."""
    turns: list[Turn] = []
    sent = start
    while sent < end:
        turn = draw(rng)
        if turns:
            sent += turn[3]
            if sent >= end:
                break
        turns.append(turn)
        sent += COSTS[turn[0]].service(turn[1])
    return turns


def make_two_clients_agents(seed: int = SEED) -> list[Record]:
    """Three agents alternating big/small every turn, concurrently (staggered starts); two sequential clients,
    one per model, each sending its next request 0.1-0.5 s after its previous answer for as long as the agents
    run; two batch bursts to big. The case swap-on-arrival thrashes on: each client's next request finds the
    other model resident. Deterministic for a seed; ``t`` as recorded with no waiting."""
    rng = random.Random(seed)
    records: list[Record] = []
    for k, start in enumerate((1.5, 3.0, 4.5)):
        _sequential(records, f"agent{k}", start, _agent_turns(rng, TWO_CLIENTS_AGENT_TURNS))
    end = max(r.t + COSTS[r.model].service(r.max_tokens) for r in records)

    def big(r: random.Random) -> Turn:
        return ("big", r.randint(24, 64), r.randint(150, 600), round(r.uniform(0.1, 0.5), 2))

    def small(r: random.Random) -> Turn:
        return ("small", r.randint(32, 96), r.randint(40, 200), round(r.uniform(0.1, 0.5), 2))

    _sequential(records, "user_big", 0.5, _until(rng, 0.5, end, big))
    _sequential(records, "user_small", 0.7, _until(rng, 0.7, end, small))
    _batch_bursts(records, rng, (end * 0.3, end * 0.7), 5)
    return sorted(records, key=lambda r: (r.t, r.client))


def write_trace(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))


def read_trace(path: Path) -> list[Record]:
    return [Record(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


# A 1 s floor: the residency itself follows each swap's measured round trip (a 4 + 2 s pair of cold starts
# here, or two wakes of ~0.5 s), bounded by max_wait (scaled to the stand-ins' 4 s cold start).
RESIDENCY = {"min_residency": 1.0, "max_wait": 8.0, "linger": 1.0}


@dataclass(frozen=True)
class TraceSpec:
    """A committed trace: how it is made (``--make-trace``) and the new policy's ``swap:`` replayed on it."""

    name: str
    make: Callable[[int], list[Record]] | None  # None: a file given by path, not generated here
    about: str
    swap: dict[str, float] = field(default_factory=lambda: dict(RESIDENCY))
    seed: int = SEED
    file: Path | None = None

    @property
    def path(self) -> Path:
        return self.file or TRACES_DIR / f"{self.name}.jsonl"


TRACES = {
    t.name: t
    for t in (
        TraceSpec(
            "agent_mix",
            make_agent_mix,
            "One agent alternating big/small every turn, an interactive user of small, batch bursts to big",
        ),
        TraceSpec(
            "two_clients_agents",
            make_two_clients_agents,
            "Two sequential clients (one on big, one on small, 0.1-0.5 s think), three agents alternating "
            "big/small every turn, batch bursts to big",
        ),
    )
}


# -- the policies and the gateway's config -------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    name: str
    swap: dict[str, float]
    sleep: bool


def policies(swap: dict[str, float]) -> dict[str, Policy]:
    return {
        "on-arrival": Policy(
            "on-arrival", {"min_residency": 0, "max_wait": 0, "linger": 0, "round_trip": False}, False
        ),
        "residency": Policy("residency", swap, False),
        "residency+sleep": Policy("residency+sleep", swap, True),
    }


def sleep_faults_known() -> bool:
    """Whether the vLLM stand-in models sleep and wake (an unknown fault key would make it exit 2 at start)."""
    return "sleep-delay" in _faults.KEYS and "wake-delay" in _faults.KEYS


def gateway_config(policy: Policy, workdir: Path, port: int) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for name, cost in COSTS.items():
        faults = f"startup-delay={cost.startup},first-token-delay={cost.first_token},token-interval={cost.token}"
        if sleep_faults_known():
            faults += f",sleep-delay={cost.sleep},wake-delay={cost.wake}"
        spec: dict[str, Any] = {
            "engine": "vllm",
            "model": f"org/{name}",
            "command": standin_command("vllm"),
            "load": "on_demand",
            "gpus": [0],
            "health": {"interval": 0.3, "startup_interval": 0.1},
            "stop_grace": 2,
            "env": {"STANDIN_FAULTS": faults, "STANDIN_RECORD": str(workdir / f"{name}.jsonl")},
        }
        if policy.sleep:
            spec["sleep"] = {"level": 1, "ram_gb": SLEEP_RAM_GB[name]}
        models[name] = spec
    return {
        "server": {"host": "127.0.0.1", "port": port, "queue_timeout": 300, "access_log": False},
        "swap": {**policy.swap, "sleep_ram_gb": sum(SLEEP_RAM_GB.values()) * 2},
        "models": models,
    }


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Signals ignored while a gateway is being stopped, so a second Ctrl-C cannot leave its engines behind."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class StartError(RuntimeError):
    pass


@contextlib.contextmanager
def gateway(policy: Policy, workdir: Path) -> Iterator[Gateway]:
    """A real gateway process (its own session) for one policy; stopped by SIGTERM, its engines checked gone."""
    port = free_port()
    config_path = workdir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(gateway_config(policy, workdir, port)))
    log_path = workdir / "gateway.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    gw = Gateway(proc, port, log_path)
    try:

        def ready() -> bool:
            try:
                return httpx.get(gw.url + "/ready", timeout=1).status_code == 200 or proc.poll() is not None
            except httpx.HTTPError:
                return proc.poll() is not None

        if not wait_until(ready, 60) or proc.poll() is not None:
            raise StartError(f"gateway for {policy.name} did not start (exit {proc.poll()}):\n{gw.log()[-3000:]}")
        yield gw
    finally:
        with _shielded():
            stop_gateway(gw)  # SIGTERM and wait (SIGKILL after 30 s); raises if an engine process outlived it


# -- the replay ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    record: Record
    sent: float = math.nan  # seconds from the replay's start
    headers: float = math.nan  # response headers: the wait ends
    first_token: float = math.nan
    done: float = math.nan
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and not math.isnan(self.done)

    @property
    def wait(self) -> float:
        return self.headers - self.sent

    @property
    def completion(self) -> float:
        return self.done - self.sent


def _prompt(record: Record, index: int) -> str:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    return " ".join([f"{record.client}-{index}"] + [words[i % len(words)] for i in range(record.prompt_words - 1)])


async def _one(client: httpx.AsyncClient, url: str, record: Record, index: int, t0: float, result: Result) -> None:
    body = {
        "model": record.model,
        "messages": [{"role": "user", "content": _prompt(record, index)}],
        "max_tokens": record.max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"X-Priority": str(record.priority), "X-Session-ID": record.client}
    result.sent = time.monotonic() - t0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            result.headers = time.monotonic() - t0
            result.status = response.status_code
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                if math.isnan(result.first_token):
                    result.first_token = time.monotonic() - t0
                data = line[5:].strip()
                if data == "[DONE]":
                    result.done = time.monotonic() - t0
                elif data.startswith('{"error"'):
                    result.error = f"error event: {data[:200]}"
            if math.isnan(result.done) and result.error is None:
                result.error = "stream ended without [DONE]"
    except asyncio.CancelledError:
        result.error = result.error or "cancelled at the replay's time limit"
        raise
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"


async def replay(url: str, trace: list[Record], limit_s: float) -> list[Result]:
    """Every record once, in the trace's order per client; all unfinished work is cancelled after ``limit_s``."""
    results = [Result(r) for r in trace]
    by_client: dict[str, list[int]] = {}
    for i, r in enumerate(trace):
        by_client.setdefault(r.client, []).append(i)
    timeout = httpx.Timeout(connect=10, read=limit_s, write=10, pool=10)
    limits = httpx.Limits(max_connections=len(trace), max_keepalive_connections=len(trace))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.monotonic()

        async def at(t: float) -> None:
            await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))

        async def sequential(indices: list[int]) -> None:
            for n, i in enumerate(indices):
                r = results[i].record
                if n:
                    await asyncio.sleep(r.think or 0.0)
                await at(r.t)
                await _one(client, url, r, i, t0, results[i])

        async def open_loop(i: int) -> None:
            await at(results[i].record.t)
            await _one(client, url, results[i].record, i, t0, results[i])

        tasks = []
        for indices in by_client.values():
            if trace[indices[0]].think is None:
                tasks += [asyncio.create_task(open_loop(i)) for i in indices]
            else:
                tasks.append(asyncio.create_task(sequential(indices)))
        _, pending = await asyncio.wait(tasks, timeout=limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for res in results:
        if math.isnan(res.sent):
            res.error = "not sent before the replay's time limit"
    return results


# -- what the gateway and the engines saw --------------------------------------------------------------------


def engine_events(workdir: Path) -> list[tuple[float, str, str]]:
    """(ts, model, what) in time order: every engine launch ('start'), sleep ('sleep') and wake ('wake'), from
    the stand-ins' record files: their own ``sleep``/``wake`` records where they write them (a wake that left
    something asleep does not count), else the POST /sleep and /wake_up requests that reached them."""
    events = []
    for name in COSTS:
        path = workdir / f"{name}.jsonl"
        if not path.exists():
            continue
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        own = any(r["event"] in ("sleep", "wake") for r in recs)
        for rec in recs:
            kind, where = rec["event"], rec.get("path")
            if kind == "start":
                events.append((rec["ts"], name, "start"))
            elif (own and kind == "sleep") or (not own and kind == "request" and where == "/sleep"):
                events.append((rec["ts"], name, "sleep"))
            elif own and kind == "wake" and rec.get("awake", True):
                events.append((rec["ts"], name, "wake"))
            elif not own and kind == "request" and where in ("/wake_up", "/wakeup"):
                events.append((rec["ts"], name, "wake"))
    return sorted(events)


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def gateway_figures(gw: Gateway) -> dict[str, Any]:
    """The admin rows (launches, restarts, and any count the sleep support adds) and the metrics that name
    engine start-ups, swaps, sleeps, wakes or waits."""
    out: dict[str, Any] = {"engines": [], "metrics": {}}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        rows = httpx.get(gw.url + "/admin/engines", timeout=5).json()["data"]
        keep = ("model", "replica", "state", "launches", "restarts", "wakes", "sleeps", "swaps")
        out["engines"] = [{k: row[k] for k in keep if k in row} for row in rows]
    with contextlib.suppress(httpx.HTTPError):
        text = httpx.get(gw.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if (
                m
                and not m["name"].endswith("_bucket")
                and re.search(r"startup_seconds_count|swap|sleep|wake|queue_wait|wait_seconds", m["name"])
            ):
                out["metrics"][f"{m['name']}{{{m['labels'] or ''}}}"] = float(m["value"])
    return out


# -- figures -------------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of fewer than 100 values is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


@dataclass
class Summary:
    policy: str
    swap: dict[str, float]
    sleep: bool
    wall_s: float
    requests: int
    failed: int
    cold_starts: int  # launches, as the admin rows count them (the stand-ins' start records without them)
    standin_starts: int  # stand-ins that got as far as starting (their record files)
    startups_ready: int | None  # gateway_engine_startup_seconds_count: launches that became ready
    wakes: int
    wakes_metric: int | None  # gateway_engine_wake_seconds_count, where the gateway has it
    warm_up_cold_starts: int | None  # launches before the replay (the warm-up), not counted above
    sleeps: int
    swaps: int
    wait_p50: float
    wait_p99: float
    wait_max: float
    completion_p50: float
    completion_p99: float
    by_model: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    gateway: dict[str, Any] = field(default_factory=dict)
    requests_detail: list[dict[str, Any]] = field(default_factory=list)


def _count(figures: dict[str, Any], metric: str) -> int | None:
    found = [v for k, v in figures["metrics"].items() if k.startswith(metric + "{")]
    return int(sum(found)) if found else None


def _launches(figures: dict[str, Any]) -> int | None:
    rows = figures["engines"]
    return sum(int(row["launches"]) for row in rows) if rows and all("launches" in r for r in rows) else None


def _since(after: int | None, before: int | None) -> int | None:
    return None if after is None else after - (before or 0)


def summarize(
    policy: Policy,
    wall_s: float,
    results: list[Result],
    workdir: Path,
    figures: dict[str, Any],
    before: dict[str, Any],
    since: float,
) -> Summary:
    """The figures of one replay: engine events from wall-clock ``since`` on, counters less ``before``'s."""
    events = engine_events(workdir)
    loads = [(ts, model) for ts, model, what in events if what in ("start", "wake")]
    swaps = sum(1 for a, b in itertools.pairwise(loads) if b[0] >= since and a[1] != b[1])
    events = [e for e in events if e[0] >= since]
    done = [r for r in results if r.ok]
    waits = [r.wait for r in results if r.status == 200]  # a 503 at once is a failure, not a short wait
    launches = _since(_launches(figures), _launches(before))
    startups = "gateway_engine_startup_seconds_count"
    wakes = "gateway_engine_wake_seconds_count"
    starts = sum(1 for _, _, what in events if what == "start")
    by_model = {}
    for name in COSTS:
        mine = [r for r in results if r.record.model == name and r.status == 200]
        by_model[name] = {
            "requests": float(sum(1 for r in results if r.record.model == name)),
            "wait_p50": pct([r.wait for r in mine], 0.5),
            "wait_p99": pct([r.wait for r in mine], 0.99),
            # the wait seen another way: time to the first event less the engine's own first-token delay
            "ttft_less_prefill_p50": pct([r.first_token - r.sent - COSTS[name].first_token for r in mine], 0.5),
        }
    return Summary(
        policy=policy.name,
        swap=policy.swap,
        sleep=policy.sleep,
        wall_s=round(wall_s, 1),
        requests=len(results),
        failed=len(results) - len(done),
        cold_starts=launches if launches is not None else starts,
        standin_starts=starts,
        startups_ready=_since(_count(figures, startups), _count(before, startups)),
        wakes=sum(1 for _, _, what in events if what == "wake"),
        wakes_metric=_since(_count(figures, wakes), _count(before, wakes)),
        warm_up_cold_starts=_launches(before),
        sleeps=sum(1 for _, _, what in events if what == "sleep"),
        swaps=swaps,
        wait_p50=pct(waits, 0.5),
        wait_p99=pct(waits, 0.99),
        wait_max=max(waits, default=math.nan),
        completion_p50=pct([r.completion for r in done], 0.5),
        completion_p99=pct([r.completion for r in done], 0.99),
        by_model=by_model,
        failures=[f"{r.record.client} {r.record.model} t={r.record.t}: {r.error}" for r in results if not r.ok],
        gateway=figures,
        requests_detail=[
            {
                **asdict(r.record),
                "sent": r.sent,
                "wait": r.wait,
                "ttft": r.first_token - r.sent,
                "completion": r.completion,
                "status": r.status,
                "error": r.error,
            }
            for r in results
        ],
    )


def swap_time() -> float:
    """One swap's time: the slowest load plus the stop and the probes' lag (SWAP_SLACK_S)."""
    return max(c.startup for c in COSTS.values()) + SWAP_SLACK_S


@dataclass(frozen=True)
class Check:
    text: str
    ok: bool
    required: bool = True  # False: "ideally" (reported, not part of the exit status)


def checks(summaries: dict[str, Summary]) -> list[Check]:
    """The issue's targets for the policies that ran: residency+sleep must meet them, residency ideally."""
    out: list[Check] = []
    base = summaries.get("on-arrival")
    for name in ("residency+sleep", "residency"):
        s = summaries.get(name)
        if s is None:
            continue
        required = name == "residency+sleep"
        tag = "" if required else " (ideally)"
        if base is not None:
            failed = s.failed + base.failed
            why = f" (not comparable: {failed} requests failed)" if failed else ""
            out.append(
                Check(
                    f"{name}: cold starts {s.cold_starts} ≤ on-arrival's {base.cold_starts} / 3{tag}{why}",
                    not failed and s.cold_starts * 3 <= base.cold_starts,
                    required,
                )
            )
            out.append(
                Check(
                    f"{name}: p99 wait {s.wait_p99:.2f} s ≤ on-arrival's {base.wait_p99:.2f} s / 2{tag}{why}",
                    not failed and s.wait_p99 * 2 <= base.wait_p99,
                    required,
                )
            )
        bound = s.swap["max_wait"] + swap_time()
        out.append(
            Check(f"{name}: max wait {s.wait_max:.2f} s ≤ max_wait + one swap = {bound:g} s", s.wait_max <= bound)
        )
    for s in summaries.values():
        out.append(Check(f"{s.policy}: no request failed ({s.failed} of {s.requests})", s.failed == 0))
    return out


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def table(summaries: dict[str, Summary]) -> str:
    cols = list(summaries.values())
    rows: list[tuple[str, Callable[[Summary], str]]] = [
        ("swap:", lambda s: ", ".join(f"{k} {v:g}" for k, v in s.swap.items())),
        ("sleep: {level: 1}", lambda s: "yes" if s.sleep else "no"),
        ("swaps (GPU changed hands)", lambda s: str(s.swaps)),
        ("cold starts (engine launches)", lambda s: str(s.cold_starts)),
        ("  of which ready / stand-ins started", lambda s: f"{_n(s.startups_ready)} / {s.standin_starts}"),
        ("  before the replay (warm-up, not counted)", lambda s: _n(s.warm_up_cold_starts)),
        ("wakes (sleeps)", lambda s: f"{s.wakes} ({s.sleeps})"),
        ("  wakes by the gateway's metric", lambda s: _n(s.wakes_metric)),
        ("wait p50 / p99", lambda s: f"{s.wait_p50:.2f} / {s.wait_p99:.2f} s"),
        ("wait max", lambda s: f"{s.wait_max:.2f} s"),
        ("completion p50 / p99", lambda s: f"{s.completion_p50:.2f} / {s.completion_p99:.2f} s"),
        ("requests failed", lambda s: f"{s.failed} of {s.requests}"),
        ("replay wall time", lambda s: f"{s.wall_s:.1f} s"),
    ]
    lines = ["| | " + " | ".join(s.policy for s in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(fmt(s) for s in cols) + " |" for label, fmt in rows]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------------------


def _parse_swap(text: str) -> dict[str, float]:
    out = dict(RESIDENCY)
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        if key not in out:
            raise argparse.ArgumentTypeError(f"--swap: unknown key {key!r} (min_residency, max_wait, linger)")
        out[key] = float(value)
    return out


def _finite(data: Any) -> Any:
    """NaN (a figure with no sample) as null: strict JSON readers refuse NaN."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def warm_up(gw: Gateway, policy: Policy) -> None:
    """Both models once (small, then big), as a gateway that has run for a while has them: big resident, small
    stopped or asleep. Then the replay measures the policy's steady state, not the first loads every policy
    pays alike."""
    for name in ("small", "big"):
        body = {"model": name, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1}
        response = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=60)
        if response.status_code != 200:
            raise StartError(
                f"{policy.name}: the warm-up request to {name} got {response.status_code}: {response.text}"
            )

    def settled() -> bool:
        rows = {row["model"]: row["state"] for row in gateway_figures(gw)["engines"]}
        return rows.get("big") == "ready" and rows.get("small") in ("stopped", "sleeping")

    if not wait_until(settled, 30, 0.2):
        raise StartError(f"{policy.name}: after the warm-up the engines did not settle: {gateway_figures(gw)}")


def run_policy(policy: Policy, trace: list[Record], limit_s: float, keep: Path | None, warm: bool) -> Summary:
    with contextlib.ExitStack() as stack:
        if keep is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="swap-trace-")))
        else:
            workdir = keep / policy.name
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
        with gateway(policy, workdir) as gw:
            if warm:
                warm_up(gw, policy)
            before = gateway_figures(gw)
            since, started = time.time(), time.monotonic()
            results = asyncio.run(replay(gw.url, trace, limit_s))
            wall = time.monotonic() - started
            time.sleep(0.5)  # the last releases reach the admin rows and metrics
            figures = gateway_figures(gw)
            figures["log_problems"] = [
                line for line in gw.log().splitlines() if " WARNING " in line or " ERROR " in line
            ][-8:]
        return summarize(policy, wall, results, workdir, figures, before, since)


def _traces(names: list[str]) -> list[TraceSpec]:
    """``--trace`` values: a committed trace's name, ``all``, or a path to a JSON-lines file (replayed with the
    default residency setting)."""
    out: dict[str, TraceSpec] = {}
    for name in names or ["all"]:
        if name == "all":
            out.update(TRACES)
        elif name in TRACES:
            out[name] = TRACES[name]
        elif name.endswith(".jsonl"):
            path = Path(name)
            out[path.stem] = TraceSpec(path.stem, None, f"Read from {path}", file=path)
        else:
            raise argparse.ArgumentTypeError(f"--trace: unknown trace {name!r} (known: {', '.join(TRACES)}, all)")
    return list(out.values())


def report(spec: TraceSpec, trace: list[Record], summaries: dict[str, Summary], results: list[Check]) -> str:
    """One trace's section: what it is, the residency setting, the table, the checks, the first failures."""
    span = max((r.t for r in trace), default=0.0)
    clients = len({r.client for r in trace})
    swap = ", ".join(f"{k} {v:g}" for k, v in spec.swap.items())
    bound = spec.swap["max_wait"] + swap_time()
    lines = [
        f"## Trace {spec.name}: {len(trace)} requests from {clients} clients over {span:.0f} s as recorded",
        "",
        f"{spec.about}. Residency setting (policies 2 and 3): `swap: {{{swap}}}`; bound on a wait: max_wait + one "
        f"swap = {bound:g} s.",
        "",
        table(summaries),
        "",
    ]
    lines += [f"- {'ok' if c.ok else 'NOT MET'}: {c.text}" for c in results]
    for s in summaries.values():
        lines += [f"- failed ({s.policy}): {failure}" for failure in s.failures[:5]]
        if s.failures and s.gateway.get("log_problems"):
            lines.append(f"- {s.policy}: the gateway's last warnings: " + " | ".join(s.gateway["log_problems"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--trace",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a trace to replay, repeatable: {', '.join(TRACES)}, all (the default), or a .jsonl path",
    )
    p.add_argument(
        "--make-trace", action="store_true", help="write the --trace traces (default: all) under traces/ and exit"
    )
    p.add_argument("--seed", type=int, help=f"--make-trace's seed (default: each trace's own, {SEED})")
    p.add_argument("--policies", default="on-arrival,residency,residency+sleep", help="which ones, in this order")
    p.add_argument(
        "--swap",
        type=_parse_swap,
        help="the new policy's swap: values for policies 2 and 3, on every trace (default: each trace's own, "
        + ",".join(f"{k}={v:g}" for k, v in RESIDENCY.items())
        + ")",
    )
    p.add_argument("--limit", type=float, default=180.0, help="seconds one policy's replay may take, at most")
    p.add_argument(
        "--cold",
        action="store_true",
        help="start the replay with both models stopped (default: warmed up, big resident, small stopped or asleep)",
    )
    p.add_argument("--out", type=Path, help="write every figure and request here as JSON")
    p.add_argument("--keep", type=Path, help="keep configs, gateway logs and engine records under this folder")
    args = p.parse_args(argv)
    try:
        specs = _traces(args.trace)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if args.swap is not None:
        specs = [replace(spec, swap=args.swap) for spec in specs]
    if args.make_trace:
        for spec in specs:
            if spec.make is None:
                p.error(f"--make-trace: {spec.path} is not a trace made here")
            seed = spec.seed if args.seed is None else args.seed
            records = spec.make(seed)
            write_trace(spec.path, records)
            print(f"wrote {spec.path} ({len(records)} requests, seed {seed})")
        return 0
    chosen = [x.strip() for x in args.policies.split(",") if x.strip()]
    if unknown := [x for x in chosen if x not in policies(RESIDENCY)]:
        p.error(f"unknown policies {unknown} (known: {', '.join(policies(RESIDENCY))})")
    traces = {spec.name: read_trace(spec.path) for spec in specs}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    summaries: dict[str, dict[str, Summary]] = {}
    try:
        for spec in specs:
            trace, known = traces[spec.name], policies(spec.swap)
            summaries[spec.name] = {}
            for name in chosen:
                print(
                    f"{spec.name}: replaying {len(trace)} requests with policy {name} ...", file=sys.stderr, flush=True
                )
                keep = None if args.keep is None else args.keep / spec.name
                try:
                    s = run_policy(known[name], trace, args.limit, keep, not args.cold)
                except StartError as exc:
                    print(str(exc), file=sys.stderr)
                    return 2
                summaries[spec.name][name] = s
                print(
                    f"  {s.wall_s:.0f} s: {s.swaps} swaps, {s.cold_starts} cold starts, {s.wakes} wakes, "
                    f"wait p99 {s.wait_p99:.2f} s, {s.failed} failed",
                    file=sys.stderr,
                    flush=True,
                )
    except KeyboardInterrupt:
        print("interrupted: every gateway stopped", file=sys.stderr)
        return 130
    print(f"# Swap policies on one shared GPU — {time.strftime('%Y-%m-%d %H:%M')}\n")
    costs = ", ".join(
        f"{n}: start {c.startup:g} s, first token {c.first_token:g} s, {c.token * 1000:g} ms/token, "
        f"sleep {c.sleep:g} s, wake {c.wake:g} s"
        for n, c in COSTS.items()
    )
    print(f"Stand-in costs: {costs}.")
    if not sleep_faults_known():
        print("Note: the vLLM stand-in has no sleep-delay / wake-delay fault keys yet: sleep and wake cost nothing.")
    print()
    all_checks: dict[str, list[Check]] = {}
    for spec in specs:
        all_checks[spec.name] = checks(summaries[spec.name])
        print(report(spec, traces[spec.name], summaries[spec.name], all_checks[spec.name]))
    if args.out:
        data = {
            "costs": {n: asdict(c) for n, c in COSTS.items()},
            "sleep_faults_known": sleep_faults_known(),
            "traces": {
                spec.name: {
                    "trace": str(spec.path),
                    "swap": spec.swap,
                    "checks": [asdict(c) for c in all_checks[spec.name]],
                    "policies": {n: asdict(s) for n, s in summaries[spec.name].items()},
                }
                for spec in specs
            },
        }
        args.out.write_text(json.dumps(_finite(data), indent=1, default=str) + "\n")
    return 0 if all(c.ok for found in all_checks.values() for c in found if c.required) else 1


if __name__ == "__main__":
    sys.exit(main())
