"""The stand-in ``vllm`` and ``lmdeploy`` executables: real command lines, real HTTP shapes, faults on demand.

Each test launches real subprocesses on free ports and kills their whole tree (group + tagged stragglers) in
the fixture's teardown, whatever happens.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from tests.standin import harness as h
except ImportError:  # tests/ is not on sys.path (rootdir-less run): load the helper by its path
    _spec = importlib.util.spec_from_file_location(
        "standin_harness", Path(__file__).resolve().parents[1] / "standin" / "harness.py"
    )
    assert _spec is not None and _spec.loader is not None
    h = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(h)

pytestmark = pytest.mark.timeout(30)
PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
CHAT = {"messages": [{"role": "user", "content": "hello there world"}]}

Start = Callable[..., Any]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    procs: list[Any] = []

    def _start(
        engine: str,
        *extra: str,
        faults: str | dict | None = None,
        ready: bool = True,
        faults_file: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Any:
        port = h.free_port()
        rec = tmp_path / f"record-{len(procs)}.jsonl"
        proc = h.launch(
            engine,
            [*h.serve_args(engine, port, "m1", *(("m2",) if engine == "vllm" else ())), *extra],
            h.standin_env(faults, faults_file=faults_file, record=rec, extra=env),
            port,
        )
        procs.append(proc)
        if ready:
            proc.wait_http(port)
        return proc

    yield _start
    for proc in procs:
        proc.kill()


def events(raw: bytes) -> list[Any]:
    """The SSE ``data:`` payloads of a (possibly chunk-framed) body, JSON-decoded except ``[DONE]``."""
    out = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: "):
            text = line[6:].decode()
            out.append(text if text == "[DONE]" else json.loads(text))
    return out


def stream_body(**extra: Any) -> dict[str, Any]:
    return {**CHAT, "stream": True, "stream_options": {"include_usage": True}, **extra}


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``check`` until it returns something truthy: forked children retitle and setsid on their own time."""
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return result


def run_cli(engine: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = h.VLLM if engine == "vllm" else h.LMDEPLOY
    return subprocess.run(
        [sys.executable, str(exe), *args], capture_output=True, text=True, timeout=15, env=h.standin_env()
    )


# ---- command line -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("engine", "args"),
    [
        ("vllm", ["serve", "m", "--no-such-flag"]),
        ("vllm", ["serve", "m", "--served-model-nam", "x"]),  # argparse would complete an abbreviation
        ("vllm", ["serve", "m", "--tp", "2"]),  # LMDeploy's spelling
        ("vllm", ["serve", "m", "--dtype", "fp7"]),
        ("vllm", ["serve", "m", "--limit-mm-per-prompt", "{not json"]),
        ("lmdeploy", ["serve", "api_server", "m", "--tensor-parallel-size", "2"]),  # vLLM's spelling
        ("lmdeploy", ["serve", "api_server", "m", "--api-key", "k"]),  # it is --api-keys
        ("lmdeploy", ["serve", "api_server", "m", "--backend", "vllm"]),
    ],
)
def test_unknown_or_bad_flag_exits_2(engine: str, args: list[str]) -> None:
    done = run_cli(engine, *args)
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr and "usage:" in done.stderr


def test_unknown_fault_key_exits_2() -> None:
    env = h.standin_env("crash-after-chunk=3")
    done = subprocess.run(
        [sys.executable, str(h.VLLM), "serve", "m"], env=env, capture_output=True, text=True, timeout=15
    )
    assert done.returncode == 2 and "unknown fault key 'crash-after-chunk'" in done.stderr


