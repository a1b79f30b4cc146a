"""Soak: does the gateway's memory stay flat and are its file descriptors given back, over many requests?

    .venv/bin/python tests/bench/soak.py                  # 10,000 requests: ~20 s, then 65 s of settling
    .venv/bin/python tests/bench/soak.py --requests 50000 --json soak.json

The same upstream and gateway as run.py (see README.md), then rounds of load until ``--requests`` have
been answered: non-stream at c=32, burst streams at c=32, token-paced streams at c=256 (256 streams open at
once; wrk leaves each round with streams in flight, so every round also ends with clients that vanish
mid-stream). After each round, once the gateway is idle, it records its RSS (VmRSS), open file
descriptors (/proc/PID/fd) and peak RSS (VmHWM).

Reports: peak RSS (the 100 MB budget with 256 open streams), RSS after the first round against the last
(flat: within ``--rss-tolerance``, 10 %), and open descriptors before any load (after the smoke check)
against after the soak, once the upstream keep-alive pool has expired (``--settle``: aiohttp closes a
connection idle for its 30 s keep-alive at its next sweep, every 30 s, so up to 60 s): no more than at the
start means nothing leaked. Exit status 1 when a check fails, an answer was wrong or the gateway died.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import run as bench


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            values[key] = int(value.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def open_fds(pid: int) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    kinds["total"] = sum(kinds.values())
    return kinds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--settle", type=float, default=65.0, help="seconds to wait for the upstream keep-alive pool")
    p.add_argument("--rss-tolerance", type=float, default=0.10)
    p.add_argument("--variant", type=bench.parse_variant, help="a gateway variant (run.py --variant syntax)")
    p.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install -y wrk nginx)", file=sys.stderr)
        return 2
    pinned = bench.pin_self()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    (tmp / "logs").mkdir()
    tmp.chmod(0o755)
    procs = bench.Procs(tmp / "logs", pin=pinned)
    rounds: list[dict[str, float]] = []
    try:
        up = bench.start_upstream(procs, tmp, args.upstream, 5.0)
        variant = args.variant or bench.VARIANTS["gateway"]
        target, why = bench.start_gateway(procs, up, variant, tmp, 60)
        if target is None:
            print(f"the gateway did not start: {why}", file=sys.stderr)
            return 1
        pid = target.pids("json")[0]
        why = bench.smoke(target)
        if why:
            print(f"smoke check failed: {why}", file=sys.stderr)
            return 1
        bench.wait_idle([pid])
        fds_start = open_fds(pid)
        rss_start, _ = rss_mb(pid)
        done = 0
        started = time.monotonic()
        plan = [
            bench.Point("ns_c32", "json", 32),
            bench.Point("st_c32", "burst", 32),
            bench.Point("paced", "paced", 256),
        ]
        while done < args.requests:
            answered = 0
            errors = 0
            for point in plan:
                r = bench.wrk_point(procs, tmp, target, point, 2.0 if point.kind == "paced" else 1.0)
                answered += int(r["requests"])
                errors += int(r["errors"])
            done += answered
            rss, hwm = rss_mb(pid)
            fds = open_fds(pid)
            rounds.append({"requests": done, "rss_mb": rss, "peak_rss_mb": hwm, "fds": fds["total"], "errors": errors})
            print(
                f"[soak] {done:>7,} requests  RSS {rss:6.1f} MB  peak {hwm:6.1f} MB  fds {fds['total']:4}"
                f"  errors {errors}",
                file=sys.stderr,
                flush=True,
            )
        soak_s = time.monotonic() - started
        time.sleep(args.settle)
        fds_end = open_fds(pid)
        rss_end, hwm_end = rss_mb(pid)
        alive = procs.running[variant.name].poll() is None
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    first, last = rounds[0]["rss_mb"], rounds[-1]["rss_mb"]
    growth = (last - first) / first
    rss_ok = abs(growth) <= args.rss_tolerance
    fds_ok = fds_end["total"] <= fds_start["total"]
    errors = sum(int(r["errors"]) for r in rounds)
    print(f"# Gateway soak — {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(
        f"{done:,} requests in {len(rounds)} rounds ({soak_s:.0f} s): non-stream c=32, burst streams c=32, "
        f"token-paced streams c=256; {errors} failed or malformed answers; upstream: {up.description}.\n"
    )
    print("| | value | check |\n|---|---:|---|")
    print(f"| RSS at start (before any load) | {rss_start:.1f} MB | |")
    print(
        f"| RSS after round 1 → after round {len(rounds)} | {first:.1f} → {last:.1f} MB ({growth:+.1%}) | "
        f"{'flat' if rss_ok else 'NOT FLAT'} (±{args.rss_tolerance:.0%}) |"
    )
    print(f"| RSS after the pool expired | {rss_end:.1f} MB | |")
    print(f"| peak RSS (VmHWM, 256 streams open) | {hwm_end:.1f} MB | {'≤' if hwm_end <= 100 else '>'} 100 MB |")
    print(
        f"| open fds: before any load → after ({args.settle:g} s settle) | {fds_start['total']} → "
        f"{fds_end['total']} | {'none left over' if fds_ok else 'LEAK?'} |"
    )
    print(f"\nfds by kind, start: {fds_start}; end: {fds_end}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rounds": rounds,
                    "fds_start": fds_start,
                    "fds_end": fds_end,
                    "rss_start_mb": rss_start,
                    "rss_end_mb": rss_end,
                    "peak_rss_mb": hwm_end,
                },
                indent=1,
            )
        )
    return 0 if rss_ok and fds_ok and alive and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
