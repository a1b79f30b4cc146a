"""Soak under chaos (docs/RELIABILITY.md J1 + J2, B4): hundreds of concurrent streams through the gateway for a
bounded time while a random engine is SIGKILLed every few seconds.

    .venv/bin/python tests/bench/chaos.py                        # 200 streams x 1,000 tokens at 100/s, 60 s
    .venv/bin/python tests/bench/chaos.py --streams 500 --kill-every 0 --duration 30   # B4: probes, no kills

The gateway fronts vLLM stand-ins (tests/standin): model ``a`` with two replicas, ``b`` with one, each
engine with a worker process under it. Every request must end in success or a well-formed error within
its deadline; afterwards the in-flight and queue gauges must read 0, no process of a killed launch may be
left, the gateway must hold no more pipes and pidfds than at the start, and when it stops no engine
process may outlive it. A separate process times ``GET /health`` and ``GET /ready`` throughout (B4).
Prints a markdown report; exit status 1 when a check fails. Not part of ``make test``
(tests/integration/test_chaos.py is the small version that is).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import chaos
from tests.helpers import run_gateway, standin_command


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=200, help="concurrent clients, one stream after another")
    p.add_argument("--tokens", type=int, default=1000, help="tokens per stream")
    p.add_argument("--rate", type=float, default=100.0, help="tokens per second per stream")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--kill-every", type=float, default=5.0, help="seconds between SIGKILLs (0: no chaos)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="server.workers: processes answering clients")
    args = p.parse_args(argv)
    stream_s = args.tokens / args.rate
    load = chaos.Load(
        streams=args.streams,
        tokens=args.tokens,
        duration=args.duration,
        kill_every=args.kill_every,
        deadline=stream_s * 3 + 60,
        seed=args.seed,
    )
    config = chaos.config(
        token_interval=1 / args.rate, command=standin_command("vllm"), total_timeout=stream_s * 3 + 30
    )
    config["server"]["workers"] = args.workers
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gateway-chaos-") as tmp:
        with run_gateway(config, Path(tmp), ready_timeout=60) as gw:
            report = asyncio.run(chaos.run(gw.url, gw.proc.pid, ["a", "b"], load))
            alive = gw.proc.poll() is None
        # Leaving run_gateway stopped it and checked that no engine process outlived it (raises if one did).
    took = time.monotonic() - started
    problems = report.problems() + ([] if alive else ["the gateway died"])
    done = sum(report.outcomes.values())
    start, end = report.resources["start"], report.resources["end"]
    print(f"# Gateway under chaos — {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(
        f"{args.streams} concurrent streams of {args.tokens} tokens at {args.rate:g} tokens/s for "
        f"{args.duration:g} s, {args.workers} worker process(es), an engine SIGKILLed every {args.kill_every:g} s "
        f"({len(report.kills)} kills); {took:.0f} s in all.\n"
    )
    print("| | value |\n|---|---:|")
    print(f"| requests ended | {done:,} |")
    for kind in ("ok", "error_event", "http_error", "malformed", "hung"):
        print(f"| {kind} | {report.outcomes[kind]:,} |")
    print(f"| error codes | {dict(report.codes) or '-'} |")
    print(f"| events in complete streams | {report.events:,} |")
    print(f"| slowest request | {report.slowest:.2f} s (deadline {load.deadline:g} s) |")
    if report.probes:
        probes_ms = [x * 1000 for x in report.probes]
        print(
            f"| /health + /ready under load: p50 / p99 / max | {statistics.median(probes_ms):.1f} / "
            f"{_pct(probes_ms, 0.99):.1f} / {max(probes_ms):.1f} ms ({len(probes_ms)} probes) |"
        )
    print(
        f"| gateway RSS: start → end (peak) | {start['rss_kb'] / 1024:.1f} → {end['rss_kb'] / 1024:.1f} MB "
        f"({end['peak_rss_kb'] / 1024:.1f} MB) |"
    )
    print(
        f"| gateway fds: start → end | {start['total']} → {end['total']} (pipes {start.get('pipe', 0)} → "
        f"{end.get('pipe', 0)}, anon_inode {start.get('anon_inode', 0)} → {end.get('anon_inode', 0)}, sockets "
        f"{start.get('socket', 0)} → {end.get('socket', 0)}: the engines' keep-alive pool) |"
    )
    print(f"| orphaned processes of killed launches | {len(report.orphans)} |")
    print(f"| gauges not at 0 afterwards | {report.gauges or 'none'} |")
    print("\n" + ("\n".join(f"- PROBLEM: {p}" for p in problems) if problems else "All checks passed."))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
