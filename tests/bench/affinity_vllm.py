"""Conversation affinity across two real vLLM replicas, measured with vLLM's own prefix-cache counters (issue 17).

    .venv/bin/python tests/bench/affinity_vllm.py          # or: make bench-affinity   (~2.5-3.5 minutes on 2 cores)
    .venv/bin/python tests/bench/affinity_vllm.py --conversations 32 --turns 6 --reps 1 --out /tmp/aff.json

One gateway (``python -m gateway serve``) launches one real vLLM chat model (the CPU build,
scripts/install-vllm.sh; the tiny demo chat model) with ``replicas: 2``: two full vLLM servers on two ports,
started in parallel. Multi-turn conversations are replayed through the gateway with the official ``openai``
SDK: each has its own long system prompt and first user message (a few hundred tokens), and each turn resends
the whole history, the assistant's previous answers included (``max_tokens`` 16, ``ignore_eos``, temperature
0, streamed). ``--clients`` threads run at once, each going round-robin over its share of the conversations,
so conversations interleave and requests overlap.

Two methods, in the same gateway run (vLLM starts once):

* ``affinity``: the gateway as configured (``affinity: true``, the default): the request carries no session
  key, so the gateway hashes the system text + first user message (gateway/proxy/claim.py), and rendezvous
  hashing with bounded load (engines/scheduling/scheduler.py, ``AFFINITY_SLACK``) picks the replica.
* ``scattered``: the stand-in for "no affinity": every request carries a fresh random ``X-Session-ID``, so
  the same hashing sends each request to an independent, uniformly random replica (the bounded-load spill
  still applies), as a load balancer without affinity would. Setting ``affinity: false`` in the spec would
  be the real thing, but a spec change is a new model version (EnginePool.reload: drain, stop, start again:
  two more vLLM starts), and with ``affinity: false`` the least-busy pick takes ties in turn, which on a
  sequential client alternates replicas rather than scattering them.

Before each run every replica's prefix cache is emptied (vLLM's dev-mode ``POST /reset_prefix_cache``: the
config sets ``VLLM_SERVER_DEV_MODE=1``), and each run uses new conversation texts anyway. Around each run the
script reads every replica's ``/metrics`` (``vllm:prefix_cache_hits_total``, ``vllm:prefix_cache_queries_total``
(tokens), ``vllm:request_success_total``, the prefill-time and TTFT histograms) and reports the deltas. Which
replica answered each request is read from the engines' own logs (``--enable-log-requests`` logs "Received
request chatcmpl-<X-Request-Id>", and the gateway forwards the client's ``X-Request-Id``), through the gateway's
``/admin/engines/<model>/logs``. The scheduler's own sticky/spilled counts are read from the gateway's
``gateway_affinity_total{model,outcome}`` (a gateway without it shows "-"); as a cross-check they are also
inferred: the replica each request's affinity key hashes to (the gateway's own ``affinity_of`` and rendezvous
weight, both replicas open) against the replica that served it. ``--enable-prompt-tokens-details`` makes
every answer's usage say its ``cached_tokens``, from which the hit rate of follow-up turns is computed per
request.

On the CPU build vLLM's KV block size is 128 tokens (vllm/platforms/cpu.py; 16 on GPUs): only whole blocks
are cached and hit, so the prompts are several blocks long (``--block-size`` overrides it). As in
vllm_serve.py, each replica's EngineCore is reniced to 19 once ready (it busy-waits for its Worker and would
starve the API server on 2 cores). vLLM's "auto" OpenMP binding puts both replicas' Workers on core 0 of a
2-core host; a replica slowed down that way holds its requests longer, the bounded load then spills its
conversations to the other replica, and the comparison measures the host rather than the routing. So the
script pins replica i's Worker threads to core i (``--no-pin-workers``: as launched). The times stay noisy
(everything else shares the two cores) and secondary: the counters are the measurement.

Bounded (``--budget`` seconds, default 480, for the whole script); the gateway is stopped with SIGTERM (it stops
both vLLMs) on exit, on an error, on Ctrl-C, SIGTERM or SIGHUP. Prints a markdown table; ``--out`` gets the JSON
(every request, every counter), and the gateway's log goes beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engines.scheduling.scheduler import _weight  # noqa: E402  (the rendezvous weight, to infer sticky/spilled)
from gateway.proxy.claim import affinity_of  # noqa: E402
from tests.bench.vllm_host import VLLM_ENV as HOST_ENV  # noqa: E402
from tests.bench.vllm_host import children, free_port, install_vllm  # noqa: E402

MODEL = "tiny-chat"
REPLICAS = 2
VLLM_ENV = {**HOST_ENV, "VLLM_SERVER_DEV_MODE": "1"}  # POST /reset_prefix_cache between runs
METHODS = {
    "affinity": "prompt hash (system + first user message), affinity: true",
    "scattered": "a fresh random X-Session-ID per request (no affinity)",
}
# Enough distinct words for distinct texts; the demo tokenizer (384 tokens) makes ~4.6 tokens of a word.
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
    "romeo sierra tango uniform victor whiskey xray yankee zulu model engine router cache prefix token stream "
    "replica gateway request answer server quick brown fox lazy dog help today image river mountain ocean "
    "forest desert valley city harbor bridge tower garden market library museum station airport"
).split()
COUNTERS = (  # per replica, summed over label sets: (JSON key, metric name in /metrics)
    ("queries", "vllm:prefix_cache_queries_total"),
    ("hits", "vllm:prefix_cache_hits_total"),
    ("requests", "vllm:request_success_total"),
    ("prompt_tokens", "vllm:prompt_tokens_total"),
    ("prefill_s", "vllm:request_prefill_time_seconds_sum"),
    ("prefill_n", "vllm:request_prefill_time_seconds_count"),
    ("ttft_s", "vllm:time_to_first_token_seconds_sum"),
    ("ttft_n", "vllm:time_to_first_token_seconds_count"),
)
# prometheus_client writes the labels in the order declared (model, outcome).
_AFFINITY = re.compile(r'gateway_affinity_total\{model="(?P<model>[^"]*)",outcome="(?P<outcome>\w+)"\} (?P<value>\S+)')
_RID = re.compile(r"Received request chatcmpl-(aff-[a-z]+\d+-c\d+-t\d+)")


class Stop(Exception):
    """A signal or the time budget: stop, clean up, report nothing."""


def _stop(signum: int, _frame: Any) -> None:
    raise Stop(signal.Signals(signum).name)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settle_replica(replica: int, api_server: int, nice: int, pin: bool) -> None:
    """Renice the replica's EngineCore (API server -> EngineCore -> Worker) and pin its Worker's threads to a
    core of its own: vLLM's "auto" binding puts every replica's Worker on core 0 of a 2-core host."""
    for core_pid in children(api_server, "VLLM::EngineCor"):
        if nice:
            os.setpriority(os.PRIO_PROCESS, core_pid, nice)
            log(f"replica {replica}: EngineCore (pid {core_pid}) reniced to {nice}")
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < REPLICAS:
            continue
        core = cpus[replica % len(cpus)]
        for worker in children(core_pid, "VLLM::Worker"):
            for task in Path(f"/proc/{worker}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), {core})
            log(f"replica {replica}: Worker (pid {worker}) pinned to core {core}")


# ---- the gateway -----------------------------------------------------------------------------------------------


def config(venv: Path, model_dir: Path, port: int, args: argparse.Namespace) -> dict[str, Any]:
    engine_args: dict[str, Any] = {
        "max-model-len": args.max_model_len,
        "dtype": "bfloat16",
        "enable-prefix-caching": True,  # vLLM 0.32's default (CacheConfig), said explicitly
        "enable-prompt-tokens-details": True,  # usage.prompt_tokens_details.cached_tokens per answer
        "enable-log-requests": True,  # "Received request chatcmpl-<X-Request-Id>": which replica served it
    }
    if args.block_size:
        engine_args["block-size"] = args.block_size
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "models": {
            MODEL: {
                "engine": "vllm",
                "model": str(model_dir),
                "command": [str(venv / "bin" / "vllm")],
                "replicas": REPLICAS,
                "affinity": True,
                "args": engine_args,
                "env": VLLM_ENV,
                "startup_timeout": args.start_timeout,
                "health": {"startup_interval": 0.5, "interval": 2},
                "stop_grace": 10,
            }
        },
    }


@contextlib.contextmanager
def gateway(venv: Path, model_dir: Path, work: Path, log_path: Path, args: argparse.Namespace) -> Iterator[str]:
    """The gateway launching two vLLM replicas; yields its base URL once both are ready."""
    port = free_port()
    config_path = work / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config(venv, model_dir, port, args)))
    out = open(log_path, "wb")  # closed in the finally below
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout + 30
        log(f"starting {REPLICAS} vLLM replicas behind the gateway (log: {log_path}) ...")
        while True:
            if proc.poll() is not None:
                sys.exit(f"bench-affinity: the gateway exited {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                rows = httpx.get(f"{url}/admin/engines/{MODEL}", timeout=2).json()["data"]
                if len(rows) == REPLICAS and all(r["state"] == "ready" for r in rows):
                    break
            if time.monotonic() > deadline:
                sys.exit(f"bench-affinity: not ready in {args.start_timeout:.0f} s; see {log_path}")
            time.sleep(1)
        yield url
    finally:
        signal.alarm(0)  # the budget does not cut the cleanup short
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the gateway stops both vLLMs (their process groups) before it exits
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.close()


def engines(url: str) -> list[dict[str, Any]]:
    rows = httpx.get(f"{url}/admin/engines/{MODEL}", timeout=10).json()["data"]
    return sorted(rows, key=lambda r: int(r["replica"]))


def scrape(port: int) -> dict[str, float]:
    """Every ``vllm:`` sample of a replica's /metrics, summed over label sets (one engine per replica here)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        with contextlib.suppress(ValueError):
            sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


