"""Canary scan (docs/RELIABILITY.md §6 H1/H2): secrets and request content never show where they must not.

One real gateway in front of the vLLM and LMDeploy stand-ins (and a remote OpenAI-style server that needs
a key) gets a representative set of requests carrying canaries: API keys ``sk-CANARY-KEY-…`` (valid,
wrong, in the wrong places), a canary prompt word, a PNG whose base64 is a canary, image URLs with
``?sig=CANARY…``, malformed bodies, and engines failing on purpose (500, garbage, a crash mid-stream).
Then every surface is searched.

What the gateway promises (and this module checks):

* Its own output — log lines at debug level, the access log, error bodies, ``/metrics``, ``/health``,
  ``/ready``, ``/v1/models``, the admin API — carries no API key, no prompt, no image bytes and no
  image-URL query, whatever the request and whatever the engine did.
* Error bodies carry no stack trace, no engine address (``127.0.0.1:<port>``) and no engine command line.
* Engine output (the admin log tail, and the gateway log that mirrors it) is the engine's own: the
  gateway scrubs the secrets it knows (the values of secret-looking ``args``/``env`` entries, the remote
  key) at the pipe, and never turns on an engine's request logging. It cannot scrub what it does not
  know: an operator who adds ``enable-log-requests`` to ``args`` gets prompts in the engine log, as with
  the engine alone. The stand-ins print their non-default arguments (the engine key among them) like
  vLLM, but no request content, so here no canary may show in engine output at all.
* Engines and image servers never see a client's key; engines never see the gateway's own keys.
* An engine's 4xx error body goes back to the client that caused it, unchanged in substance (C7). It
  may quote that client's own input (FastAPI validation text does); it is never logged.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.helpers import Gateway, free_port, run_gateway, standin_command, wait_until
from tests.standin.harness import launch, serve_args, standin_env, write_faults

TAG = secrets.token_hex(6)
APP_KEY = f"sk-CANARY-KEY-app-{TAG}"
OPS_KEY = f"sk-CANARY-KEY-ops-{TAG}"
WRONG_KEY = f"sk-CANARY-KEY-wrong-{TAG}"
ENGINE_KEY = f"sk-CANARY-KEY-engine-{TAG}"  # an engine's own --api-key (vLLM prints its args at start)
REMOTE_KEY = f"sk-CANARY-KEY-remote-{TAG}"  # the key the gateway sends to a remote server
PROMPT = f"CANARYPROMPT{TAG}"
SIG = f"CANARYSIG{TAG}"


def _noise_png() -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (24, 24), os.urandom(24 * 24 * 3)).save(out, format="PNG")
    return out.getvalue()


PNG = _noise_png()
PNG_B64 = base64.b64encode(PNG).decode()
DATA_URL = "data:image/png;base64," + PNG_B64

CANARIES = {
    "app key": APP_KEY,
    "ops key": OPS_KEY,
    "wrong key": WRONG_KEY,
    "engine key": ENGINE_KEY,
    "remote key": REMOTE_KEY,
    "prompt": PROMPT,
    "url signature": SIG,
    # Any 48 characters from the middle of the image's base64 (its start is the same for every PNG).
    "image base64": PNG_B64[len(PNG_B64) // 2 : len(PNG_B64) // 2 + 48],
    "any key": "sk-CANARY-KEY",
}
KEYS = {name: value for name, value in CANARIES.items() if "key" in name}
TIMEOUT = 15


def found(text: str, canaries: dict[str, str] = CANARIES) -> list[str]:
    return [name for name, value in canaries.items() if value in text]


# -- the image server -------------------------------------------------------------------------------------


@dataclass
class Images:
    server: ThreadingHTTPServer
    seen: list[dict[str, str]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}?sig={SIG}&exp=1"


_ROUTES = {"/cat.png": (200, "image/png", PNG), "/page": (200, "text/html", b"<html>not an image</html>")}


def _image_server() -> Images:
    images: Images

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            images.seen.append({k.lower(): v for k, v in self.headers.items()})
            status, kind, body = _ROUTES.get(self.path.split("?")[0], (404, "text/plain", b"gone"))
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    images = Images(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    images.server.daemon_threads = True
    threading.Thread(target=images.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return images


# -- the run: one gateway, every request, every answer kept -------------------------------------------------


@dataclass
class Answer:
    what: str
    status: int
    headers: dict[str, str]
    body: str


@dataclass
class Run:
    gateway: Gateway
    images: Images
    record: Path
    http: httpx.Client
    answers: list[Answer] = field(default_factory=list)
    engine_ports: list[int] = field(default_factory=list)
    engine_environ: list[str] = field(default_factory=list)

    def keep(self, what: str, response: httpx.Response) -> httpx.Response:
        self.answers.append(Answer(what, response.status_code, dict(response.headers), response.text))
        return response

    def post(self, what: str, path: str, *, key: str | None = APP_KEY, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return self.keep(what, self.http.post(path, headers=headers, **kwargs))

    def get(self, what: str, path: str, *, key: str | None = OPS_KEY, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key is not None else {}
        return self.keep(what, self.http.get(path, headers=headers, **kwargs))

    def errors(self) -> list[Answer]:
        return [a for a in self.answers if a.status >= 400 or '"error"' in a.body]

    def ready(self) -> bool:
        return self.http.get("/ready").status_code == 200


def _chat(model: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def _image_message(url: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": f"what is in {PROMPT}"}, {"type": "image_url", "image_url": {"url": url}}]


def _drive(run: Run, faults: Path) -> None:
    """Every kind of request, each with canaries; answers are kept for the scans."""
    text = f"please remember {PROMPT} for later"
    # Successes on every path: chat (both engines, stream or not), completions, embeddings, rerank, remote.
    run.post("chat", "/v1/chat/completions", json=_chat("chat", text))
    run.post("chat stream", "/v1/chat/completions", json=_chat("vl", text, stream=True))
    run.post("completion", "/v1/completions", json={"model": "chat", "prompt": text, "max_tokens": 3})
    run.post("embedding", "/v1/embeddings", json={"model": "chat", "input": [text]})
    run.post("rerank", "/v1/rerank", json={"model": "chat", "query": text, "documents": ["a", PROMPT]})
    run.post("remote", "/v1/chat/completions", json=_chat("remote", text))
    # Images: inline base64, fetched by URL with a signature, the simple endpoints and an upload.
    run.post("data url", "/v1/chat/completions", json=_chat("vl", _image_message(DATA_URL)))
    run.post("signed url", "/v1/chat/completions", json=_chat("vl", _image_message(run.images.url("/cat.png"))))
    run.post("infer", "/infer", json={"model": "vl", "prompt": text, "image": run.images.url("/cat.png")})
    run.post("analyze", "/analyze", json={"model": "vl", "image": DATA_URL, "question": text})
    run.post(
        "upload", "/infer/upload", data={"model": "vl", "prompt": text}, files={"file": ("cat.png", PNG, "image/png")}
    )
    # Images that fail: 404, not an image, nothing listening, a bad data URL, a private address refused.
    run.post("image 404", "/v1/chat/completions", json=_chat("vl", _image_message(run.images.url("/gone.png"))))
    run.post("image html", "/v1/chat/completions", json=_chat("vl", _image_message(run.images.url("/page"))))
    run.post(
        "image refused",
        "/v1/chat/completions",
        json=_chat("vl", _image_message(f"http://127.0.0.1:{free_port()}/x.png?sig={SIG}")),
    )
    run.post(
        "bad data url",
        "/v1/chat/completions",
        json=_chat("vl", _image_message("data:image/png;base64," + PNG_B64[: len(PNG_B64) // 2] + "!!")),
    )
    run.post("image file", "/v1/chat/completions", json=_chat("vl", _image_message(f"file:///etc/passwd?{SIG}")))
    # Keys: wrong, malformed, in the wrong places, and a valid key without the permission.
    run.post("wrong key", "/v1/chat/completions", key=WRONG_KEY, json=_chat("chat", text))
    run.post(
        "basic auth",
        "/v1/chat/completions",
        key=None,
        json=_chat("chat", text),
        headers={"authorization": "Basic " + base64.b64encode(f"user:{APP_KEY}x".encode()).decode()},
    )
    run.post("key in query", f"/v1/chat/completions?api_key={WRONG_KEY}", key=None, json=_chat("chat", text))
    run.post("x-api-key", "/v1/chat/completions", key=None, json=_chat("chat", text), headers={"x-api-key": WRONG_KEY})
    run.get("no admin permission", "/admin/engines", key=APP_KEY)
    run.get("wrong key on admin", f"/admin/engines?key={WRONG_KEY}", key=WRONG_KEY)
    # Malformed bodies, each with the prompt canary inside.
    run.post(
        "bad json",
        "/v1/chat/completions",
        content=f'{{"model": "chat", "messages": "{PROMPT}',
        headers={"content-type": "application/json"},
    )
    run.post("wrong type", "/v1/chat/completions", json={"model": "chat", "messages": PROMPT})
    run.post("bad field", "/v1/chat/completions", json=_chat("chat", text, n=PROMPT))
    run.post("bad role", "/v1/chat/completions", json={"model": "vl", "messages": [{"role": PROMPT, "content": text}]})
    run.post(
        "api_base",
        "/v1/chat/completions",
        json=_chat("chat", text, api_base=f"http://evil.example/{PROMPT}", extra_headers={"x": APP_KEY}),
    )
    run.post("unknown model", "/v1/chat/completions", json=_chat("nope", text))
    run.post(
        "wrong content type",
        "/v1/chat/completions",
        content=json.dumps(_chat("chat", text)),
        headers={"content-type": "text/plain"},
    )
    run.post("too large", "/v1/chat/completions", json=_chat("chat", text + "x" * 300_000))
    # Refused at the HTTP layer, before the app: too many headers, each carrying a canary.
    run.post(
        "too many headers",
        "/v1/chat/completions",
        json=_chat("chat", text),
        headers={f"x-canary-{i}": f"{PROMPT}-{APP_KEY}" for i in range(150)},
    )
    run.post("engine with its own key", "/v1/chat/completions", json=_chat("keyed", text))
    run.post("engine 400", "/v1/chat/completions", json=_chat("chat", text + " word" * 9000))
    # Engines that fail: 5xx bodies, garbage, an error event mid-stream, a crash mid-stream.
    for name, fault, model, stream in (
        ("engine 500", {"status": 500}, "chat", False),
        ("engine 503 lmdeploy", {"status": 503}, "vl", False),
        ("engine html", {"garbage": "html"}, "chat", False),
        ("engine bad json", {"garbage": "badjson"}, "vl", False),
        ("engine bad sse", {"garbage": "badsse"}, "chat", True),
        ("engine error event", {"error-after-chunks": 2}, "vl", True),
        ("engine hangs", {"hang-before-headers": True}, "chat", False),
        ("engine stalls mid-stream", {"stall-after-chunks": 2}, "chat", True),
        ("engine crash mid-stream", {"crash-after-chunks": 2}, "chat", True),
        ("engine crash on request", {"crash-on-request": True}, "vl", False),
    ):
        write_faults(faults, fault)
        try:
            run.post(name, "/v1/chat/completions", json=_chat(model, text, stream=stream))
        except httpx.HTTPError:
            pass  # a cut stream may end the read; what matters is what was logged and sent before
        write_faults(faults, {})
    time.sleep(1.0)  # crashes and failure counts are noticed before readiness is asked
    assert wait_until(run.ready, 20), "the crashed engines did not come back"
    # The read-only surfaces, after all of that.
    for what, path, key in (
        ("health", "/health", None),
        ("ready", "/ready", None),
        ("metrics", "/metrics", None),
        ("models", "/v1/models", APP_KEY),
        ("model", "/v1/models/chat", APP_KEY),
        ("engines", "/admin/engines", OPS_KEY),
        ("gpu", "/gpu/status", OPS_KEY),
    ):
        run.get(what, path, key=key)
    for model in ("chat", "vl", "keyed", "remote"):
        run.get(f"engine log {model}", f"/admin/engines/{model}/logs?tail=1000")


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("canary")
    faults, record = tmp / "faults.json", tmp / "record.jsonl"
    write_faults(faults, {})
    images = _image_server()
    remote_port = free_port()
    remote = launch(
        "vllm",
        [*serve_args("vllm", remote_port, "upstream"), "--api-key", REMOTE_KEY],
        env=standin_env(),
        port=remote_port,
    )
    engine_env = {"STANDIN_FAULTS_FILE": str(faults), "STANDIN_RECORD": str(record)}
    probe = {"interval": 0.5, "startup_interval": 0.1}
    restart = {"initial_delay": 0.1, "jitter": 0, "max_restarts": 50}
    config = {
        "server": {
            "first_byte_timeout": 2,
            "idle_timeout": 1,
            "total_timeout": 5,
            "retry_after": 1,
            "queue_timeout": 1,
            "max_body_bytes": 200_000,
            "log_level": "debug",
            "access_log": True,
        },
        "auth": {
            "api_keys": [
                {
                    "name": "app",
                    "key": APP_KEY,
                    "permissions": ["chat", "completions", "embeddings", "rerank", "models"],
                },
                {"name": "ops", "key_env": "GATEWAY_CANARY_OPS_KEY", "permissions": ["all"]},
            ]
        },
        "media": {"allow_private_networks": True},
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/chat-model",
                "command": standin_command("vllm"),
                "env": engine_env,
                "health": probe,
                "restart": restart,
                "stop_grace": 3,
                "args": {"max-model-len": 4096},
            },
            "vl": {
                "engine": "lmdeploy",
                "model": "org/vl-model",
                "command": standin_command("lmdeploy"),
                "env": engine_env,
                "health": probe,
                "restart": restart,
                "stop_grace": 3,
            },
            "keyed": {
                "engine": "vllm",
                "model": "org/keyed",
                "command": standin_command("vllm"),
                "args": {"api-key": ENGINE_KEY},
                "health": probe,
                "stop_grace": 3,
            },
            "remote": {
                "engine": "openai",
                "url": f"http://127.0.0.1:{remote_port}/v1",
                "model": "upstream",
                "api_key_env": "GATEWAY_CANARY_REMOTE_KEY",
                "health": probe,
            },
        },
    }
    env = {"GATEWAY_CANARY_OPS_KEY": OPS_KEY, "GATEWAY_CANARY_REMOTE_KEY": REMOTE_KEY}
    try:
        with run_gateway(config, tmp, env=env) as gateway, httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http:
            run = Run(gateway, images, record, http)
            engines = http.get("/admin/engines", headers={"authorization": f"Bearer {OPS_KEY}"}).json()["data"]
            run.engine_ports = [row["port"] for row in engines if row["port"]]
            for pid in gateway.engine_pids():
                try:
                    run.engine_environ.append(Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"))
                except OSError:
                    pass
            _drive(run, faults)
            time.sleep(0.3)  # the last engine lines reach the gateway's log
            yield run
    finally:
        remote.kill()
        images.server.shutdown()
        images.server.server_close()


# -- the scans --------------------------------------------------------------------------------------------


def test_the_requests_did_what_they_should(canary_run: Run) -> None:
    """Guard against a scan that passes because nothing happened."""
    by = {a.what: a for a in canary_run.answers}
    for ok in (
        "chat",
        "chat stream",
        "completion",
        "embedding",
        "rerank",
        "remote",
        "data url",
        "signed url",
        "infer",
        "analyze",
        "upload",
    ):
        assert by[ok].status == 200, (ok, by[ok].body)
    for refused in (
        "image 404",
        "image html",
        "image refused",
        "bad data url",
        "image file",
        "bad json",
        "wrong type",
        "bad field",
        "unknown model",
        "wrong content type",
        "too large",
    ):
        assert 400 <= by[refused].status < 500, (refused, by[refused].body)
    for name in ("wrong key", "basic auth", "key in query", "x-api-key", "wrong key on admin"):
        assert by[name].status == 401, name
    assert by["no admin permission"].status == 403
    assert by["too many headers"].status == 431
    assert by["engine with its own key"].status == 200  # the gateway sends the key the engine was given
    assert "upstream_timeout" in by["engine stalls mid-stream"].body  # the idle clock's event
    for name in (
        "engine 500",
        "engine 503 lmdeploy",
        "engine html",
        "engine bad json",
        "engine hangs",
        "engine crash on request",
    ):
        assert by[name].status >= 500, (name, by[name].status)
    assert canary_run.images.seen, "the image server was never asked"
    assert PROMPT in canary_run.record.read_text()  # the engines did get the prompts
    assert canary_run.engine_ports


def test_no_canary_in_the_gateway_log(canary_run: Run) -> None:
    log = canary_run.gateway.log()
    assert "POST /v1/chat/completions" in log  # the access log was on: its lines were scanned too
    assert "non-default args" in log  # and the engines' output, mirrored
    leaks = {name: [line for line in log.splitlines() if CANARIES[name] in line][:3] for name in found(log)}
    assert not leaks


def test_no_canary_in_engine_output(canary_run: Run) -> None:
    for model in ("chat", "vl", "keyed", "remote"):
        answer = next(a for a in canary_run.answers if a.what == f"engine log {model}")
        assert answer.status == 200
        lines = [line for replica in json.loads(answer.body)["data"] for line in replica["lines"]]
        if model != "remote":
            assert lines, model
        leaks = [line for line in lines if found(line)]
        assert not leaks, (model, leaks[:3])
        if model == "keyed":  # the engine did print its key (as vLLM does), and the pipe scrubbed it
            assert any("non-default args" in line and "***" in line for line in lines), lines[:20]


def test_no_canary_in_any_error_body_or_header(canary_run: Run) -> None:
    for answer in canary_run.answers:
        canaries = CANARIES
        if answer.what == "engine 400":
            # The engine's own 4xx text goes back, as it is, to the client that sent the request (C7):
            # it may quote the prompt; it must still not carry a key.
            canaries = KEYS
        leaks = found(answer.body if answer.status >= 400 else "", canaries)
        leaks += found(json.dumps(answer.headers), canaries)
        assert not leaks, (answer.what, answer.status, leaks, answer.body[:500])


def test_no_canary_in_metrics_health_models_or_admin(canary_run: Run) -> None:
    for what in ("health", "ready", "metrics", "models", "model", "engines", "gpu"):
        answer = next(a for a in canary_run.answers if a.what == what)
        assert answer.status == 200 or what == "ready", (what, answer.body)  # an engine may be restarting
        assert not found(answer.body), (what, found(answer.body))
    engines = json.loads(next(a for a in canary_run.answers if a.what == "engines").body)["data"]
    keyed = next(row for row in engines if row["model"] == "keyed")
    assert "--api-key" in keyed["argv"] and "***" in keyed["argv"]
    assert not any("--enable-log-requests" in (row["argv"] or []) for row in engines)


_TRACE = re.compile(r"Traceback|File \"|line \d+, in |\w+Error:|\bat 0x[0-9a-f]+")


def test_error_bodies_and_public_pages_carry_no_trace_address_or_command_line(canary_run: Run) -> None:
    addresses = [f"127.0.0.1:{port}" for port in canary_run.engine_ports]
    addresses += [f"localhost:{port}" for port in canary_run.engine_ports]
    argv_bits = ("--served-model-name", "--server-port", "api_server", "tests/standin", "STANDIN_", "serve org/")
    errors = canary_run.errors()
    assert len(errors) > 25
    public = [a for a in canary_run.answers if a.what in ("health", "ready", "metrics", "models", "model")]
    for answer in errors + public:
        body = answer.body
        assert not _TRACE.search(body), (answer.what, body[:500])
        assert not any(a in body for a in addresses), (answer.what, body[:500])
        assert not any(bit in body for bit in argv_bits), (answer.what, body[:500])
        assert str(canary_run.gateway.log_path.parent) not in body, (answer.what, body[:500])


def test_keys_reach_neither_engines_nor_image_servers(canary_run: Run) -> None:
    record = canary_run.record.read_text()
    assert not found(record, KEYS), "a client's key reached an engine"
    for headers in canary_run.images.seen:
        assert "authorization" not in headers and "cookie" not in headers
        assert not found(json.dumps(headers))
    assert canary_run.engine_environ
    for environ in canary_run.engine_environ:
        assert not found(environ, {"app key": APP_KEY, "ops key": OPS_KEY, "remote key": REMOTE_KEY})


def test_gateway_check_shows_no_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "models": {
                    "chat": {
                        "engine": "vllm",
                        "model": "/m/chat",
                        "args": {"api-key": ENGINE_KEY, "hf-token": f"hf_{PROMPT}"},
                        "env": {"HF_TOKEN": f"hf_{TAG}_env_token", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
                    }
                }
            }
        )
    )
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "--api-key" in out and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in out
    assert ENGINE_KEY not in out and PROMPT not in out and f"hf_{TAG}_env_token" not in out


def test_the_access_log_filter_drops_query_strings() -> None:
    import logging

    from gateway.observability.log_setup import _AccessQueryFilter

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", f"/v1/models?api_key={WRONG_KEY}", "1.1", 401),
        None,
    )
    assert _AccessQueryFilter().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /v1/models?... HTTP/1.1" 401'