def test_vllm_accepts_real_spellings_and_guards_v1_only(start: Start) -> None:
    p = start(
        "vllm",
        "--gpu_memory_utilization",
        "0.5",
        "--no-enforce-eager",
        "--trust-remote-code",
        "--limit-mm-per-prompt.image",
        "2",
        "--max-model-len",
        "1K",
        "-tp",
        "1",
        "--api-key",
        "k1",
        "k2",
        "--enable-request-id-headers",
    )
    assert h.get(p.port, "/health") == (200, b"")
    assert h.get(p.port, "/version") == (200, b'{"version":"0.33.0"}')
    assert h.get(p.port, "/v1/models") == (401, b'{"error":"Unauthorized"}')
    status, body = h.get(p.port, "/v1/models", {"authorization": "Bearer k2"})
    models = json.loads(body)
    assert status == 200 and [m["id"] for m in models["data"]] == ["m1", "m2"]
    assert models["data"][0]["max_model_len"] == 1024 and models["data"][0]["root"] == "org/model"
    assert h.get(p.port, "/metrics")[0] == 200  # outside /v1: no key needed
    with h.post(
        p.port,
        "/v1/chat/completions",
        json.dumps({**CHAT, "model": "m2"}).encode(),
        {"authorization": "Bearer k1", "x-request-id": "abc"},
    ) as r:
        out = json.loads(r.read())
        assert r.status == 200 and r.getheader("x-request-id") == "abc"
    assert out["id"] == "chatcmpl-abc" and out["model"] == "m1"  # answers with the first served name
    assert out["choices"][0]["message"]["content"] == "hello there world"
    assert out["usage"]["prompt_tokens"] == 3 and out["usage"]["completion_tokens"] == 3


# ---- readiness --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["vllm", "lmdeploy"])
def test_refused_while_loading_then_healthy(start: Start, engine: str) -> None:
    p = start(engine, faults="startup-delay=1.0", ready=False)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.port), timeout=1).close()
        time.sleep(0.05)
    assert p.wait_http(p.port, timeout=10) > 0.4
    status, body = h.get(p.port, "/health")
    if engine == "vllm":
        assert (status, body) == (200, b"")
        assert "Starting vLLM server on http://127.0.0.1:" in p.output()
        assert "Application startup complete." in p.output()
    else:
        assert (status, json.loads(body)) == (200, {"status": "healthy", "message": "Engine is healthy."})
        assert f"HINT:    Please open http://127.0.0.1:{p.port}" in p.output()
        assert f"Uvicorn running on http://127.0.0.1:{p.port}" in p.output()