def gateway_affinity(url: str) -> dict[str, float] | None:
    """The gateway's own ``gateway_affinity_total{model,outcome}`` for the model (the scheduler's sticky and
    spilled counts), or None from a gateway that does not export it."""
    found: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = _AFFINITY.fullmatch(line.strip())
        if match is not None and match["model"] == MODEL:
            found[match["outcome"]] = float(match["value"])
    return found or None


def counters(ports: list[int]) -> list[dict[str, float]]:
    out = []
    for port in ports:
        sums = scrape(port)
        out.append({key: sums.get(name, 0.0) for key, name in COUNTERS})
    return out


def reset_prefix_caches(ports: list[int]) -> None:
    for port in ports:
        for _ in range(20):  # it fails while blocks are held (a request still running): retry
            answer = httpx.post(f"http://127.0.0.1:{port}/reset_prefix_cache", timeout=30)
            if answer.status_code == 200 and answer.json().get("success"):
                break
            time.sleep(0.5)
        else:
            sys.exit(f"bench-affinity: POST /reset_prefix_cache on port {port} kept failing: {answer.text[:200]}")


def served_by(url: str) -> dict[str, int]:
    """Request id -> the replica whose vLLM logged it."""
    found: dict[str, int] = {}
    for replica in range(REPLICAS):
        data = httpx.get(
            f"{url}/admin/engines/{MODEL}/logs", params={"replica": replica, "tail": 100_000}, timeout=10
        ).json()["data"]
        for line in data[0]["lines"]:
            for rid in _RID.findall(line):
                found[rid] = replica
    return found


