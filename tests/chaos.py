"""Streams under chaos (docs/RELIABILITY.md J1, J2): many concurrent streams through a real gateway while its
engines are SIGKILLed at random, then the books are checked.

Every request must end, within its deadline, in one of two ways: a complete answer (a stream that ends
with ``[DONE]``), or a well-formed error (an HTTP error in the OpenAI shape, 503s with ``Retry-After``; or a
stream whose last event is an error in that shape, with no ``[DONE]``). A request still open at its deadline
is "hung"; anything else is "malformed". Every process of a killed launch must be gone soon after the kill
(no orphaned workers), and when the load stops the gateway's in-flight and queue gauges read 0 and it holds
exactly the pipes and pidfds of the engines alive (the launches killed left nothing behind).

Used by ``tests/integration/test_chaos.py`` (small and short) and ``tests/bench/chaos.py`` (the soak).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Load:
    streams: int = 20  # concurrent clients, each sending one stream after another
    tokens: int = 50  # max_tokens of every stream (ignore_eos: exactly this many)
    duration: float = 8.0  # seconds of load; streams running at the end finish (or fail) normally
    kill_every: float = 2.0  # seconds between SIGKILLs of a random ready engine; 0: no chaos
    deadline: float = 60.0  # a request not over after this long is hung
    orphan_wait: float = 15.0  # how long a killed launch's processes may take to be gone
    probe_every: float = 0.1  # seconds between GET /health + GET /ready during the load (B4); 0: none
    seed: int = 1


@dataclass
class Report:
    outcomes: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)  # error codes seen, HTTP and in-stream
    events: int = 0  # SSE events received in complete answers
    slowest: float = 0.0
    kills: list[str] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # the first few malformed answers, for the message
    gauges: dict[str, float] = field(default_factory=dict)  # in-flight and queue series not at 0 afterwards
    resources: dict[str, dict[str, int]] = field(default_factory=dict)  # "start"/"end": fds by kind, rss_kb
    probes: list[float] = field(default_factory=list)  # seconds each /health or /ready took under the load

    def problems(self) -> list[str]:
        found = []
        if self.outcomes["hung"] or self.outcomes["malformed"]:
            found.append(f"{self.outcomes['hung']} hung, {self.outcomes['malformed']} malformed: {self.samples}")
        if self.orphans:
            found.append(f"processes of killed launches still alive: {self.orphans}")
        if self.gauges:
            found.append(f"gauges not back to 0: {self.gauges}")
        start, end = self.resources.get("start", {}), self.resources.get("end", {})
        for kind in ("pipe", "anon_inode"):  # engine output pipes, pidfds: one set per live launch
            if start and end.get(kind, 0) > start.get(kind, 0):
                found.append(f"{kind} descriptors {start.get(kind, 0)} → {end.get(kind, 0)}")
        return found


def classify_stream(body: bytes) -> tuple[str, str | None, int]:
    """(outcome, error code, events) of a 200 SSE body, reading only its last events."""
    events = [e for e in body.split(b"\n\n") if e.strip()]
    if not events or body[-2:] != b"\n\n":
        return "malformed", None, len(events)
    last = events[-1]
    if last == b"data: [DONE]":
        return ("ok", None, len(events)) if len(events) >= 2 else ("malformed", None, 1)
    if not last.startswith(b"data: "):
        return "malformed", None, len(events)
    try:
        error = orjson.loads(last[6:]).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return "malformed", None, len(events)
    if isinstance(error, dict) and set(error) == ERROR_KEYS and b"[DONE]" not in body:
        return "error_event", str(error["code"]), len(events)
    return "malformed", None, len(events)


def classify_error(status: int, headers: Any, body: bytes) -> tuple[str, str | None]:
    try:
        error = orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "malformed", None
    if not isinstance(error, dict) or set(error) != ERROR_KEYS:
        return "malformed", None
    if status in (429, 503) and "Retry-After" not in headers:
        return "malformed", None
    return "http_error", str(error["code"])


async def _one(session: aiohttp.ClientSession, url: str, model: str, load: Load, report: Report) -> float:
    """One stream; returns how long to wait before the next (a 503's Retry-After, capped)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "chaos"}],
        "max_tokens": load.tokens,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.monotonic()
    pause = 0.0
    try:
        async with asyncio.timeout(load.deadline):
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                raw = await response.read()
                if response.status == 200:
                    kind, code, events = classify_stream(raw)
                    if kind == "ok":
                        report.events += events
                else:
                    kind, code = classify_error(response.status, response.headers, raw)
                    pause = min(float(response.headers.get("Retry-After", "0") or 0), 0.5)
    except TimeoutError:
        kind, code, raw = "hung", None, b""
    except aiohttp.ClientError as exc:
        kind, code, raw = "malformed", None, repr(exc).encode()
    report.outcomes[kind] += 1
    if code:
        report.codes[code] += 1
    if kind == "malformed" and len(report.samples) < 3:
        report.samples.append(raw[-300:].decode("utf-8", "replace"))
    report.slowest = max(report.slowest, time.monotonic() - started)
    return pause


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    models: list[str],
    until: float,
    load: Load,
    report: Report,
    rng: random.Random,
) -> None:
    while time.monotonic() < until:
        pause = await _one(session, url, rng.choice(models), load, report)
        if pause:
            await asyncio.sleep(pause)


def launch_processes(engine_id: str) -> set[int]:
    """Every live process of one launch: they all carry ``GATEWAY_ENGINE_ID=<model>/<replica>/<launch>``."""
    needle = f"GATEWAY_ENGINE_ID={engine_id}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.add(int(entry))
    return found


