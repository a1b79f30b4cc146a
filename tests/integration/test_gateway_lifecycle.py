"""The gateway owns its engines: a dead engine is restarted and served again, and none outlives the gateway."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import REPO, free_port, run_gateway, standin_command, tagged_pids, wait_until

MESSAGES = [{"role": "user", "content": "hi"}]


def _config(faults: str = "") -> dict[str, Any]:
    return {
        "server": {"retry_after": 1},
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/chat",
                "command": standin_command("vllm"),
                "gpus": [0, 1],  # tensor parallel 2: the stand-in forks EngineCore and two workers
                "env": {"STANDIN_FAULTS": faults} if faults else {},
                "health": {"interval": 0.3, "startup_interval": 0.1},
                "restart": {"initial_delay": 0.1, "max_delay": 0.5},
                "stop_grace": 2,
            },
        },
    }


def _chat(url: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "max_tokens": 2}, timeout=5
    )


def _engine_pid(url: str) -> int:
    return int(httpx.get(url + "/health", timeout=5).json()["models"]["chat"]["replicas"][0]["pid"])


def test_killed_engine_is_restarted_and_served_again(tmp_path: Path) -> None:
    with run_gateway(_config(), tmp_path) as gw:
        assert _chat(gw.url).status_code == 200
        first = _engine_pid(gw.url)
        os.kill(first, signal.SIGKILL)
        # Between the crash and the new launch being ready, requests get 503 + Retry-After, not hangs.
        assert wait_until(lambda: _chat(gw.url).status_code == 503, 5)
        assert _chat(gw.url).headers.get("retry-after") == "1"
        assert wait_until(lambda: _chat(gw.url).status_code == 200, 20)
        health = httpx.get(gw.url + "/health", timeout=5).json()["models"]["chat"]["replicas"][0]
        assert health["restarts"] == 1 and health["last_exit_code"] == 137 and health["pid"] != first
        # The killed API server's orphaned EngineCore and TP workers were cleaned up too.
        assert wait_until(lambda: len(gw.engine_pids()) <= 5, 5), gw.engine_pids()


def test_engine_startup_time_is_observed_and_exported(tmp_path: Path) -> None:
    """``gateway_engine_startup_seconds``: from a replica's STARTING to its READY, one sample per start."""
    with run_gateway(_config("startup-delay=0.5"), tmp_path) as gw:
        text = httpx.get(gw.url + "/metrics", timeout=5).text
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("gateway_engine_startup_seconds") and s.labels.get("model") == "chat"
        }
        assert samples["gateway_engine_startup_seconds_count"] == 1
        assert samples["gateway_engine_startup_seconds_sum"] >= 0.5  # the stand-in's own loading time, at least


def test_crash_loop_ends_failed_and_visible(tmp_path: Path) -> None:
    config = _config("exit-at-startup=3")
    config["models"]["chat"]["restart"] = {"initial_delay": 0.05, "max_delay": 0.2, "max_restarts": 2}
    with run_gateway(config, tmp_path, wait_ready=False) as gw:
        assert wait_until(lambda: _state(gw.url) == "failed", 20), gw.log()[-2000:]
        response = _chat(gw.url)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_failed"
        assert httpx.get(gw.url + "/ready", timeout=5).status_code == 503
        assert not gw.engine_pids()  # FAILED means nothing left running, and no spinning


def _state(url: str) -> str:
    try:
        return str(httpx.get(url + "/health", timeout=2).json()["models"]["chat"]["state"])
    except httpx.HTTPError:
        return "unreachable"


def test_sigterm_stops_every_engine_process(tmp_path: Path) -> None:
    with run_gateway(_config(), tmp_path) as gw:
        assert len(gw.engine_pids()) >= 4  # reaper, API server, EngineCore, workers
        gw.proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal it caught once shutdown is complete, so -15 is a clean exit.
        assert gw.proc.wait(20) in (0, -signal.SIGTERM)
        assert wait_until(lambda: not gw.engine_pids(), 5), gw.engine_pids()


