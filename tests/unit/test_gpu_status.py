"""``GET /gpu/status`` and the GPU gauges through create_app with a fake NVML, and the pid → engine join."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from engines import EngineState, ReplicaSnapshot
from engines.process.procfs import children
from gateway.config.loader import build_config
from gateway.observability.gpu_probe import GpuProbe
from gateway.routes.gpu import Holder, owners_of
from tests.helpers import free_port, wait_until
from tests.unit.test_gpu import FakeNvml, GiB, NVMLError_LibraryNotFound, three_gpus


def sleeper(env: dict[str, str] | None = None, *, with_child: bool = False) -> subprocess.Popen[bytes]:
    command = "sleep 30 & wait" if with_child else "exec sleep 30"
    return subprocess.Popen(["/bin/sh", "-c", command], env={**os.environ, **(env or {})})


@pytest.fixture
def tagged() -> Iterator[subprocess.Popen[bytes]]:
    """A process that carries this process's launch tag for replica remote/0, as an engine's worker would."""
    proc = sleeper({"GATEWAY_ENGINE_ID": "remote/0/1", "GATEWAY_OWNER_PID": str(os.getpid())})
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


def client_for(nvml: FakeNvml) -> TestClient:
    from gateway.app import create_app

    config = build_config(
        {
            "models": {
                "remote": {
                    "engine": "openai",
                    "url": f"http://127.0.0.1:{free_port()}/v1",
                    "load": "on_demand",
                    "gpus": [0, 7],
                }
            }
        }
    )
    return TestClient(create_app(config, gpus=GpuProbe(nvml)))


def test_status_joins_config_and_processes(tagged: subprocess.Popen[bytes]) -> None:
    nvml = three_gpus()
    nvml.gpus[1].processes = [(tagged.pid, 3 * GiB), (1, 1 * GiB)]
    with client_for(nvml) as client:
        body = client.get("/gpu/status").json()
        assert client.get("/health").json()["gpus"] == 3
        metrics = client.get("/metrics").text
    assert body["count"] == 3 and body["reason"] is None
    gpu0, gpu1, gpu2 = body["gpus"]
    assert gpu0["name"] == "H100-a" and gpu0["memory_total_bytes"] == 80 * GiB
    assert gpu0["memory_used_bytes"] == 60 * GiB and gpu0["memory_free_bytes"] == 20 * GiB
    assert gpu0["utilization"] == pytest.approx(0.87) and gpu0["temperature_c"] == 61
    # By config: remote/0 is given GPU 0 (it is stopped, so it holds it in name only).
    assert gpu0["engines"] == [
        {
            "model": "remote",
            "replica": 0,
            "state": "stopped",
            "pid": None,
            "engine_pid": None,
            "configured": True,
            "pids": [],
        }
    ]
    # By evidence: NVML lists a process of remote/0 on GPU 1, and a stranger.
    assert gpu1["engines"] == [
        {
            "model": "remote",
            "replica": 0,
            "state": "stopped",
            "pid": None,
            "engine_pid": None,
            "configured": False,
            "pids": [tagged.pid],
        }
    ]
    assert gpu1["processes"] == [
        {"pid": tagged.pid, "used_memory_bytes": 3 * GiB, "model": "remote", "replica": 0},
        {"pid": 1, "used_memory_bytes": 1 * GiB, "model": None, "replica": None},
    ]
    assert gpu2["power_w"] is None and gpu2["engines"] == []
    assert body["unseen"] == [{"model": "remote", "gpu": 7}]
    assert 'gateway_gpu_memory_used_bytes{gpu="0"}' in metrics
    assert 'gateway_gpu_utilization_ratio{gpu="2"} 0.05' in metrics


def test_status_without_nvml_is_an_empty_answer_with_the_reason() -> None:
    with client_for(FakeNvml([], init_error=NVMLError_LibraryNotFound())) as client:
        response = client.get("/gpu/status")
        health = client.get("/health").json()
    assert response.status_code == 200
    body = response.json()
    assert body["gpus"] == [] and body["count"] == 0 and body["unseen"] == []
    assert body["reason"].startswith("NVML is not available: NVMLError_LibraryNotFound")
    assert health["gpus"] == 0


def test_owners_found_through_the_reaper_tree_when_untagged() -> None:
    parent = sleeper(with_child=True)
    child = None
    try:
        assert wait_until(lambda: children(parent.pid), 5)
        child = children(parent.pid)[0]
        snap = ReplicaSnapshot(
            model="m/with/slash",
            replica=2,
            state=EngineState.READY,
            base_url=None,
            pid=parent.pid,
            engine_pid=None,
            port=None,
            restarts=0,
            last_exit_code=None,
            last_error=None,
            state_since=time.time(),
            ready_since=None,
            launches=1,
            argv=[],
            health_failures=0,
        )
        owners = owners_of([child, 1], [Holder("m/with/slash", (0,), snap)])
        assert owners == {child: ("m/with/slash", 2)}
    finally:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait(5)
