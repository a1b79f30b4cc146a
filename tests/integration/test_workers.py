"""Several worker processes (``server.workers: 2``) in front of one owner of the engines, end to end.

Real processes throughout: the gateway's owner, its workers, vLLM stand-ins, the openai SDK as client.
The single-process behaviours these repeat are tested elsewhere; here it is what splitting adds: the
request path in the workers with leases from the owner, everything else forwarded to it, metrics added
up, a dead worker replaced and its leases given back, the drain in order, no process left behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import tempfile
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.workers.fleet import make_run_dir, remove_run_dir
from tests.helpers import chat, run_gateway, standin_model, tagged_pids, wait_until
from tests.standin.harness import read_records


def worker_pids(owner: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == owner and b"gateway.workers.worker" in cmdline:
            found.append(int(entry))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def replica(gw: Any, model: str = "m") -> dict[str, Any]:
    row: dict[str, Any] = httpx.get(gw.url + "/health", timeout=5).json()["models"][model]["replicas"][0]
    return row


def connected(gw: Any) -> int:
    """Workers the owner has heard from: each has its app and its signal handlers in place."""
    return int(httpx.get(gw.url + "/health", timeout=5).json()["workers"]["connected"])


def config(**server: Any) -> dict[str, Any]:
    return {
        "server": {"workers": 2, "drain_timeout": 20, **server},
        "models": {"m": standin_model(aliases=["gpt-x"], env={"STANDIN_FAULTS": "token-interval=0.01"})},
    }


def test_workers_answer_the_sdk_forward_the_rest_and_add_up_their_metrics(tmp_path: Path) -> None:
    with run_gateway(config(), tmp_path) as gw:
        workers = worker_pids(gw.proc.pid)
        assert len(workers) == 2
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        for i in range(12):
            answer = client.chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=3
            )
            assert answer.model == "m" and answer.choices[0].message.content
        events = list(
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True
            )
        )
        assert events and events[-1].choices[0].finish_reason == "stop"
        # Forwarded to the owner, which has the engines: models, health, readiness, errors in its shape.
        assert [m.id for m in client.models.list().data] == ["m", "gpt-x"]
        assert replica(gw)["state"] == "ready" and replica(gw)["in_flight"] == 0
        missing = httpx.get(gw.url + "/no/such/path", timeout=5)
        assert missing.status_code == 404 and missing.json()["error"]["message"] == "No such endpoint."
        unknown = chat(gw.url, "nope")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        # One scrape has every worker's series, added up, and the owner's engine states.
        text = httpx.get(gw.url + "/metrics", timeout=5).text
        assert sample(text, "gateway_requests_total", model="m", endpoint="chat", status="200") == 13
        assert sample(text, "gateway_requests_total", model="", endpoint="chat", status="404") == 1
        assert sample(text, "gateway_engine_state", model="m", replica="0", state="ready") == 1
        assert sample(text, "gateway_requests_in_flight", model="m") == 0
        assert sample(text, "gateway_workers") == 2 and sample(text, "gateway_worker_restarts_total") == 0
        health = httpx.get(gw.url + "/health", timeout=5).json()
        assert health["workers"] == {"configured": 2, "connected": 2, "restarts": 0}
        assert worker_pids(gw.proc.pid) == workers


def test_a_killed_worker_is_replaced_and_its_leases_given_back(tmp_path: Path) -> None:
    with run_gateway(config(), tmp_path) as gw:
        workers = worker_pids(gw.proc.pid)
        # A long stream holds a lease in one worker; every worker is then SIGKILLed, so its holder dies too.
        cut: list[BaseException] = []

        def long_stream() -> None:
            try:
                with httpx.stream(
                    "POST",
                    gw.url + "/v1/chat/completions",
                    timeout=30,
                    json={
                        "model": "m",
                        "stream": True,
                        "max_tokens": 2000,
                        "ignore_eos": True,
                        "messages": [{"role": "user", "content": "go on"}],
                    },
                ) as response:
                    for _ in response.iter_bytes():
                        pass
            except httpx.HTTPError as exc:
                cut.append(exc)

        streamer = threading.Thread(target=long_stream)
        streamer.start()
        assert wait_until(lambda: replica(gw)["in_flight"] == 1, 10)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        streamer.join(10)
        assert cut, "the client of a killed worker saw its connection end"
        assert wait_until(lambda: replica(gw)["in_flight"] == 0, 10), replica(gw)  # the dead worker's lease
        assert wait_until(lambda: len(worker_pids(gw.proc.pid)) == 2, 15)
        assert not set(worker_pids(gw.proc.pid)) & set(workers)
        assert chat(gw.url, "m").status_code == 200
        assert "exited with SIGKILL; starting a new one" in gw.log()
        # A SIGTERM sent to one worker alone: it drains, exits cleanly and is replaced (no owner's order to wait for).
        # Sent once both new workers are serving (connected to the owner: their handlers are in place by then);
        # a signal during a worker's imports would end it by the default action, not by its drain.
        assert wait_until(lambda: connected(gw) == 2, 15)
        one = worker_pids(gw.proc.pid)[0]
        os.kill(one, signal.SIGTERM)
        assert wait_until(lambda: "exited with status 0; starting a new one" in gw.log(), 10), gw.log()[-2000:]
        assert wait_until(lambda: len(worker_pids(gw.proc.pid)) == 2 and one not in worker_pids(gw.proc.pid), 15)
        assert chat(gw.url, "m").status_code == 200
        assert wait_until(
            lambda: (
                httpx.get(gw.url + "/health", timeout=5).json()["workers"]
                == {"configured": 2, "connected": 2, "restarts": 3}
            ),
            10,
        )


def test_a_hung_worker_is_killed_and_replaced_and_the_port_still_served(tmp_path: Path) -> None:
    with run_gateway(config(worker_ping_interval=0.2, worker_ping_timeout=2), tmp_path) as gw:
        assert wait_until(lambda: connected(gw) == 2, 15)
        workers = worker_pids(gw.proc.pid)
        stopped = workers[0]
        os.kill(stopped, signal.SIGSTOP)  # alive, but it answers nothing: exit-only liveness would never see it
        try:
            # The other worker takes every new connection meanwhile (a stopped process accepts none).
            assert all(chat(gw.url, "m").status_code == 200 for _ in range(4))
            assert wait_until(lambda: not alive(stopped), 20), gw.log()[-2000:]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        assert "has not answered for" in gw.log()
        assert wait_until(lambda: len(worker_pids(gw.proc.pid)) == 2 and stopped not in worker_pids(gw.proc.pid), 15)
        assert wait_until(lambda: connected(gw) == 2, 15)
        assert all(chat(gw.url, "m").status_code == 200 for _ in range(4))
        assert replica(gw)["in_flight"] == 0
        health = httpx.get(gw.url + "/health", timeout=5).json()
        assert health["workers"] == {"configured": 2, "connected": 2, "restarts": 1}


def test_sigterm_drains_the_workers_first_and_leaves_no_process(tmp_path: Path) -> None:
    with run_gateway(config(), tmp_path) as gw:
        workers = worker_pids(gw.proc.pid)
        bodies: list[bytes] = []

        def stream() -> None:
            with httpx.stream(
                "POST",
                gw.url + "/v1/chat/completions",
                timeout=30,
                json={
                    "model": "m",
                    "stream": True,
                    "max_tokens": 150,
                    "ignore_eos": True,
                    "messages": [{"role": "user", "content": "finish me"}],
                },
            ) as response:
                bodies.append(b"".join(response.iter_bytes()))

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert wait_until(lambda: replica(gw)["in_flight"] == 1, 10)
        engines = gw.engine_pids()
        gw.proc.send_signal(signal.SIGTERM)
        # While the stream finishes, the port still answers: not ready, and new model requests are refused.
        assert wait_until(lambda: httpx.get(gw.url + "/ready", timeout=5).status_code == 503, 5)
        refused = chat(gw.url, "m")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        streamer.join(20)
        assert bodies and bodies[0].endswith(b"data: [DONE]\n\n")  # the one in flight was not cut
        assert gw.proc.wait(20) == 0
        assert wait_until(lambda: not any(alive(p) for p in [*workers, *engines]), 5)
        log = gw.log()
        assert log.index("w1 gateway [-]: the owner says drain") < log.index("m/0: ready → stopping")


def test_workers_exit_with_a_killed_owner_and_so_do_the_engines(tmp_path: Path) -> None:
    with run_gateway(config(), tmp_path) as gw:
        workers = worker_pids(gw.proc.pid)
        engines = gw.engine_pids()
        assert workers and engines
        gw.proc.kill()
        gw.proc.wait(5)
        assert wait_until(lambda: not any(alive(p) for p in workers), 10), "workers outlived their owner"
        assert wait_until(lambda: not tagged_pids(str(gw.proc.pid)), 10), "engines outlived their owner"
        # What it could not clean up (its sockets' directory) goes when the next gateway starts.
        left = list(Path(tempfile.gettempdir()).glob(f"gateway-run-{gw.proc.pid}-*"))
        assert left
        remove_run_dir(make_run_dir())
        assert not any(path.exists() for path in left)


def test_a_reload_reaches_every_worker(tmp_path: Path) -> None:
    with run_gateway(config(), tmp_path) as gw:
        assert chat(gw.url, "second").status_code == 404
        path = tmp_path / f"gateway-{gw.port}.yaml"
        changed = yaml.safe_load(path.read_text())
        changed["models"]["m"]["aliases"] = ["gpt-x", "second"]
        path.write_text(yaml.safe_dump(changed))
        report = httpx.post(gw.url + "/admin/reload", timeout=10)
        assert report.status_code == 200, report.text
        assert wait_until(lambda: replica(gw)["state"] == "ready", 15)
        # Every new connection may land on either worker: all of them must know the new name.
        assert all(chat(gw.url, "second").status_code == 200 for _ in range(8))


def test_a_queued_request_is_granted_across_the_line_and_a_leaver_withdrawn(tmp_path: Path) -> None:
    record = tmp_path / "lazy.jsonl"
    lazy = standin_model(load="on_demand", env={"STANDIN_FAULTS": "startup-delay=1.5", "STANDIN_RECORD": str(record)})
    with run_gateway({"server": {"workers": 2, "queue_timeout": 20}, "models": {"lazy": lazy}}, tmp_path) as gw:
        results: list[int] = []
        waiter = threading.Thread(target=lambda: results.append(chat(gw.url, "lazy", "waits").status_code))
        waiter.start()
        with contextlib.suppress(httpx.ReadTimeout):
            chat(gw.url, "lazy", "leaves", timeout=0.5)  # gives up while the model starts
        waiter.join(20)
        assert results == [200]
        sent = [r["body"]["messages"][0]["content"] for r in read_records(record, "request")]
        assert sent == ["waits"]  # the leaver's place in the owner's queue was withdrawn, never served
        state = httpx.get(gw.url + "/health", timeout=5).json()["models"]["lazy"]
        assert state["queue_depth"] == 0 and state["replicas"][0]["in_flight"] == 0
        text = httpx.get(gw.url + "/metrics", timeout=5).text
        assert sample(text, "gateway_queue_depth", model="lazy") == 0


def test_keys_hold_in_the_workers_and_in_the_owner(tmp_path: Path) -> None:
    ops, app = "sk-ops-" + "o" * 24, "sk-app-" + "a" * 24
    keys = {
        "api_keys": [
            {"name": "ops", "key": ops, "permissions": ["all"]},
            {"name": "app", "key": app, "permissions": ["chat", "models"]},
        ]
    }
    with run_gateway({**config(), "auth": keys}, tmp_path) as gw:

        def get(path: str, key: str | None = None) -> int:
            headers = {"authorization": f"Bearer {key}"} if key else {}
            return httpx.get(gw.url + path, headers=headers, timeout=5).status_code

        assert chat(gw.url, "m").status_code == 401  # answered by a worker
        allowed = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {app}"},
            timeout=10,
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert allowed.status_code == 200
        assert (get("/v1/models"), get("/v1/models", app)) == (401, 200)  # answered by the owner
        assert (get("/admin/engines", app), get("/admin/engines", ops)) == (403, 200)
        assert "models" not in httpx.get(gw.url + "/health", timeout=5).json()  # no engine detail without a key

        # A forwarded stream: the owner's log follow, through a worker; when the client leaves, the owner ends it.
        def admin_done() -> float:
            text = httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {ops}"}, timeout=5).text
            return sample(text, "gateway_requests_total", model="", endpoint="admin", status="200")

        before = admin_done()
        with httpx.stream(
            "GET",
            gw.url + "/admin/engines/m/logs",
            params={"follow": "true", "tail": 1},
            headers={"authorization": f"Bearer {ops}"},
            timeout=10,
        ) as follow:
            assert follow.headers["content-type"].startswith("text/event-stream")
            lines = cast(Generator[str, None, None], follow.iter_lines())  # a generator: it can be closed
            assert any(line.startswith("data: ") for line in itertools.islice(lines, 4))
            lines.close()
        assert wait_until(lambda: admin_done() == before + 1, 5)