# ---- the conversations ---------------------------------------------------------------------------------------------


@dataclass
class Record:
    run: str
    method: str
    conversation: int
    turn: int
    request_id: str
    home: int  # the replica this request's affinity key hashes to (both replicas open)
    replica: int = -1  # the one that served it (-1: not found in the engine logs)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    error: str = ""


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def replay(url: str, run: str, method: str, args: argparse.Namespace, stop: threading.Event) -> list[Record]:
    """``args.conversations`` conversations of ``args.turns`` turns, ``args.clients`` at a time."""
    records: list[Record] = []
    lock = threading.Lock()
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def conversation(i: int) -> tuple[list[dict[str, str]], random.Random]:
        rng = random.Random(f"{args.seed}-{run}-{i}")
        system = f"You are assistant {run}-{i:02d}. Remember these words: {words(rng, args.system_words)}"
        first = f"Conversation {run}-{i:02d} begins. {words(rng, args.user_words)}"
        return [{"role": "system", "content": system}, {"role": "user", "content": first}], rng

    def one_client(c: int) -> None:
        mine = [i for i in range(args.conversations) if i % args.clients == c]
        convs = {i: conversation(i) for i in mine}
        for turn in range(1, args.turns + 1):
            for i in mine:  # round-robin over this client's conversations
                if stop.is_set():
                    return
                messages, rng = convs[i]
                if turn > 1:
                    messages.append({"role": "user", "content": f"Turn {turn}: {words(rng, args.followup_words)}"})
                rid = f"aff-{run}-c{i:02d}-t{turn}"
                session = uuid.uuid4().hex if method == "scattered" else None
                key = affinity_of({"messages": messages}, "chat", session.encode() if session else None)
                assert key is not None
                home = max(range(REPLICAS), key=lambda r: _weight(key, r))
                rec = Record(run, method, i, turn, rid, home)
                headers = {"X-Request-Id": rid}
                if session is not None:
                    headers["X-Session-ID"] = session
                text: list[str] = []
                t0 = time.perf_counter()
                try:
                    stream = client.chat.completions.create(
                        model=MODEL,
                        messages=messages,  # type: ignore[arg-type]
                        max_tokens=args.max_tokens,
                        temperature=0,
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_headers=headers,
                        extra_body={"ignore_eos": True},
                    )
                    for chunk in stream:
                        if chunk.choices and not rec.ttft_s:
                            rec.ttft_s = time.perf_counter() - t0
                        for choice in chunk.choices:
                            text.append(choice.delta.content or "")
                        if chunk.usage is not None:
                            rec.prompt_tokens = chunk.usage.prompt_tokens
                            details = chunk.usage.prompt_tokens_details
                            rec.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
                    rec.latency_s = time.perf_counter() - t0
                except openai.OpenAIError as exc:
                    rec.error = f"{type(exc).__name__}: {exc}"[:300]
                messages.append({"role": "assistant", "content": "".join(text)})
                with lock:
                    records.append(rec)

    pool = ThreadPoolExecutor(args.clients, thread_name_prefix="client")
    futures = [pool.submit(one_client, c) for c in range(args.clients)]
    try:
        for f in futures:
            f.result()
    finally:
        stop.set()  # a Stop (signal, budget) while waiting: the other clients end after their current request
        pool.shutdown(wait=True)
        stop.clear()
        client.close()
    return records