# ---- shapes -----------------------------------------------------------------------------------------------
def test_vllm_stream_shape_with_openai_sdk(start: Start) -> None:
    from openai import OpenAI

    p = start("vllm")
    with OpenAI(base_url=f"http://127.0.0.1:{p.port}/v1", api_key="unused", max_retries=0, timeout=10) as client:
        chunks = list(
            client.chat.completions.create(
                model="m2", messages=CHAT["messages"], stream=True, stream_options={"include_usage": True}
            )
        )
        reply = client.chat.completions.create(model="m1", messages=CHAT["messages"], max_tokens=2)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there world"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6
    assert {c.model for c in chunks} == {"m1"}
    assert reply.choices[0].message.content == "hello there" and reply.choices[0].finish_reason == "length"

    raw = h.raw_request(p.port, "POST", "/v1/chat/completions", stream_body())
    assert raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # chunked framing around SSE events
    got = events(raw)
    assert got[0]["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    assert got[1]["choices"][0]["finish_reason"] is None and "usage" not in got[1]


def test_lmdeploy_stream_shape(start: Start) -> None:
    p = start("lmdeploy")
    raw = h.raw_request(p.port, "POST", "/v1/chat/completions", stream_body(model="m1"))
    got = events(raw)
    assert got[-1] == "[DONE]"
    usage_chunk, content = got[-2], got[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3
    for chunk in content:
        assert chunk["model"] == "m1" and chunk["usage"] is None  # include_usage: "usage": null on every chunk
        choice = chunk["choices"][0]
        assert choice["delta"]["role"] == "assistant" and "logprobs" not in choice
    assert all("finish_reason" not in c["choices"][0] for c in content[:-1])
    assert content[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == "hello there world"


def test_unknown_model_404_in_each_dialect(start: Start) -> None:
    lmd, vll = start("lmdeploy"), start("vllm")
    with h.post(lmd.port, "/v1/chat/completions", json.dumps({**CHAT, "model": "m2"}).encode()) as r:
        assert r.status == 404
        assert json.loads(r.read()) == {
            "message": "The model 'm2' does not exist.",
            "type": "not_found_error",
            "code": 404,
            "param": None,
            "object": "error",
        }
    with h.post(lmd.port, "/v1/embeddings", b'{"model": "m1", "input": "x"}') as r:
        assert r.status == 400 and json.loads(r.read())["message"] == "Unsupported by turbomind."
    with h.post(vll.port, "/v1/chat/completions", json.dumps({**CHAT, "model": "nope"}).encode()) as r:
        err = json.loads(r.read())["error"]
        assert r.status == 404 and err["type"] == "NotFoundError" and err["param"] == "model" and err["code"] == 404
    with h.post(vll.port, "/v1/chat/completions", b'{"stream": true}') as r:
        err = json.loads(r.read())["error"]
        assert r.status == 400 and err["type"] == "Bad Request" and err["param"] == "messages"


def test_images_reach_the_engine_and_requests_are_recorded(start: Start) -> None:
    vll, lmd = start("vllm"), start("lmdeploy")
    url = "data:image/png;base64," + base64.b64encode(PNG_1x1).decode()
    msg = {
        "role": "user",
        "content": [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": url}}],
    }
    with h.post(
        vll.port,
        "/v1/chat/completions",
        json.dumps({"messages": [msg]}).encode(),
        {"authorization": "Bearer client-key"},
    ) as r:
        out = json.loads(r.read())
        assert r.status == 200 and r.getheader("x-standin-images") == "1"
    assert out["choices"][0]["message"]["content"] == "[images=1] describe"
    request = vll.records("request")[-1]
    assert request["headers"]["authorization"] == "Bearer client-key" and request["body"]["messages"] == [msg]
    media = vll.records("media")[-1]
    assert media["source"] == "data" and media["format"] == "png" and media["bytes"] == len(PNG_1x1)
    blocked = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.1.2.3/a.png"}}]}
    with h.post(lmd.port, "/v1/chat/completions", json.dumps({"model": "m1", "messages": [blocked]}).encode()) as r:
        assert r.status == 400
        assert (
            json.loads(r.read())["message"]
            == "URL is blocked for security reasons: Blocked non-global IP detected: 10.1.2.3"
        )


# ---- faults -----------------------------------------------------------------------------------------------
def test_crash_after_chunks_ends_stream_and_process(start: Start) -> None:
    p = start("vllm", faults="crash-after-chunks=3")
    raw = h.raw_request(p.port, "POST", "/v1/chat/completions", stream_body())
    assert len(events(raw)) == 3 and b"[DONE]" not in raw and not raw.endswith(b"0\r\n\r\n")
    assert p.wait(5) == 1


def test_close_after_chunks_cuts_inside_a_line_and_lives_on(start: Start) -> None:
    p = start("lmdeploy", faults="close-after-chunks=2")
    raw = h.raw_request(p.port, "POST", "/v1/chat/completions", stream_body(model="m1"))
    body = raw.split(b"\r\n\r\n", 1)[1]
    lines = [ln for ln in body.split(b"\r\n") if ln.startswith(b"data: ")]
    assert len(lines) == 3 and not lines[-1].endswith(b"\n\n")  # two whole events, then half of one
    assert h.get(p.port, "/health")[0] == 200


def test_hang_before_headers_and_disconnect_is_recorded(start: Start) -> None:
    p = start("lmdeploy", faults="hang-before-headers,record-disconnects")
    sock = h.raw_request(p.port, "POST", "/v1/chat/completions", {**CHAT, "model": "m1"}, read=False)
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(1)  # not even a status line
    closed = time.time()
    sock.close()
    deadline = time.monotonic() + 3
    while not p.records("disconnect") and time.monotonic() < deadline:
        time.sleep(0.02)
    gone = p.records("disconnect")
    assert gone and gone[0]["path"] == "/v1/chat/completions" and gone[0]["ts"] - closed < 1.0
    assert "client disconnected" in p.stderr()


def test_faults_file_changes_a_running_engine(start: Start, tmp_path: Path) -> None:
    ff = tmp_path / "faults.json"
    h.write_faults(ff, {"status": 429, "retry-after": 2})
    p = start("vllm", faults_file=ff)
    with h.post(p.port, "/v1/chat/completions", json.dumps(CHAT).encode()) as r:
        assert r.status == 429 and r.getheader("retry-after") == "2"
        assert json.loads(r.read())["error"]["code"] == 429
    h.write_faults(ff, {"health": "fail"})
    assert h.get(p.port, "/health")[0] == 503
    with h.post(p.port, "/v1/chat/completions", json.dumps(CHAT).encode()) as r:
        assert r.status == 200


# ---- signals and the process tree -------------------------------------------------------------------------
def test_sigterm_vllm_aborts_in_flight_stream(start: Start) -> None:
    p = start("vllm", faults="token-interval=0.2")
    sock = h.raw_request(
        p.port, "POST", "/v1/chat/completions", stream_body(max_tokens=100, ignore_eos=True), read=False
    )
    with sock:
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        os.kill(p.pid, signal.SIGTERM)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    tail = events(rest)
    # vLLM 0.32 (docs/real-vllm/transcripts/sigterm-inflight): no error event; the usage chunk, then [DONE].
    assert tail[-1] == "[DONE]" and not any("error" in e for e in tail if isinstance(e, dict))
    assert tail[-3]["choices"][0]["finish_reason"] == "abort" and tail[-3]["choices"][0]["stop_reason"] is None
    assert tail[-2]["choices"] == [] and tail[-2]["usage"]["completion_tokens"] < 100  # cut short
    assert p.wait(5) == 0
    deadline = time.monotonic() + 3
    while h.group_pids(p.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not h.group_pids(p.pid)  # the EngineCore went with it


def test_sigterm_vllm_answers_in_flight_non_stream_200_abort(start: Start) -> None:
    p = start("vllm", faults="token-interval=0.2")
    body = {**CHAT, "max_tokens": 100, "ignore_eos": True}
    sock = h.raw_request(p.port, "POST", "/v1/chat/completions", body, read=False)
    with sock:
        time.sleep(0.5)
        os.kill(p.pid, signal.SIGTERM)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    out = json.loads(payload)
    assert out["choices"][0]["finish_reason"] == "abort"
    assert 0 < out["usage"]["completion_tokens"] < 100  # the text made so far
    assert p.wait(5) == 0


def test_vllm_late_sigterm_while_loading_is_swallowed(start: Start) -> None:
    p = start("vllm", faults="startup-delay=1.5,sigterm-swallowed-after=0.5", ready=False)
    time.sleep(0.8)
    os.kill(p.pid, signal.SIGTERM)  # swallowed: the load goes on and the server serves
    p.wait_http(p.port, timeout=10)
    assert h.get(p.port, "/health")[0] == 200
    os.kill(p.pid, signal.SIGTERM)  # once serving, a SIGTERM stops it as usual
    assert p.wait(5) == 0


def test_vllm_early_sigterm_while_loading_stops_it(start: Start) -> None:
    p = start("vllm", faults="startup-delay=5", ready=False)
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(5) == 1


def test_vllm_request_on_dead_engine_is_500_then_the_server_exits(start: Start) -> None:
    p = start("vllm", faults="engine-dead-after=0.2,watchdog=30")
    assert eventually(lambda: h.get(p.port, "/health")[0] == 503)
    with h.post(p.port, "/v1/chat/completions", json.dumps(CHAT).encode()) as r:
        assert r.status == 500
        assert json.loads(r.read())["error"]["message"].startswith("EngineCore encountered an issue")
    assert p.wait(5) == 0  # well before the 30 s watchdog


def test_vllm_real_errors_head_ids_and_metrics(start: Start) -> None:
    """Shapes seen on vLLM 0.32 (docs/real-vllm/transcripts/): texts, params, ids, HEAD, metrics type."""
    p = start("vllm", "--max-model-len", "512")

    def chat(**extra: Any) -> tuple[int, Any]:
        with h.post(p.port, "/v1/chat/completions", json.dumps({**CHAT, **extra}).encode()) as r:
            return r.status, json.loads(r.read())

    status, out = chat(max_tokens=5000)
    assert status == 400 and out["error"]["param"] == "max_tokens" and out["error"]["type"] == "BadRequestError"
    assert out["error"]["message"].startswith("max_tokens=5000 cannot be greater than max_model_len=512.")
    status, out = chat(max_tokens=-1)
    assert status == 400 and out["error"]["param"] == "max_tokens"
    status, out = chat(max_tokens=510, ignore_eos=True)  # prompt + max_tokens over the limit: clamped
    assert status == 200 and out["usage"]["total_tokens"] == 512
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    status, out = chat(tools=tools)
    assert status == 400 and "--enable-auto-tool-choice and --tool-call-parser" in out["error"]["message"]
    status, out = chat(tools=tools, tool_choice="required")
    assert status == 400 and out["error"]["message"] == 'tool_choice="required" requires --tool-call-parser to be set'
    assert chat(tools=tools, tool_choice="none")[0] == 200
    status, out = chat(stream_options={"include_usage": True})
    assert status == 400 and out["error"]["param"] == "stream_options"
    status, out = chat(messages=[{"role": "user", "content": "w " * 600}])
    assert status == 400 and out["error"]["param"] == "input_tokens" and "at least 513" in out["error"]["message"]
    status, out = chat()
    assert status == 200 and len(out["id"]) == len("chatcmpl-") + 16
    raw = h.raw_request(p.port, "HEAD", "/health", None)
    assert raw.startswith(b"HTTP/1.1 405") and b"allow: get" in raw.lower()
    with h.post(p.port, "/metrics", b"") as r:
        assert r.status == 405
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        head = sock.recv(65536)
    assert b"content-type: text/plain; version=1.0.0; charset=utf-8" in head.lower()


def test_vllm_tools_with_a_parser_and_abort_log_with_log_requests(start: Start) -> None:
    p = start(
        "vllm",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "pythonic",
        "--enable-log-requests",
        faults="token-interval=0.1",
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with h.post(p.port, "/v1/chat/completions", json.dumps({**CHAT, "tools": tools}).encode()) as r:
        assert r.status == 200
    body = stream_body(max_tokens=50, ignore_eos=True)
    sock = h.raw_request(p.port, "POST", "/v1/chat/completions", body, {"x-request-id": "left1"}, read=False)
    with sock:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert eventually(lambda: "Request chatcmpl-left1 aborted." in p.output())
    assert "Aborted request(s) chatcmpl-left1-" in p.output()


def test_sigterm_lmdeploy_waits_for_open_stream(start: Start) -> None:
    p = start("lmdeploy", faults="token-interval=0.1")
    sock = h.raw_request(
        p.port, "POST", "/v1/chat/completions", stream_body(model="m1", max_tokens=10, ignore_eos=True), read=False
    )
    with sock:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        os.kill(p.pid, signal.SIGTERM)
        time.sleep(0.3)
        assert p.popen.poll() is None  # still serving the stream
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.port), timeout=1).close()
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    assert events(rest)[-1] == "[DONE]"
    assert p.wait(5) == 0


def test_vllm_engine_core_survives_sigkill_of_api_server(start: Start) -> None:
    p = start("vllm", "--tensor-parallel-size", "2")
    want = ["VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1"]
    assert eventually(lambda: sorted(h.cmdline(pid) for pid in h.group_pids(p.pid) if pid != p.pid) == want)
    children = [pid for pid in h.tagged_pids(p.tag) if pid != p.pid]  # the environment was inherited
    assert len(children) == 3
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(5) == -signal.SIGKILL
    time.sleep(0.3)
    assert all(h.alive(pid) for pid in children)  # orphaned, as in vLLM issue #55510
    with pytest.raises(ConnectionRefusedError):  # but the port is free
        socket.create_connection(("127.0.0.1", p.port), timeout=1).close()
    p.kill()
    assert not any(h.alive(pid) for pid in children)


def test_setsid_workers_leave_the_group_but_keep_the_tag(start: Start) -> None:
    p = start("lmdeploy", faults="fork-workers=2,setsid")

    def outside() -> set[int]:
        found = set(h.tagged_pids(p.tag)) - set(h.group_pids(p.pid))
        return found if len(found) == 2 and all(h.cmdline(w) == "ray::RayWorkerWrapper" for w in found) else set()

    workers = eventually(outside)
    assert workers
    p.kill()
    assert not any(h.alive(w) for w in workers)