def test_sigkilled_gateway_leaves_no_engine_behind(tmp_path: Path) -> None:
    port = free_port()
    config = {**_config("setsid,ignore-sigterm"), "server": {"host": "127.0.0.1", "port": port}}
    config["models"]["chat"]["stop_grace"] = 1
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    owner = str(proc.pid)
    try:
        assert wait_until(lambda: _ready(port), 30), (tmp_path / "gateway.log").read_text()[-3000:]
        assert len(tagged_pids(owner)) >= 4
        proc.kill()
        proc.wait(5)
        # Workers that left the process group and ignore SIGTERM still go: the reaper sees its lifeline close.
        assert wait_until(lambda: not tagged_pids(owner), 10), tagged_pids(owner)
    finally:
        for pid in tagged_pids(owner):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _stream(url: str, out: list[bytes]) -> None:
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        timeout=30,
        json={"model": "chat", "messages": MESSAGES, "max_tokens": 12, "stream": True, "ignore_eos": True},
    ) as r:
        out.append(b"".join(r.iter_raw()))


def test_sigterm_drains_in_flight_streams_then_stops(tmp_path: Path) -> None:
    import threading

    config = _config("token-interval=0.15")
    config["server"]["drain_timeout"] = 10
    with run_gateway(config, tmp_path) as gw:
        bodies: list[bytes] = []
        threads = [threading.Thread(target=_stream, args=(gw.url, bodies)) for _ in range(3)]
        for t in threads:
            t.start()
        assert wait_until(
            lambda: (
                'in_flight": 3'
                in httpx.get(gw.url + "/health", timeout=2).text.replace('in_flight":3', 'in_flight": 3')
            ),
            5,
        )
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: httpx.get(gw.url + "/ready", timeout=2).status_code == 503, 10)
        late = _chat(gw.url)
        assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"
        # The client's pool should go elsewhere: no keep-alive to a gateway on its way out, and when to retry.
        assert late.headers["connection"] == "close" and int(late.headers["retry-after"]) >= 1
        assert httpx.get(gw.url + "/health", timeout=2).status_code == 200  # alive while it drains
        for t in threads:
            t.join(20)
        assert len(bodies) == 3 and all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
        assert gw.proc.wait(20) in (0, -signal.SIGTERM)
        assert wait_until(lambda: not gw.engine_pids(), 5)


def test_stream_outliving_the_drain_ends_with_an_error_event(tmp_path: Path) -> None:
    import threading

    config = _config("token-interval=0.5")
    config["server"]["drain_timeout"] = 1
    with run_gateway(config, tmp_path) as gw:
        bodies: list[bytes] = []
        thread = threading.Thread(target=_stream, args=(gw.url, bodies))
        thread.start()
        time.sleep(0.8)
        gw.proc.send_signal(signal.SIGTERM)
        thread.join(15)
        assert gw.proc.wait(15) in (0, -signal.SIGTERM)
        assert bodies and b"server_shutting_down" in bodies[0] and b"[DONE]" not in bodies[0]


def test_sigint_during_the_drain_stops_at_once_and_still_ends_the_engines(tmp_path: Path) -> None:
    """I3: the first signal drains (here for up to 120 s, and the stream in flight needs ~100 s more); the
    second one must cut that short. Engines still go, by the lifespan or by their reapers."""
    import threading

    config = _config("token-interval=0.5")
    config["server"]["drain_timeout"] = 120
    with run_gateway(config, tmp_path) as gw:
        owner = str(gw.proc.pid)
        bodies: list[bytes] = []

        def long_stream() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the forced stop may cut it anywhere
                with httpx.stream(
                    "POST",
                    gw.url + "/v1/chat/completions",
                    timeout=60,
                    json={"model": "chat", "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True},
                ) as r:
                    for part in r.iter_raw():
                        bodies.append(part)

        thread = threading.Thread(target=long_stream, daemon=True)
        thread.start()
        assert wait_until(lambda: bodies, 10)  # the stream is flowing
        assert tagged_pids(owner)
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: httpx.get(gw.url + "/ready", timeout=2).status_code == 503, 5)  # draining
        time.sleep(0.5)
        assert gw.proc.poll() is None  # still draining for the stream: the first signal alone does not stop it
        gw.proc.send_signal(signal.SIGINT)
        try:
            code = gw.proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGINT did not stop the draining gateway:\n{gw.log()[-3000:]}") from None
        assert code in (0, -signal.SIGINT, -signal.SIGTERM)  # a stop it chose, not a crash
        assert "second signal: stopping now" in gw.log()
        # The open stream was ended with its error event, not torn down with a traceback.
        assert "Traceback" not in gw.log() and "failed: RuntimeError" not in gw.log(), gw.log()[-3000:]
        assert wait_until(lambda: not tagged_pids(owner), 10), tagged_pids(owner)
        thread.join(10)
        assert not thread.is_alive()  # the client's connection was closed, not left hanging
        assert b"[DONE]" not in b"".join(bodies)