# ---- the report ----------------------------------------------------------------------------------------------------


def summarize(
    run: str, method: str, records: list[Record], before: list[dict[str, float]], after: list[dict[str, float]]
) -> dict[str, Any]:
    delta = [{k: a[k] - b[k] for k in a} for b, a in zip(before, after, strict=True)]
    total = {k: sum(d[k] for d in delta) for k in delta[0]}
    ok = [r for r in records if not r.error]
    known = [r for r in ok if r.replica >= 0]
    seen: dict[int, set[int]] = {}
    warm = later = 0
    for r in sorted(known, key=lambda r: (r.conversation, r.turn)):
        replicas = seen.setdefault(r.conversation, set())
        if r.turn > 1:
            later += 1
            warm += r.replica in replicas
        replicas.add(r.replica)
    follow = [r for r in ok if r.turn > 1]
    follow_prompt = sum(r.prompt_tokens for r in follow)
    return {
        "run": run,
        "method": method,
        "method_detail": METHODS[method],
        "requests": len(records),
        "errors": len(records) - len(ok),
        "per_replica": {
            "requests_vllm": [int(d["requests"]) for d in delta],
            "requests_logged": [sum(1 for r in known if r.replica == i) for i in range(REPLICAS)],
            "hits": [int(d["hits"]) for d in delta],
            "queries": [int(d["queries"]) for d in delta],
            "latency_mean_ms": [
                round(1000 * statistics.mean(r.latency_s for r in known if r.replica == i), 1)
                if any(r.replica == i for r in known)
                else None
                for i in range(REPLICAS)
            ],
        },
        "hits": int(total["hits"]),
        "queries": int(total["queries"]),
        "hit_rate": total["hits"] / total["queries"] if total["queries"] else 0.0,
        "followup_hit_rate_usage": sum(r.cached_tokens for r in follow) / follow_prompt if follow_prompt else 0.0,
        "cached_tokens_usage": sum(r.cached_tokens for r in ok),
        "prompt_tokens_usage": sum(r.prompt_tokens for r in ok),
        "mean_prompt_tokens": statistics.mean(r.prompt_tokens for r in ok) if ok else 0.0,
        "attributed": len(known),
        "on_hashed_replica": sum(1 for r in known if r.replica == r.home),
        "elsewhere": sum(1 for r in known if r.replica != r.home),
        "followups_on_warm_replica": warm,
        "followups": later,
        "ttft_mean_ms": 1000 * statistics.mean(r.ttft_s for r in ok) if ok else 0.0,
        "latency_mean_ms": 1000 * statistics.mean(r.latency_s for r in ok) if ok else 0.0,
        "engine_ttft_mean_ms": 1000 * total["ttft_s"] / total["ttft_n"] if total["ttft_n"] else 0.0,
        "engine_prefill_mean_ms": 1000 * total["prefill_s"] / total["prefill_n"] if total["prefill_n"] else 0.0,
        "counters_before": before,
        "counters_after": after,
    }


