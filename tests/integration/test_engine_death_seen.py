"""An engine that dies is seen at once, not after the probe interval (found against real vLLM, docs/real-vllm).

* EngineCore SIGKILLed: vLLM's ``/health`` is 503 at once, but the gateway probed every ``interval`` and needed
  ``unhealthy_threshold`` failures: for seconds it routed requests to a dead replica and ``/ready`` said 200.
  Now a failed request asks the replica's supervisor for a probe at once (rate-limited), and a failed probe
  after it takes the replica out of rotation. The probe interval here is a minute: only that prompt probe can
  explain what the test sees.
* The API server SIGKILLed: the reaper says ``exited`` on its status pipe before it ends the orphans (which
  ignore SIGTERM, as vLLM's do), so the replica leaves READY before they are gone, not after.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Gateway, chat, run_gateway, wait_until
from tests.helpers import standin_model as model
from tests.standin.harness import read_records

pytestmark = pytest.mark.timeout(90)


def _row(gw: Gateway) -> dict[str, Any]:
    rows = httpx.get(gw.url + "/admin/engines", timeout=5).json()["data"]
    return dict(rows[0])


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _engine_core(gw: Gateway) -> int:
    cores = [p for p in gw.engine_pids() if _comm(p).startswith("VLLM::EngineCor")]
    assert len(cores) == 1, {p: _comm(p) for p in gw.engine_pids()}
    return cores[0]


def test_a_request_that_meets_a_dead_engine_takes_the_replica_out_of_rotation_at_once(tmp_path: Path) -> None:
    record = tmp_path / "engine.jsonl"
    config = {
        "server": {"queue_timeout": 1},
        "models": {
            "chat": model(
                # Probed once a minute: only the prompt probe can notice within the test.
                health={"interval": 60, "startup_interval": 0.1, "unhealthy_threshold": 3, "restart_grace": 600},
                # The API server stays up with a dead engine (/health 503): the probe, not the exit, must tell.
                env={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1", "STANDIN_RECORD": str(record)},
            )
        },
    }
    with run_gateway(config, tmp_path) as gw:
        assert chat(gw.url, "chat").status_code == 200
        os.kill(_engine_core(gw), signal.SIGKILL)
        assert wait_until(lambda: httpx.get(gw.url + "/health", timeout=5).status_code == 200, 5)
        met = chat(gw.url, "chat")
        assert met.status_code == 500, met.text  # vLLM's own 500, in the gateway's shape
        assert wait_until(lambda: _row(gw)["state"] == "unhealthy", 30), _row(gw)
        assert "health check agrees" in (_row(gw)["last_error"] or "")
        # Out of rotation: the next request waits for a ready replica and gets the gateway's 503, and never
        # reaches the dead engine.
        sent = len(read_records(record, "request"))
        refused = chat(gw.url, "chat")
        assert refused.status_code == 503, refused.text
        assert len(read_records(record, "request")) == sent
        # /ready and /health tell the truth meanwhile.
        assert httpx.get(gw.url + "/ready", timeout=5).status_code == 503
        health = httpx.get(gw.url + "/health", timeout=5).json()
        assert health["models"]["chat"]["state"] != "ready", health
        assert health["models"]["chat"]["replicas"][0]["state"] == "unhealthy", health


def test_the_api_server_killed_is_seen_before_its_orphans_are_ended(tmp_path: Path) -> None:
    config = {
        "models": {
            "chat": model(
                health={"interval": 60, "startup_interval": 0.1},
                restart={"initial_delay": 0, "jitter": 0},
                stop_grace=5,
                # vLLM's EngineCore and Worker ignore SIGTERM once orphaned: only SIGKILL ends them.
                env={"STANDIN_FAULTS": "ignore-sigterm=all"},
            )
        },
    }
    with run_gateway(config, tmp_path) as gw:
        first = _row(gw)
        api = first["engine_pid"]
        # Both processes, named, in the admin row and in /health's: the reaper above the engine's main process.
        assert first["reaper_pid"] == first["pid"] and api not in (None, first["reaper_pid"]), first
        replica = httpx.get(gw.url + "/health", timeout=5).json()["models"]["chat"]["replicas"][0]
        assert (replica["engine_pid"], replica["reaper_pid"]) == (api, first["reaper_pid"]), replica
        core = _engine_core(gw)
        os.kill(api, signal.SIGKILL)
        assert wait_until(lambda: _row(gw)["state"] != "ready", 30), _row(gw)
        # The orphans are gone (SIGKILL after the reaper's short exit grace) and the replica serves again.
        assert wait_until(lambda: _comm(core) == "" or not os.path.exists(f"/proc/{core}"), 30)
        assert wait_until(lambda: _row(gw)["state"] == "ready" and _row(gw)["engine_pid"] != api, 60), _row(gw)
        assert chat(gw.url, "chat").status_code == 200
        log = gw.log()
    left = log.index("exited with code 137 while ready")
    swept = log.index("still alive after")  # the reaper's SIGKILL of the orphans that ignored its SIGTERM
    assert left < swept, log[-4000:]
