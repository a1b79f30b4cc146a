"""The gateway's overhead benchmark: one command, one table (see tests/bench/README.md).

    .venv/bin/python tests/bench/run.py            # ~8 minutes: 4 s per point, 3 interleaved repetitions
    .venv/bin/python tests/bench/run.py --quick    # ~1.5 minutes: 2 s per point, 1 repetition

An upstream that costs next to nothing (nginx with static bodies, plus a raw asyncio server for the
token-paced streams), wrk as the load generator, and each target measured at every point, in turn:
the upstream directly, the minimal FastAPI + httpx proxy (baseline_proxy.py), the gateway, and the
gateway under alternatives. The runner starts and stops every process it launches, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import canned
import httpx
import uvloop
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PY = sys.executable
KINDS = ("json", "burst", "paced", "ttfb")
# The path each kind is served under, on the upstream (direct) and through the baseline (same path).
PATHS = {"json": "/v1", "burst": "/stream/v1", "paced": "/paced/v1", "ttfb": "/ttfb/v1"}
# The gateway's served name for each kind (one `openai` entry per upstream base URL).
GATEWAY_MODELS = {"json": "bench", "burst": "bench-stream", "paced": "bench-paced", "ttfb": "bench-ttfb"}
DEFAULT_TARGETS = "direct,baseline,gateway,gateway+auth"
QUICK_TARGETS = "direct,baseline,gateway"
AUTH_KEY = "bench-key-0123456789abcdef"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROXY = -1  # the ``cpu`` of a proxy under test: the cores --proxy-cpus names (default: core 1)


# ---------------------------------------------------------------------------------------------- processes


class Procs:
    """Every process the runner starts, each in its own session, so that stopping one stops its children."""

    def __init__(self, logs: Path, *, pin: bool, proxy_cpus: frozenset[int] = frozenset({1})) -> None:
        self.logs = logs
        self.pin = pin  # each process on the core it is given (like taskset -c); else wherever the OS puts it
        self.proxy_cpus = proxy_cpus  # where a proxy under test (cpu=PROXY) runs, its workers included
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def _on_core(self, cpu: int) -> Callable[[], None] | None:
        if not self.pin:
            return None
        cpus = self.proxy_cpus if cpu == PROXY else {cpu}
        return lambda: os.sched_setaffinity(0, cpus)

    def start(
        self, name: str, argv: list[str], *, cpu: int, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,
                preexec_fn=self._on_core(cpu),
            )
        self.running[name] = proc
        return proc

    def run(self, name: str, argv: list[str], *, cpu: int, timeout: float) -> str:
        """Run to completion (in its own session, so it is stopped with the rest on Ctrl-C); its stdout."""
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
            preexec_fn=self._on_core(cpu),
        )
        self.running[name] = proc
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            self.stop(name)
        return out.decode(errors="replace")

    def stop(self, name: str, grace: float = 10.0) -> None:
        proc = self.running.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        """Stop everything, newest first; a second Ctrl-C meanwhile does not cut the clean-up short."""
        held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {s: signal.signal(s, signal.SIG_IGN) for s in held}
        try:
            for name in reversed(list(self.running)):
                self.stop(name)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """None once ``url`` answers 200; otherwise why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with status {proc.returncode}"
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return None
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    return f"not ready after {timeout:.0f} s ({last})"


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / CLOCK_TICKS


def peak_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