def table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| run | method | requests (replica 0 / 1) | prefix hits / queries (tokens) | hit rate | follow-up turns: "
        "hit rate (usage) | follow-ups on a replica that saw the conversation | sticky / spilled (gateway) | "
        "sticky / spilled (inferred) | "
        "mean TTFT / latency (client) | mean latency on replica 0 / 1 | mean TTFT / prefill (vLLM) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in runs:
        per = s["per_replica"]["requests_vllm"]
        errors = f", {s['errors']} failed" if s["errors"] else ""
        unattributed = s["requests"] - s["errors"] - s["attributed"]
        unknown = f" ({unattributed} not found in the logs)" if unattributed else ""
        gw = s.get("gateway_affinity")
        own = "-" if gw is None else f"{gw.get('sticky', 0)} / {gw.get('spilled', 0)}"
        lat = " / ".join("-" if v is None else f"{v:.0f}" for v in s["per_replica"]["latency_mean_ms"])
        lines.append(
            f"| {s['run']} | {s['method']} | {s['requests']} ({per[0]} / {per[1]}{errors}) | "
            f"{s['hits']:,} / {s['queries']:,} | {100 * s['hit_rate']:.1f} % | "
            f"{100 * s['followup_hit_rate_usage']:.1f} % | {s['followups_on_warm_replica']} / {s['followups']} | "
            f"{own} | {s['on_hashed_replica']} / {s['elsewhere']}{unknown} | "
            f"{s['ttft_mean_ms']:.0f} / {s['latency_mean_ms']:.0f} ms | {lat} ms | "
            f"{s['engine_ttft_mean_ms']:.0f} / {s['engine_prefill_mean_ms']:.1f} ms |"
        )
    for method in METHODS:
        mine = [s for s in runs if s["method"] == method]
        if len(mine) > 1:
            gws = [s["gateway_affinity"] for s in mine if "gateway_affinity" in s]
            own = (
                f"{sum(g.get('sticky', 0) for g in gws)} / {sum(g.get('spilled', 0) for g in gws)}"
                if len(gws) == len(mine)
                else "-"
            )
            hits, queries = sum(s["hits"] for s in mine), sum(s["queries"] for s in mine)
            lines.append(
                f"| all | {method} | {sum(s['requests'] for s in mine)} | {hits:,} / {queries:,} | "
                f"{100 * hits / max(queries, 1):.1f} % | | "
                f"{sum(s['followups_on_warm_replica'] for s in mine)} / {sum(s['followups'] for s in mine)} | {own} | "
                f"{sum(s['on_hashed_replica'] for s in mine)} / {sum(s['elsewhere'] for s in mine)} | | | |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=16, help="conversations per run (default 16)")
    p.add_argument("--turns", type=int, default=4, help="turns per conversation (default 4)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer, exactly (default 16)")
    p.add_argument("--system-words", type=int, default=100, help="words of each system prompt (~4.6 tokens each)")
    p.add_argument("--user-words", type=int, default=20, help="words of each first user message")
    p.add_argument("--followup-words", type=int, default=8, help="words of each later user message")
    p.add_argument("--reps", type=int, default=2, help="runs per method, alternating: A B, B A, ... (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=2048, help="the demo model's max_position_embeddings")
    p.add_argument("--block-size", type=int, default=0, help="vLLM's KV block size (0: its default, 128 on CPU)")
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--budget", type=int, default=480, help="seconds for the whole script (default 480)")
    p.add_argument("--engine-core-nice", type=int, default=19, help="nice for each EngineCore once ready (0: none)")
    p.add_argument(
        "--pin-workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pin replica i's vLLM Worker to core i (default on; vLLM's own binding puts both on core 0)",
    )
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "bench-affinity" / "affinity.json")
    args = p.parse_args(argv)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, _stop)
    signal.alarm(args.budget)
    t_start = time.monotonic()
    venv = install_vllm("bench-affinity")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gateway_log = args.out.parent / "gateway.log"
    runs: list[dict[str, Any]] = []
    records: list[Record] = []
    stop = threading.Event()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-affinity-") as tmp:
            work = Path(tmp)
            model_dir = work / MODEL
            subprocess.run(
                [sys.executable, "-m", "gateway", "demo-model", "--path", str(model_dir)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            with gateway(venv, model_dir, work, gateway_log, args) as url:
                rows = engines(url)
                ports = [int(r["port"]) for r in rows]
                log(f"ready in {time.monotonic() - t_start:.0f} s: gateway {url}, replicas on ports {ports}")
                if len(set(ports)) != REPLICAS:
                    sys.exit(f"bench-affinity: the replicas share a port: {ports}")
                for row in rows:
                    settle_replica(int(row["replica"]), int(row["engine_pid"]), args.engine_core_nice, args.pin_workers)
                # vLLM's first batches are slower (lazy warm-up): a few requests to each replica, uncounted.
                for port in ports:
                    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60) as c:
                        for n in (8, 300):
                            c.chat.completions.create(
                                model=MODEL,
                                messages=[{"role": "user", "content": words(random.Random(n), n)}],
                                max_tokens=args.max_tokens,
                            )
                missing = [name for _, name in COUNTERS if name not in scrape(ports[0])]
                if missing:
                    sys.exit(f"bench-affinity: vLLM's /metrics lacks {missing}")
                order = [
                    m for rep in range(args.reps) for m in (list(METHODS) if rep % 2 == 0 else list(METHODS)[::-1])
                ]
                for n, method in enumerate(order):
                    run = f"{'ab'[list(METHODS).index(method)]}{n + 1}"
                    reset_prefix_caches(ports)
                    before = counters(ports)
                    gw_before = gateway_affinity(url)
                    t0 = time.monotonic()
                    got = replay(url, run, method, args, stop)
                    took = time.monotonic() - t0
                    time.sleep(1.5)  # vLLM's metrics are published from its engine loop: let the last batch land
                    after = counters(ports)
                    gw_after = gateway_affinity(url)
                    where = served_by(url)
                    for r in got:
                        r.replica = where.get(r.request_id, -1)
                    records += got
                    summary = summarize(run, method, got, before, after)
                    summary["seconds"] = round(took, 1)
                    if gw_before is not None and gw_after is not None:
                        summary["gateway_affinity"] = {
                            k: int(gw_after.get(k, 0) - gw_before.get(k, 0)) for k in gw_after
                        }
                    runs.append(summary)
                    log(
                        f"run {run} ({method}): {len(got)} requests in {took:.1f} s, hit rate "
                        f"{100 * summary['hit_rate']:.1f} %, replicas {summary['per_replica']['requests_vllm']}"
                    )
                health = httpx.get(url + "/health", timeout=10).json()
    except (Stop, KeyboardInterrupt) as exc:
        signal.alarm(0)
        log(f"bench-affinity: stopped ({exc or 'Ctrl-C'}); the gateway and its engines were stopped")
        return 130
    signal.alarm(0)
    load = os.getloadavg()
    print()
    print(
        f"{REPLICAS} replicas of real vLLM 0.32 (CPU, tiny demo chat model) behind one gateway; per run "
        f"{args.conversations} conversations x {args.turns} turns, {args.clients} concurrent clients, "
        f"max_tokens {args.max_tokens}, mean prompt {statistics.mean(s['mean_prompt_tokens'] for s in runs):.0f} "
        f"tokens; prefix caches reset before each run; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    for method, detail in METHODS.items():
        print(f"- {method}: {detail}")
    print()
    print("\n".join(table(runs)))
    print(
        "\n'sticky / spilled (gateway)': the deltas of the gateway's gateway_affinity_total{outcome} ('-': not "
        "exported by this gateway); '(inferred)': the replica that served each request (vLLM's log) against the one "
        "its affinity key hashes to (in 'scattered', the key is the random session id)."
    )
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "load": load,
                "seconds": round(time.monotonic() - t_start, 1),
                "runs": runs,
                "health_after": health,
                "requests": [asdict(r) for r in records],
            },
            indent=1,
        )
    )
    log(f"JSON: {args.out}; gateway log: {gateway_log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
