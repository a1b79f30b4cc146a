"""The stand-ins' sleep mode (tests/standin/_sleep.py) against what real vLLM 0.32 and LMDeploy 0.18 do
(docs/real-vllm/transcripts/sleep-mode.md; LMDeploy's serve/openai/endpoints/management.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.standin import harness as h

pytestmark = pytest.mark.timeout(30)
DEV = {"VLLM_SERVER_DEV_MODE": "1"}
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 3}


class Engine:
    def __init__(self, proc: h.Proc, port: int) -> None:
        self.proc, self.port = proc, port

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        data = json.dumps(body if body is not None else {}).encode()
        with h.post(self.port, path, data, headers=headers, timeout=20) as resp:
            return resp.status, resp.read()

    def get(self, path: str) -> tuple[int, bytes]:
        return h.get(self.port, path)

    def asleep(self) -> bool:
        return bool(json.loads(self.get("/is_sleeping")[1])["is_sleeping"])


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Any]:
    procs: list[h.Proc] = []

    def _launch(engine: str, *extra: str, faults: str = "", env: dict[str, str] | None = None) -> Engine:
        port = h.free_port()
        record = tmp_path / f"record-{len(procs)}.jsonl"
        proc = h.launch(engine, [*h.serve_args(engine, port), *extra], h.standin_env(faults, record=record, extra=env))
        procs.append(proc)
        proc.wait_http(port)
        return Engine(proc, port)

    yield _launch
    for proc in procs:
        proc.kill()


def in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(answer=call()), daemon=True)
    thread.start()
    return thread, out


def test_vllm_dev_routes_exist_only_in_dev_mode(launch: Any) -> None:
    plain = launch("vllm")
    assert plain.post("/sleep") == (404, b'{"detail":"Not Found"}')
    assert plain.get("/is_sleeping")[0] == 404
    assert "Route: /sleep" not in plain.proc.stdout()
    dev = launch("vllm", env=DEV)
    assert "SECURITY WARNING: Development endpoints are enabled!" in dev.proc.stdout()
    assert "Route: /sleep, Methods: POST" in dev.proc.stdout()
    assert dev.get("/is_sleeping") == (200, b'{"is_sleeping":false}')


def test_vllm_dev_mode_must_be_an_integer() -> None:
    port = h.free_port()
    with h.launch("vllm", h.serve_args("vllm", port), h.standin_env(extra={"VLLM_SERVER_DEV_MODE": "true"})) as p:
        assert p.wait(10) == 1
        assert "ValueError: invalid literal for int()" in p.stderr()


def test_vllm_bad_level_or_mode_is_its_own_400_as_observed(launch: Any) -> None:
    dev = launch("vllm", env=DEV)
    # byte for byte what real vLLM 0.32 answered (transcripts/sleep-mode.md)
    assert dev.post("/sleep?level=3") == (
        400,
        b"{\"error\":{\"message\":\"1 validation error:\\n  {'type': 'less_than_equal', 'loc': 'query.level', "
        b"'msg': 'Input should be less than or equal to 2', 'input': '3', 'ctx': {'le': 2}}\",\"type\":\"Bad "
        b'Request","param":"query.level","code":400}}',
    )
    status, body = dev.post("/sleep?level=x&mode=later")
    assert status == 400 and json.loads(body)["error"]["message"].startswith("2 validation errors:\n")
    assert not dev.asleep()


def test_vllm_sleep_holds_new_requests_and_aborts_those_in_flight(launch: Any) -> None:
    dev = launch("vllm", "--enable-sleep-mode", env=DEV, faults="token-interval=0.1")
    stream, streamed = in_thread(
        lambda: dev.post("/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 40, "ignore_eos": True})
    )
    time.sleep(0.5)
    assert dev.post("/sleep?level=1") == (200, b'{"status":"sleeping","level":1}')
    stream.join(10)
    events = [e for e in streamed["answer"][1].decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "abort"
    assert dev.asleep() and dev.get("/health") == (200, b"")
    metrics = dev.get("/metrics")[1].decode()
    assert 'vllm:engine_sleep_state{engine="0",model_name="m1",sleep_state="awake"} 0.0' in metrics
    assert 'vllm:engine_sleep_state{engine="0",model_name="m1",sleep_state="weights_offloaded"} 1.0' in metrics
    held, answered = in_thread(lambda: dev.post("/v1/chat/completions", CHAT))
    time.sleep(0.5)
    assert "answer" not in answered  # held while asleep
    assert dev.post("/wake_up") == (200, b'{"status":"awake","tags":null}')
    held.join(10)
    assert answered["answer"][0] == 200 and not dev.asleep()
    assert [r["frees_memory"] for r in dev.proc.records("sleep")] == [True]
    assert "Sleep mode freed 0.50 GiB memory" in dev.proc.stdout()


def test_vllm_without_enable_sleep_mode_answers_but_frees_nothing(launch: Any) -> None:
    dev = launch("vllm", env=DEV)
    assert dev.post("/sleep") == (200, b'{"status":"sleeping","level":1}')
    assert [r["frees_memory"] for r in dev.proc.records("sleep")] == [False]
    assert "Sleep mode freed 0.00 GiB memory" in dev.proc.stdout()


def test_vllm_level_2_woken_in_parts(launch: Any) -> None:
    dev = launch("vllm", env=DEV)
    assert dev.post("/sleep?level=2&mode=abort") == (200, b'{"status":"sleeping","level":2}')
    assert dev.post("/wake_up?tags=weights") == (200, b'{"status":"sleeping","tags":["weights"]}')
    assert dev.asleep()
    assert dev.post("/collective_rpc", {"method": "reload_weights"}) == (200, b'{"results":[null]}')
    assert dev.post("/collective_rpc", {"method": "nope"})[0] == 500
    assert dev.post("/wake_up?tags=kv_cache") == (200, b'{"status":"awake","tags":["kv_cache"]}')
    assert not dev.asleep()


def test_vllm_wait_and_keep_modes(launch: Any) -> None:
    dev = launch("vllm", env=DEV, faults="token-interval=0.1")
    long = {**CHAT, "max_tokens": 8, "ignore_eos": True}
    first, done = in_thread(lambda: dev.post("/v1/chat/completions", long))
    time.sleep(0.3)
    assert dev.post("/sleep?mode=wait")[0] == 200  # answers once the request in flight is done
    first.join(10)
    assert json.loads(done["answer"][1])["choices"][0]["finish_reason"] == "length"  # not aborted
    dev.post("/wake_up")
    kept, done = in_thread(lambda: dev.post("/v1/chat/completions", long))
    time.sleep(0.3)
    assert dev.post("/sleep?mode=keep")[0] == 200
    time.sleep(1.0)
    assert "answer" not in done  # frozen where it was
    dev.post("/wake_up")
    kept.join(10)
    assert json.loads(done["answer"][1])["choices"][0]["finish_reason"] == "length"


def test_vllm_sleep_and_wake_faults(launch: Any) -> None:
    dev = launch("vllm", env=DEV, faults="sleep-fails,sleep-delay=0.3")
    began = time.monotonic()
    status, body = dev.post("/sleep")
    assert time.monotonic() - began >= 0.3
    assert status == 500 and json.loads(body)["error"]["type"] == "InternalServerError" and not dev.asleep()
    other = launch("vllm", env=DEV, faults="wake-fails,wake-delay=0.3")
    assert other.post("/sleep")[0] == 200
    began = time.monotonic()
    assert other.post("/wake_up")[0] == 500
    assert time.monotonic() - began >= 0.3 and other.asleep()


def test_lmdeploy_sleep_wakeup_and_refusals(launch: Any) -> None:
    key = {"authorization": "Bearer sk-l"}
    lm = launch("lmdeploy", "--api-keys", "sk-l", "--backend", "pytorch", faults="token-interval=0.1")
    with h.post(lm.port, "/sleep", b"", headers={**key, "content-type": "text/plain"}) as resp:
        assert resp.status == 400 and b"Only 'application/json' is allowed" in resp.read()
    assert lm.post("/sleep")[0] == 401  # behind the key, as every path but /health
    status, body = lm.post("/sleep?level=3", headers=key)
    assert status == 400 and json.loads(body)["message"] == 'The "level" query parameter must be 1 or 2.'
    stream, streamed = in_thread(
        lambda: lm.post(
            "/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 40, "ignore_eos": True}, headers=key
        )
    )
    time.sleep(0.5)
    assert lm.post("/sleep?level=1", headers=key) == (200, b"")
    stream.join(10)
    assert '"finish_reason":"abort"' in streamed["answer"][1].decode()  # every session is stopped
    assert lm.get("/health") == (200, b'{"status":"sleeping","message":"Engine is sleeping."}')
    assert lm.get("/is_sleeping")[0] == 401  # behind the key too
    status, body = lm.post("/v1/chat/completions", CHAT)  # 503 before the key is even checked
    assert status == 503 and json.loads(body)["type"] == "server_error" and "/wakeup" in json.loads(body)["message"]
    status, body = lm.post("/v1/messages", {**CHAT, "max_tokens": 3})
    assert status == 503 and json.loads(body)["error"]["type"] == "overloaded_error"
    assert lm.post("/wakeup", headers=key) == (200, b"")
    assert lm.post("/v1/chat/completions", CHAT, headers=key)[0] == 200
    assert lm.get("/health")[0] == 200 and json.loads(lm.get("/health")[1])["status"] == "healthy"