def wait_idle(pids: list[int], *, below: float = 0.05, window: float = 0.2, limit: float = 30.0) -> float:
    """Wait until the processes use less than ``below`` of a core over ``window``; the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = cpu_seconds(pids)
        time.sleep(window)
        if cpu_seconds(pids) - before < below * window + 1e-9:
            break
    return time.monotonic() - start


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


# ---------------------------------------------------------------------------------------------- upstream


@dataclass
class Upstream:
    bases: dict[str, str]  # kind → http://host:port serving PATHS[kind]
    pids: dict[str, list[int]]  # kind → the processes doing that work (for direct's CPU and RSS)
    description: str


NGINX_CONF = """\
{user}
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/logs/nginx-error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    etag off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    open_file_cache max=64 inactive=300s;
    client_body_temp_path {tmp}/nginx-tmp/body;
    proxy_temp_path {tmp}/nginx-tmp/proxy;
    fastcgi_temp_path {tmp}/nginx-tmp/fastcgi;
    uwsgi_temp_path {tmp}/nginx-tmp/uwsgi;
    scgi_temp_path {tmp}/nginx-tmp/scgi;
    types {{ }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {tmp}/www;
        # The static module refuses POST with 405; serve the file anyway.
        location ~ /models$ {{ default_type application/json; }}
        location /stream/ {{ default_type text/event-stream; error_page 405 =200 $uri; }}
        location / {{ default_type application/json; error_page 405 =200 $uri; }}
    }}
}}
"""


def start_upstream(procs: Procs, tmp: Path, which: str, gap_ms: float) -> Upstream:
    py_port = free_port()
    py = procs.start(
        "upstream", [PY, str(HERE / "upstream.py"), "--port", str(py_port), "--gap-ms", str(gap_ms)], cpu=0
    )
    why = wait_http(f"http://127.0.0.1:{py_port}/v1/models", py, 15)
    if why:
        raise SystemExit(f"the asyncio upstream did not start: {why}\n{procs.tail('upstream')}")
    py_base = f"http://127.0.0.1:{py_port}"
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if which == "nginx" and not nginx:
        raise SystemExit("nginx is not installed: apt-get install -y nginx (or --upstream python)")
    if which == "python" or not nginx:
        pids = [py.pid]
        return Upstream(
            {k: py_base for k in KINDS},
            {k: pids for k in KINDS},
            "raw asyncio server (uvloop) for everything (nginx not installed)"
            if which != "python"
            else "raw asyncio server (uvloop) for everything",
        )
    www = tmp / "www"
    for prefix, body in (("v1", canned.COMPLETION), ("stream/v1", canned.STREAM)):
        (www / prefix).mkdir(parents=True, exist_ok=True)
        (www / prefix / "chat").mkdir(exist_ok=True)
        (www / prefix / "chat" / "completions").write_bytes(body)
        (www / prefix / "models").write_bytes(canned.MODELS)
    (tmp / "nginx-tmp").mkdir()
    port = free_port()
    user = "user root root;" if os.geteuid() == 0 else ""  # workers read files in a private temp dir
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, port=port))
    master = procs.start("nginx", [nginx, "-c", str(conf), "-e", str(tmp / "logs" / "nginx-error.log")], cpu=0)
    why = wait_http(f"http://127.0.0.1:{port}/v1/models", master, 15)
    if why:
        raise SystemExit(
            f"nginx did not start: {why}\n{procs.tail('nginx')}\n"
            f"{(tmp / 'logs' / 'nginx-error.log').read_text(errors='replace')[-2000:]}"
        )
    workers = children(master.pid) or [master.pid]
    base = f"http://127.0.0.1:{port}"
    return Upstream(
        {"json": base, "burst": base, "paced": py_base, "ttfb": py_base},
        {"json": workers, "burst": workers, "paced": [py.pid], "ttfb": [py.pid]},
        f"nginx {nginx_version(nginx)} (1 worker, static files) + raw asyncio server (paced streams)",
    )


def nginx_version(nginx: str) -> str:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
    return out.rsplit("/", 1)[-1] if "/" in out else out


# ---------------------------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    bases: dict[str, str]
    via_gateway: bool  # the request names a served model at /v1/chat/completions
    pids: Callable[[str], list[int]]  # kind → processes whose CPU is counted
    rss_pids: Callable[[], list[int]]
    headers: dict[str, str] = field(default_factory=dict)
    check: bool = True  # wrk checks every answer's body (not for direct: it would slow wrk down)
    owner: int | None = None  # the gateway's first process: with workers, its share of the CPU is reported

    def url(self, kind: str) -> str:
        path = "/v1" if self.via_gateway else PATHS[kind]
        return f"{self.bases[kind]}{path}/chat/completions"

    def body(self, kind: str) -> bytes:
        model = GATEWAY_MODELS[kind] if self.via_gateway else canned.MODEL
        return canned.request_body(model, stream=kind != "json")


@dataclass
class Variant:
    """One way to run the gateway: changes to its config, its environment, the client's headers."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    about: str = ""


VARIANTS = {
    "gateway": Variant("gateway", about="the config from the issue: access log off, no API keys"),
    "gateway+auth": Variant(
        "gateway+auth",
        config={"auth": {"api_keys": [{"name": "bench", "key": AUTH_KEY}]}},
        headers={"Authorization": f"Bearer {AUTH_KEY}"},
        about="one API key, sent by every request",
    ),
    "gateway+access_log": Variant(
        "gateway+access_log", config={"server": {"access_log": True}}, about="uvicorn's access log on (to a file)"
    ),
    "gateway+debug": Variant("gateway+debug", config={"server": {"log_level": "debug"}}, about="log_level: debug"),
}