def engine_id_of(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        for var in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if var.startswith(b"GATEWAY_ENGINE_ID="):
                return var.split(b"=", 1)[1].decode()
    return None


async def _chaos(
    session: aiohttp.ClientSession,
    url: str,
    until: float,
    load: Load,
    report: Report,
    rng: random.Random,
    killed: list[tuple[float, set[int]]],
) -> None:
    while True:
        await asyncio.sleep(load.kill_every)
        if time.monotonic() >= until:
            return
        async with session.get(url + "/admin/engines") as response:
            rows = (await response.json())["data"]
        ready = [r for r in rows if r["state"] == "ready" and r["engine_pid"]]
        if not ready:
            continue
        row = rng.choice(ready)
        engine_id = engine_id_of(row["engine_pid"])
        tree = launch_processes(engine_id) if engine_id else set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(row["engine_pid"], signal.SIGKILL)
        report.kills.append(f"{row['model']}/{row['replica']} pid {row['engine_pid']}")
        killed.append((time.monotonic(), tree))


# The probes run in a process of their own, so that this client's busy event loop is not in the figures.
_PROBE = """
import http.client, json, sys, time
host, port, seconds, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
conn, took, end = http.client.HTTPConnection(host, port, timeout=30), [], time.monotonic() + seconds
while time.monotonic() < end:
    for path in ("/health", "/ready"):
        started = time.perf_counter()
        conn.request("GET", path)
        conn.getresponse().read()
        took.append(time.perf_counter() - started)
    time.sleep(every)
print(json.dumps(took))
"""


async def _probe(url: str, seconds: float, every: float, report: Report) -> None:
    """What an orchestrator's probes see while the gateway is busy: they must stay fast (cached state)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROBE, host, port, str(seconds), str(every), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    report.probes = orjson.loads(out) if proc.returncode == 0 else []


def gateway_resources(pid: int) -> dict[str, int]:
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kinds[target.split(":", 1)[0] if ":" in target else "file"] += 1
    memory = {
        line.split(":")[0]: int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith(("VmRSS:", "VmHWM:"))
    }
    return {**kinds, "total": sum(kinds.values()), "rss_kb": memory["VmRSS"], "peak_rss_kb": memory["VmHWM"]}


def unsettled_gauges(metrics: str) -> dict[str, float]:
    out = {}
    for line in metrics.splitlines():
        if line.startswith(("gateway_requests_in_flight", "gateway_queue_depth")):
            name, value = line.rsplit(" ", 1)
            if float(value) != 0:
                out[name] = float(value)
    return out


async def _all_ready(session: aiohttp.ClientSession, url: str, limit: float) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        async with session.get(url + "/admin/engines") as response:
            if all(r["state"] == "ready" for r in (await response.json())["data"]):
                return True
        await asyncio.sleep(0.2)
    return False


async def run(url: str, gateway_pid: int, models: list[str], load: Load) -> Report:
    """The load and the chaos against the gateway at ``url``; the report once everything has settled."""
    report = Report()
    rng = random.Random(load.seed)
    killed: list[tuple[float, set[int]]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await _all_ready(session, url, 30)
        report.resources["start"] = gateway_resources(gateway_pid)
        until = time.monotonic() + load.duration
        clients = [
            asyncio.create_task(_client(session, url, models, until, load, report, random.Random(rng.random())))
            for _ in range(load.streams)
        ]
        chaos = asyncio.create_task(_chaos(session, url, until, load, report, rng, killed)) if load.kill_every else None
        if load.probe_every:
            clients.append(asyncio.create_task(_probe(url, load.duration, load.probe_every, report)))
        await asyncio.gather(*clients)
        if chaos is not None:
            chaos.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chaos
        await _all_ready(session, url, 30)  # the last kill's restart, so the resources compare like with like
        for at, tree in killed:
            wait = at + load.orphan_wait - time.monotonic()
            while wait > 0 and any(_alive(p) for p in tree):
                await asyncio.sleep(0.1)
                wait = at + load.orphan_wait - time.monotonic()
            report.orphans += [p for p in tree if _alive(p)]
        async with session.get(url + "/metrics") as response:
            report.gauges = unsettled_gauges(await response.text())
        report.resources["end"] = gateway_resources(gateway_pid)
    return report


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def config(
    *,
    token_interval: float,
    replicas: int = 2,
    models: tuple[str, ...] = ("a", "b"),
    command: list[str],
    total_timeout: float = 60,
) -> dict[str, Any]:
    """A gateway config: vLLM stand-ins that stream one token per ``token_interval`` s; the first model
    has ``replicas`` replicas, the others one; restarts quick and never given up on."""

    def model(n: int) -> dict[str, Any]:
        return {
            "engine": "vllm",
            "model": "org/chaos",
            "command": command,
            "env": {"STANDIN_FAULTS": f"token-interval={token_interval:g},fork-workers=1"},
            "replicas": n,
            "health": {"interval": 0.5, "startup_interval": 0.1},
            "stop_grace": 2,
            "restart": {"initial_delay": 0.1, "max_delay": 0.5, "jitter": 0, "max_restarts": 10_000},
        }

    return {
        "server": {
            "idle_timeout": 5,
            "first_byte_timeout": 10,
            "total_timeout": total_timeout,
            "retry_after": 1,
            "queue_timeout": 5,
        },
        "models": {name: model(replicas if i == 0 else 1) for i, name in enumerate(models)},
    }