def parse_variant(text: str) -> Variant:
    """``NAME:VAR=VALUE,VAR=VALUE`` — the gateway with extra environment (``GATEWAY_*`` sets server.*)."""
    name, _, assignments = text.partition(":")
    env = {}
    for item in filter(None, assignments.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
        env[key.strip()] = value
    if not name.startswith("gateway"):
        name = f"gateway+{name}"
    return Variant(name, env=env, about=", ".join(f"{k}={v}" for k, v in env.items()))


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# The minimal proxy and the httpx alternatives the issue asks about: (extra arguments, what it is).
BASELINES: dict[str, tuple[list[str], str]] = {
    "baseline": ([], "FastAPI + httpx, httpx's default pool (100 connections, 20 kept alive)"),
    "baseline+pool": (
        ["--pool", "512"],
        "the baseline with httpx's pool sized for 256 streams (512 connections, 512 kept alive)",
    ),
    "baseline+aiohttp": (
        ["--client", "httpx-aiohttp", "--pool", "512"],
        "the baseline with httpx on aiohttp's transport (httpx-aiohttp), pool 512",
    ),
}


def start_baseline(procs: Procs, up: Upstream, name: str = "baseline") -> tuple[Target | None, str]:
    extra, _ = BASELINES[name]
    if "httpx-aiohttp" in extra and importlib.util.find_spec("httpx_aiohttp") is None:
        return None, "httpx-aiohttp is not installed (.venv/bin/pip install httpx-aiohttp)"
    port = free_port()
    proc = procs.start(
        name,
        [
            PY,
            str(HERE / "baseline_proxy.py"),
            "--port",
            str(port),
            "--upstream",
            up.bases["json"],
            "--paced-upstream",
            up.bases["paced"],
            *extra,
        ],
        cpu=PROXY,
    )
    why = wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 30)
    if why:
        return None, f"did not start: {why}\n{procs.tail(name)}"
    base = f"http://127.0.0.1:{port}"
    pid = proc.pid
    return Target(name, dict.fromkeys(KINDS, base), False, lambda _k: [pid], lambda: [pid]), ""


def start_gateway(
    procs: Procs, up: Upstream, variant: Variant, tmp: Path, ready_timeout: float
) -> tuple[Target | None, str]:
    port = free_port()
    models = {
        GATEWAY_MODELS[k]: {"engine": "openai", "url": f"{up.bases[k]}{PATHS[k]}", "model": canned.MODEL} for k in KINDS
    }
    config = merge(
        {"server": {"host": "127.0.0.1", "port": port, "access_log": False}, "models": models}, variant.config
    )
    path = tmp / f"{variant.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, **variant.env}
    proc = procs.start(variant.name, [PY, "-m", "gateway", "serve", "--config", str(path)], cpu=PROXY, env=env)
    why = wait_http(f"http://127.0.0.1:{port}/ready", proc, ready_timeout)
    if why:
        tail = procs.tail(variant.name)
        procs.stop(variant.name)
        return None, f"did not start: {why}\n{tail}"
    base = f"http://127.0.0.1:{port}"
    pid = proc.pid

    def pids(_kind: str = "") -> list[int]:  # with server.workers > 1, the owner and its workers
        return [pid, *children(pid)]

    return Target(
        variant.name, dict.fromkeys(KINDS, base), True, pids, pids, headers=dict(variant.headers), owner=pid
    ), ""


# ---------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Point:
    key: str
    kind: str
    concurrency: int
    tool: str = "wrk"  # or "ttfb": the Python client, time to the first event


LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{headers}
bad = 0
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
{check}
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + (t:get("bad") or 0) end
  local e = summary.errors
  io.write(string.format('BENCH {{"requests":%d,"duration_us":%d,"errors":%d,"bad":%d,'
    .. '"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout, b,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""
CHECK_STREAM = """\
function response(status, headers, body)
  if status ~= 200 or string.sub(body, -14) ~= "data: [DONE]\\n\\n" then bad = bad + 1 end
end"""
CHECK_JSON = """\
function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"choices"', 1, true) then bad = bad + 1 end
end"""


def wrk_point(
    procs: Procs,
    tmp: Path,
    target: Target,
    point: Point,
    duration: float,
    *,
    probe_streams: int = 0,
    gap_ms: float = 5.0,
) -> dict[str, float]:
    """wrk at the point's concurrency; for token-paced streams with ``probe_streams``, that many of the
    connections are paced_probe.py's instead (per-event timing), started together with wrk."""
    probe = probe_streams if point.kind == "paced" and 0 < probe_streams < point.concurrency else 0
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in target.headers.items())
    check = (CHECK_JSON if point.kind == "json" else CHECK_STREAM) if target.check else ""
    script = tmp / f"{target.name}-{point.key}.lua"
    script.write_text(LUA.format(body=target.body(point.kind).decode(), headers=headers, check=check))
    argv = [
        "wrk",
        "-t1",
        f"-c{point.concurrency - probe}",
        f"-d{duration:g}s",
        "--timeout",
        "20s",
        "-s",
        str(script),
        target.url(point.kind),
    ]
    pids = target.pids(point.kind)
    cpu0 = cpu_seconds(pids)
    owner0 = cpu_seconds([target.owner]) if target.owner is not None and len(pids) > 1 else None
    prober = None
    if probe:
        body = tmp / f"{target.name}-{point.key}.body"
        body.write_bytes(target.body(point.kind))
        (tmp / "logs" / "probe.log").unlink(missing_ok=True)
        prober = procs.start(
            "probe",
            [
                PY,
                str(HERE / "paced_probe.py"),
                "--url",
                target.url(point.kind),
                "--body-file",
                str(body),
                "--streams",
                str(probe),
                "--duration",
                f"{duration:g}",
                "--gap-ms",
                f"{gap_ms:g}",
                "--events",
                str(len(canned.EVENTS)),
                *[a for k, v in target.headers.items() for a in ("--header", f"{k}:{v}")],
            ],
            cpu=0,
        )
    out = procs.run("wrk", argv, cpu=0, timeout=duration + 60)
    cpu_run = cpu_seconds(pids) - cpu0
    found: dict[str, float] = {}
    if prober is not None:
        try:
            prober.wait(60)
        finally:
            procs.stop("probe")
        text = (tmp / "logs" / "probe.log").read_text(errors="replace")
        line = next((x for x in reversed(text.splitlines()) if x.startswith("PROBE ")), None)
        if line is None:
            raise RuntimeError(f"paced_probe printed no result for {target.name} {point.key}:\n{text[-2000:]}")
        found = {k: (float("nan") if v is None else float(v)) for k, v in json.loads(line[6:]).items()}
    # wrk leaves with requests in flight: a proxy still busy with them would slow the next point down, and
    # their clean-up is part of this point's cost.
    settle = wait_idle(pids)
    cpu = cpu_seconds(pids) - cpu0
    line = next((x for x in out.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result for {target.name} {point.key}:\n{out[-2000:]}")
    r = json.loads(line[6:])
    seconds = r["duration_us"] / 1e6
    requests = r["requests"] + found.get("streams", 0)
    result = {
        "rate": requests / seconds,
        "p50": r["p50_us"] / 1e6,
        "p99": r["p99_us"] / 1e6,
        "requests": requests,
        "errors": r["errors"] + r["bad"] + found.get("bad", 0),
        "cpu_per_1k": cpu / requests * 1000 if requests else float("nan"),
        "cpu_util": cpu_run / seconds,
        "settle_s": settle,
    }
    if point.kind == "paced" and requests:  # every stream is len(EVENTS) events, [DONE] included
        result["cpu_us_event"] = cpu / (requests * len(canned.EVENTS)) * 1e6
    if owner0 is not None and target.owner is not None and requests:  # the leases' cost, in the one scheduler
        result["owner_cpu_per_1k"] = (cpu_seconds([target.owner]) - owner0) / requests * 1000
    if found:
        result.update(
            {
                "first_p99": found["first_p99"],
                "gap_p50": found["gap_p50"],
                "gap_p99": found["gap_p99"],
                "gap_max": found["gap_max"],
                "merged": found["merged"],
            }
        )
    return result


async def _one_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[float, float, bool]:
    """Send one request on a kept-alive connection; (time to first event, time to end, ended with [DONE])."""
    t0 = time.perf_counter()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    first = 0.0
    body = b""
    if b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed mid-stream")
            if not first and b"data:" in data:
                first = time.perf_counter() - t0
            body += data
            if body.endswith(b"\r\n0\r\n\r\n"):
                break
    else:
        at = lower.find(b"\r\ncontent-length:")
        length = int(lower[at + 17 : lower.find(b"\r\n", at + 2)])
        body = await reader.readexactly(length)
        first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    ok = head.startswith(b"HTTP/1.1 200") and b"data: [DONE]\n\n" in body
    return first, total, ok


async def _ttfb(url: str, body: bytes, headers: dict[str, str], duration: float) -> dict[str, float]:
    u = httpx.URL(url)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST {u.raw_path.decode()} HTTP/1.1\r\nHost: {u.host}:{u.port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection(u.host, u.port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    firsts: list[float] = []
    bad = 0
    deadline = time.perf_counter() + duration
    try:
        while time.perf_counter() < deadline:
            first, _total, ok = await _one_stream(reader, writer, request)
            firsts.append(first)
            bad += not ok
    finally:
        writer.close()
    firsts.sort()
    n = len(firsts)
    return {
        "rate": n / duration,
        "p50": firsts[n // 2],
        "p99": firsts[min(n - 1, int(n * 0.99))],
        "requests": n,
        "errors": bad,
        "cpu_per_1k": float("nan"),
        "cpu_util": float("nan"),
    }


def ttfb_point(target: Target, point: Point, duration: float) -> dict[str, float]:
    return uvloop.run(_ttfb(target.url(point.kind), target.body(point.kind), target.headers, duration))


def smoke(target: Target) -> str | None:
    """One request of each kind, checked whole; None when all are right."""
    with httpx.Client(timeout=10) as client:
        for kind in KINDS:
            try:
                r = client.post(
                    target.url(kind),
                    content=target.body(kind),
                    headers={"Content-Type": "application/json", **target.headers},
                )
            except httpx.HTTPError as exc:
                return f"{kind}: {type(exc).__name__}: {exc}"
            if r.status_code != 200:
                return f"{kind}: HTTP {r.status_code}: {r.text[:300]}"
            if kind == "json":
                data = r.json()
                if not data.get("choices"):
                    return f"json: no choices in {r.text[:300]}"
            elif not r.content.endswith(b"data: [DONE]\n\n") or r.content.count(b"data: ") != len(canned.EVENTS):
                return f"{kind}: stream not whole ({len(r.content)} bytes): {r.text[-300:]!r}"
    return None


# ---------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    label: str
    point: str
    metric: str  # rate | p50 | p99 | cpu_per_1k | rss
    higher_is_better: bool


def rows(paced_c: int) -> list[Row]:
    return [
        Row("non-stream, c=1: p50 latency", "ns_c1", "p50", False),
        Row("non-stream, c=1: p99 latency", "ns_c1", "p99", False),
        Row("stream (time to last byte), c=1: p50", "st_c1", "p50", False),
        Row("stream (time to last byte), c=1: p99", "st_c1", "p99", False),
        Row("stream time to first event, c=1: p50", "ttfb_c1", "p50", False),
        Row("stream time to first event, c=1: p99", "ttfb_c1", "p99", False),
        Row("non-stream, c=32: req/s", "ns_c32", "rate", True),
        Row("non-stream, c=256: req/s", "ns_c256", "rate", True),
        Row("stream (burst), c=32: streams/s", "st_c32", "rate", True),
        Row("stream (burst), c=256: streams/s", "st_c256", "rate", True),
        Row(f"token-paced stream, c={paced_c}: streams/s", "paced", "rate", True),
        Row(f"token-paced stream, c={paced_c}: p50 duration", "paced", "p50", False),
        Row(f"token-paced stream, c={paced_c}: p99 duration", "paced", "p99", False),
        Row("CPU s / 1,000 req: non-stream, c=32", "ns_c32", "cpu_per_1k", False),
        Row("CPU s / 1,000 req: stream (burst), c=32", "st_c32", "cpu_per_1k", False),
        Row(f"CPU s / 1,000 req: token-paced, c={paced_c}", "paced", "cpu_per_1k", False),
        Row(
            "  of which the engines' owner (server.workers > 1): non-stream, c=32", "ns_c32", "owner_cpu_per_1k", False
        ),
        Row(
            f"  of which the engines' owner (server.workers > 1): token-paced, c={paced_c}",
            "paced",
            "owner_cpu_per_1k",
            False,
        ),
        Row(
            f"CPU µs / forwarded event: token-paced, c={paced_c} (stream's request included)",
            "paced",
            "cpu_us_event",
            False,
        ),
        Row("token-paced: inter-event gap p50 (probe streams; the upstream's is the gap)", "paced", "gap_p50", False),
        Row("token-paced: inter-event gap p99 (probe streams)", "paced", "gap_p99", False),
        Row("token-paced: time to first event p99 (probe streams)", "paced", "first_p99", False),
        Row("token-paced: events that arrived with the one before (probe streams)", "paced", "merged", False),
        Row("peak RSS", "", "rss", False),
        # Not a figure of merit: a CPU-bound proxy well below 100 % here did not have its core to itself.
        Row("proxy CPU use at c≥32 (100% = one core)", "loaded", "cpu_util", False),
    ]


LOADED = ("ns_c32", "ns_c256", "st_c32", "st_c256", "paced")


def fmt(metric: str, value: float) -> str:
    if value != value:  # NaN
        return "—"
    if metric in ("p50", "p99", "gap_p50", "gap_p99", "first_p99"):
        return f"{value * 1e6:,.0f} µs" if value < 1e-3 else f"{value * 1e3:,.3g} ms" if value < 1 else f"{value:.2f} s"
    if metric == "rate":
        return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    if metric in ("cpu_per_1k", "owner_cpu_per_1k"):
        return f"{value:.3g} s"
    if metric == "rss":
        return f"{value:,.0f} MB"
    if metric in ("cpu_util", "merged"):
        return f"{value * 100:.0f}%"
    if metric == "cpu_us_event":
        return f"{value:.1f} µs"
    return f"{value:.3g}"


def better(row: Row) -> str:
    return "·" if row.metric == "cpu_util" else "↑" if row.higher_is_better else "↓"


def ratio(x: float) -> str:
    return f"{x:,.2f}x" if x >= 0.1 else f"{x:.2g}x"


def summarize(values: list[float]) -> tuple[float, float]:
    """(median, spread): spread is half the range over the median, the ± of the table."""
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    med = statistics.median(values)
    return med, ((max(values) - min(values)) / 2 / med if med else 0.0)


def report(
    results: dict[str, dict[str, list[dict[str, float]]]],
    rss: dict[str, float],
    names: list[str],
    paced_c: int,
    reps: int,
) -> str:
    def value(name: str, row: Row) -> tuple[float, float]:
        if row.metric == "rss":
            return rss.get(name, float("nan")), 0.0
        mine = results.get(name, {})
        nan = float("nan")
        if row.point == "loaded":
            return summarize([r.get(row.metric, nan) for p in LOADED for r in mine.get(p, [])])
        return summarize([r.get(row.metric, nan) for r in mine.get(row.point, [])])

    def has(name: str, row: Row) -> bool:
        mine = results.get(name, {})
        points = LOADED if row.point == "loaded" else (row.point,)
        return any(row.metric in r for p in points for r in mine.get(p, []))

    measured = [row for row in rows(paced_c) if row.metric == "rss" or any(has(n, row) for n in names)]
    lines = ["| test | better | " + " | ".join(names) + " |", "|---|:-:|" + "---:|" * len(names)]
    for row in measured:
        cells = []
        for name in names:
            med, spread = value(name, row)
            cell = fmt(row.metric, med)
            if reps > 1 and spread == spread and spread >= 0.005 and row.metric != "rss":
                cell += f" ±{spread * 100:.0f}%" if spread < 1 else " ±>100%"
            cells.append(cell)
        lines.append(f"| {row.label} | {better(row)} | " + " | ".join(cells) + " |")

    # The gateway against the baseline and direct; each alternative against the gateway as configured by default
    # (or, without it, against the baseline and direct too).
    pairs = [("baseline", "direct")] if {"baseline", "direct"} <= set(names) else []
    for name in names:
        if name == "gateway" or (name.startswith("gateway") and "gateway" not in names):
            pairs += [(name, ref) for ref in ("baseline", "direct") if ref in names]
        elif name.startswith("gateway"):
            pairs.append((name, "gateway"))
    if "gateway" in names:  # the httpx alternatives, against the gateway
        pairs += [("gateway", name) for name in names if name.startswith("baseline+")]
    if not pairs:
        return "\n".join(lines)
    lines += [
        "",
        "Ratios (medians; for ↑ rows below 1 is worse, for ↓ rows above 1 is worse):",
        "",
        "| test | better | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |",
        "|---|:-:|" + "---:|" * len(pairs),
    ]
    for row in measured:
        if row.metric in ("cpu_util", "gap_p50", "merged", "cpu_us_event"):  # no ratio: near 0, or a row above
            continue
        cells = []
        for a, b in pairs:
            va, vb = value(a, row)[0], value(b, row)[0]
            cells.append(ratio(va / vb) if va == va and vb == vb and vb else "—")
        lines.append(f"| {row.label} | {better(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Overhead benchmark: direct vs baseline proxy vs the gateway.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="2 s per point, 1 repetition, no gateway alternatives")
    p.add_argument("--duration", type=float, help="seconds per measurement point (default 4; --quick: 2)")
    p.add_argument("--reps", type=int, help="interleaved repetitions, the table shows medians (default 3; --quick: 1)")
    p.add_argument(
        "--targets",
        help=f"comma-separated, from: direct, {', '.join(BASELINES)}, "
        f"{', '.join(VARIANTS)} (default: {DEFAULT_TARGETS}; with --quick: {QUICK_TARGETS})",
    )
    p.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        metavar="NAME:VAR=VAL[,VAR=VAL]",
        help="one more gateway target with extra environment, e.g. quiet:GATEWAY_LOG_LEVEL=warning",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated point keys to run (ns_c1, st_c1, ttfb_c1, ns_c32, "
        "ns_c256, st_c32, st_c256, paced); default all",
    )
    p.add_argument(
        "--upstream",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="auto: nginx for the canned answers when installed, else the asyncio server",
    )
    p.add_argument("--gap-ms", type=float, default=5.0, help="time between two events of a token-paced stream")
    p.add_argument("--paced-concurrency", type=int, default=256)
    p.add_argument(
        "--probe-streams",
        type=int,
        default=16,
        help="of the token-paced connections, how many are paced_probe.py's (per-event timing; 0: none)",
    )
    p.add_argument("--gateway-timeout", type=float, default=60.0, help="seconds to wait for the gateway's /ready")
    p.add_argument("--proxy-cpus", default="1", help="cores the proxies under test may use, e.g. 1 or 0,1 (workers)")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, Lua scripts)")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 2.0 if args.quick else 4.0
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.targets is None:
        args.targets = QUICK_TARGETS if args.quick else DEFAULT_TARGETS
    return args


def points(paced_c: int, only: str) -> list[Point]:
    all_points = [
        Point("ns_c1", "json", 1),
        Point("st_c1", "burst", 1),
        Point("ttfb_c1", "ttfb", 1, "ttfb"),
        Point("ns_c32", "json", 32),
        Point("ns_c256", "json", 256),
        Point("st_c32", "burst", 32),
        Point("st_c256", "burst", 256),
        Point("paced", "paced", paced_c),
    ]
    wanted = set(filter(None, only.split(",")))
    return [p for p in all_points if not wanted or p.key in wanted]


def point_duration(point: Point, duration: float) -> float:
    """A longer window where one answer can take seconds: paced streams (0.3 s at best), and c=256 through a
    saturated proxy, which shares its core among all 256 requests so that they all finish late together."""
    if point.kind == "paced":
        return max(duration + 3, 5.0)
    return max(duration, 4.0) if point.concurrency >= 128 else duration


def pin_self() -> bool:
    """The runner and everything it starts live on core 0 unless told otherwise (proxies: core 1)."""
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"):
        return False
    os.sched_setaffinity(0, {0})
    return True


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGINT (even where a shell ignores it, as for ``cmd &``), SIGTERM and SIGHUP end the run like Ctrl-C:
    through the ``finally`` that stops every process."""

    def raise_interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        say("wrk is not installed. On Debian/Ubuntu: sudo apt-get install -y wrk nginx  (nginx is optional)")
        return 2
    names = [n.strip() for n in args.targets.split(",") if n.strip()] + [v.name for v in args.variant]
    variants = {**VARIANTS, **{v.name: v for v in args.variant}}
    unknown = [n for n in names if n != "direct" and n not in BASELINES and n not in variants]
    if unknown:
        say(f"unknown target(s): {', '.join(unknown)}; known: direct, {', '.join(BASELINES)}, {', '.join(variants)}")
        return 2
    pinned = pin_self()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    (tmp / "logs").mkdir()
    tmp.chmod(0o755)
    procs = Procs(tmp / "logs", pin=pinned, proxy_cpus=frozenset(int(c) for c in args.proxy_cpus.split(",")))
    plan = points(args.paced_concurrency, args.only)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    rss: dict[str, float] = {}
    notes: list[str] = []
    failed = False
    started = time.monotonic()
    try:
        with interrupts_as_keyboard():
            up = start_upstream(procs, tmp, args.upstream, args.gap_ms)
            targets: list[Target] = []
            for name in names:
                if name == "direct":
                    target: Target | None = Target(
                        "direct", up.bases, False, lambda k: up.pids[k], lambda: up.pids["json"], check=False
                    )
                    why = ""
                elif name in BASELINES:
                    target, why = start_baseline(procs, up, name)
                else:
                    target, why = start_gateway(procs, up, variants[name], tmp, args.gateway_timeout)
                if target is not None:
                    why = smoke(target) or ""
                    if why:
                        target = None
                if target is None:
                    notes.append(f"{name}: not measured — {why.strip()}")
                    say(f"[bench] {name}: not measured — {why.strip()}")
                    continue
                targets.append(target)
            if not targets:
                raise SystemExit("no target could be measured")
            say(
                f"[bench] upstream: {up.description}; targets: {', '.join(t.name for t in targets)}; "
                f"{len(plan)} points x {args.reps} reps x {args.duration:g} s"
            )
            for t in targets:  # warm-up: connections, caches, lazy imports
                for kind, c in (("json", 32), ("burst", 32)):
                    wrk_point(procs, tmp, t, Point("warmup", kind, c), min(1.0, args.duration))
            for rep in range(args.reps):
                for point in plan:
                    for t in targets:
                        if point.tool == "ttfb":
                            r = ttfb_point(t, point, args.duration)
                        else:
                            r = wrk_point(
                                procs,
                                tmp,
                                t,
                                point,
                                point_duration(point, args.duration),
                                probe_streams=args.probe_streams,
                                gap_ms=args.gap_ms,
                            )
                        results.setdefault(t.name, {}).setdefault(point.key, []).append(r)
                        say(
                            f"[bench] rep {rep + 1}/{args.reps} {point.key:8} {t.name:18} "
                            f"{r['rate']:>9,.0f}/s p50 {r['p50'] * 1e3:8.3f} ms p99 {r['p99'] * 1e3:8.3f} ms"
                            f" cpu {r['cpu_util'] * 100:4.0f}%"
                            + (f" (busy {r['settle_s']:.1f} s after)" if r.get("settle_s", 0) > 1 else "")
                            + (
                                f" | probe: gap p50 {r['gap_p50'] * 1e3:.1f} p99 {r['gap_p99'] * 1e3:.1f} ms,"
                                f" first event p99 {r['first_p99'] * 1e3:.0f} ms, merged {r['merged'] * 100:.0f}%"
                                if "gap_p99" in r
                                else ""
                            )
                            + (f"  ERRORS {r['errors']:.0f}" if r["errors"] else "")
                        )
                        if r["errors"]:
                            failed = True
            for t in targets:
                rss[t.name] = peak_rss_mb(t.rss_pids())
            dead = [t.name for t in targets if t.name in procs.running and procs.running[t.name].poll() is not None]
            for name in dead:
                notes.append(f"{name}: the process died during the run:\n{procs.tail(name)}")
                failed = True
    except KeyboardInterrupt:
        say("[bench] interrupted; stopping everything it started")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            say(f"[bench] kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    names_done = [t.name for t in targets]
    total_errors = {n: sum(r["errors"] for pts in results[n].values() for r in pts) for n in results}
    out = [
        f"# Gateway overhead benchmark — {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}; load generator: {wrk_version()} (1 thread); upstream: {up.description}.",
        "Pinning: "
        + (
            f"wrk, upstream and this runner on core 0, the proxy under test on cores {args.proxy_cpus}"
            if pinned
            else "none"
        )
        + f". {args.duration:g} s per point (c=256: {point_duration(Point('', 'json', 256), args.duration):g} s, "
        f"token-paced: {point_duration(Point('', 'paced', 1), args.duration):g} s), "
        f"{args.reps} interleaved repetition(s), medians"
        + (" (± half the range between repetitions)" if args.reps > 1 else "")
        + ".",
        f"Canned answers: a {len(canned.COMPLETION)}-byte chat completion; a stream of {canned.STREAM_EVENTS} events "
        f"+ [DONE] ({len(canned.STREAM):,} bytes) sent in one burst, or token-paced: one event every {args.gap_ms:g} ms"
        f" (ideal: {(len(canned.EVENTS) - 1) * args.gap_ms:g} ms per stream, "
        f"{args.paced_concurrency / ((len(canned.EVENTS) - 1) * args.gap_ms / 1000):,.0f} streams/s at "
        f"c={args.paced_concurrency}). Time to first event: the first event comes at once, the rest 20 ms later "
        f"(Python client, c=1). CPU and peak RSS: the proxy's process (direct: the upstream's).",
        "",
        report(results, rss, names_done, args.paced_concurrency, args.reps),
        "",
    ]
    for name in names_done:
        if name.startswith("gateway") and variants[name].about:
            out.append(f"- {name}: {variants[name].about}")
        elif name in BASELINES:
            out.append(f"- {name}: {BASELINES[name][1]}")
    out += [f"- {n}: {total_errors[n]:.0f} failed or malformed answers" for n in names_done if total_errors.get(n)]
    out += [f"- {note}" for note in notes]
    out.append(f"\nTotal time: {time.monotonic() - started:.0f} s")
    print("\n".join(out))
    if args.json:
        clean = {
            t: {p: [{k: (None if v != v else v) for k, v in r.items()} for r in reps] for p, reps in pts.items()}
            for t, pts in results.items()
        }  # NaN is not JSON
        args.json.write_text(
            json.dumps(
                {"results": clean, "rss_mb": rss, "notes": notes, "args": {k: str(v) for k, v in vars(args).items()}},
                indent=1,
            )
        )
    return 1 if failed else 0


def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    first = (out.stdout or out.stderr).split("[")[0].strip()
    return first.replace("debian/", "") or "wrk"


if __name__ == "__main__":
    sys.exit(main())
