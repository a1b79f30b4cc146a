"""The simple endpoints (/infer, /analyze and their uploads) and LightLLM-style /generate, end to end.

One gateway process serves the module, in front of the vLLM stand-in ("chat", first in the config, so
the default for /infer) and the LightLLM stand-in of ``lightllm_standin.py`` ("llm"). Both write what
reached them to record files; a small HTTP server in the test serves the image URLs the gateway fetches.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from gateway.routes.simple import TASKS
from tests.helpers import Gateway, run_gateway, standin_command
from tests.standin.harness import read_records

LIGHTLLM = Path(__file__).with_name("lightllm_standin.py")
MAX_IMAGE_BYTES = 64_000
TIMEOUT = 10


def make_png(color: str = "red", size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


PNG = make_png()
PNG_SHA = hashlib.sha256(PNG).hexdigest()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Env:
    def __init__(self, gateway: Gateway, record: Path, lightllm_record: Path, image_url: str) -> None:
        self.gateway = gateway
        self.record = record
        self.lightllm_record = lightllm_record
        self.image_url = image_url
        self.http = httpx.Client(base_url=gateway.url, timeout=TIMEOUT)

    def rows(self, path: Path, event: str) -> list[dict[str, Any]]:
        return read_records(path, event)

    def last_chat(self) -> dict[str, Any]:
        return [r for r in self.rows(self.record, "request") if r["path"] == "/v1/chat/completions"][-1]["body"]

    def last_generate(self) -> dict[str, Any]:
        return self.rows(self.lightllm_record, "request")[-1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("simple")
    record, lightllm_record = tmp / "vllm.jsonl", tmp / "lightllm.jsonl"
    images = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=images.serve_forever, daemon=True)
    thread.start()
    probe = {"interval": 0.5, "startup_interval": 0.1}
    config = {
        "server": {
            "first_byte_timeout": 5,
            "idle_timeout": 2,
            "total_timeout": 10,
            "retry_after": 1,
            "queue_timeout": 1,
        },
        "media": {"allow_private_networks": True, "max_image_bytes": MAX_IMAGE_BYTES},
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/chat-model",
                "command": standin_command("vllm"),
                "env": {"STANDIN_RECORD": str(record)},
                "health": probe,
                "stop_grace": 3,
            },
            "llm": {
                "engine": "lightllm",
                "model": "/models/fake-llm",
                "command": [sys.executable, str(LIGHTLLM)],
                "env": {"STANDIN_RECORD": str(lightllm_record)},
                "health": probe,
                "stop_grace": 3,
            },
        },
    }
    try:
        with run_gateway(config, tmp) as gateway:
            env = Env(gateway, record, lightllm_record, f"http://127.0.0.1:{images.server_port}/cat.png")
            try:
                yield env
            finally:
                env.http.close()
    finally:
        images.shutdown()
        images.server_close()
        thread.join(5)


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


def assert_png_reached_engine(env: Env) -> None:
    media = env.rows(env.record, "media")[-1]
    assert media["source"] == "data" and media["mime"] == "image/png"
    assert media["sha256"] == PNG_SHA[:16]


# -- /infer, /analyze ------------------------------------------------------------------------------------


def test_infer_text_only_uses_first_chat_model(env: Env) -> None:
    response = env.http.post(
        "/infer", json={"prompt": "hello simple world", "max_tokens": 5, "system": "be brief", "temperature": 0.5}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"id", "model", "text", "finish_reason", "usage"}
    assert answer["model"] == "chat" and answer["text"] == "hello simple world"
    assert answer["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] == 3
    sent = env.last_chat()
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["temperature"] == 0.5 and sent["max_tokens"] == 5


def test_infer_data_url_image_reaches_engine_inline(env: Env) -> None:
    response = env.http.post("/infer", json={"prompt": "what is this", "image": DATA_URL, "model": "chat"})
    assert response.status_code == 200, response.text
    assert response.json()["text"].startswith("[images=1]")
    assert_png_reached_engine(env)
    part = env.last_chat()["messages"][-1]["content"][0]
    assert part["image_url"]["url"].startswith("data:image/png;base64,")


def test_infer_url_and_raw_base64_images_are_inlined(env: Env) -> None:
    for image in (env.image_url, base64.b64encode(PNG).decode()):
        response = env.http.post("/infer", json={"prompt": "see", "image": image})
        assert response.status_code == 200, response.text
        assert_png_reached_engine(env)
        assert env.last_chat()["messages"][-1]["content"][0]["image_url"]["url"].startswith("data:image/png")


def test_infer_upload_multipart(env: Env) -> None:
    response = env.http.post(
        "/infer/upload",
        files={"file": ("cat.png", PNG, "image/png")},
        data={"prompt": "upload test", "max_tokens": "8", "stream": "false"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["text"] == "[images=1] upload test"
    assert_png_reached_engine(env)
    assert env.last_chat()["max_tokens"] == 8


def test_analyze_tasks_send_their_instruction(env: Env) -> None:
    response = env.http.post("/analyze", json={"image": DATA_URL, "task": "ocr", "max_tokens": 200})
    assert response.status_code == 200, response.text
    assert response.json()["task"] == "ocr"
    assert env.last_chat()["messages"][-1]["content"][1]["text"] == TASKS["ocr"]
    response = env.http.post(
        "/analyze/upload", files={"file": ("cat.png", PNG, "image/png")}, data={"question": "is it red"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["task"] == "question" and response.json()["text"].endswith("is it red")
    response = env.http.post("/analyze", json={"image": DATA_URL})
    assert response.json()["task"] == "describe"
    assert_error(env.http.post("/analyze", json={"image": DATA_URL, "task": "dance"}), 400, param="task")


def test_missing_and_bad_images_are_400(env: Env) -> None:
    assert_error(env.http.post("/analyze", json={"task": "describe"}), 400, "missing_image", "image")
    assert_error(env.http.post("/analyze/upload", files={"task": (None, "ocr")}), 400, "missing_image", "file")
    assert_error(env.http.post("/infer/upload", data={"prompt": "x"}, files={"nothing": (None, "y")}), 400)
    assert_error(
        env.http.post("/infer", json={"prompt": "x", "image": "data:image/png;base64,AAAAAAAA"}), 400, param="image"
    )
    assert_error(env.http.post("/infer", json={"prompt": "x", "image": "file:///etc/passwd"}), 400, param="image")
    assert_error(env.http.post("/infer", json={"image": DATA_URL}), 400, "missing_field", "prompt")
    assert_error(env.http.post("/infer", json={"prompt": "x", "max_tokns": 3}), 400, "unknown_field")
    assert_error(env.http.post("/infer", json={"prompt": "x", "model": "nope"}), 404, "model_not_found")


def test_oversized_upload_is_refused(env: Env) -> None:
    # Declared too large: refused from the headers, before the body is read (none is sent here).
    conn = http.client.HTTPConnection("127.0.0.1", env.gateway.port, timeout=TIMEOUT)
    try:
        conn.putrequest("POST", "/infer/upload")
        conn.putheader("Content-Type", "multipart/form-data; boundary=xyz")
        conn.putheader("Content-Length", str(MAX_IMAGE_BYTES + 4 * 2**20))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()
    # Within the form's slack but over media.max_image_bytes: the media error.
    big = env.http.post(
        "/infer/upload",
        files={"file": ("big.png", b"\x89PNG" + bytes(MAX_IMAGE_BYTES), "image/png")},
        data={"prompt": "x"},
    )
    assert_error(big, 400, "image_too_large", "file")


def test_infer_stream_passes_engine_sse(env: Env) -> None:
    with env.http.stream(
        "POST", "/infer", json={"prompt": "one two three", "image": DATA_URL, "stream": True}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = b"".join(response.iter_raw())
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "[images=1] one two three"


# -- /generate (LightLLM) --------------------------------------------------------------------------------


def test_generate_non_stream(env: Env) -> None:
    response = env.http.post("/generate", json={"inputs": "a b c", "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "generated_text": ["a b"],
        "count_output_tokens": 2,
        "finish_reason": "length",
        "prompt_tokens": 3,
    }
    seen = env.last_generate()
    assert seen["path"] == "/generate" and seen["body"] == {"inputs": "a b c", "parameters": {"max_new_tokens": 2}}


@pytest.mark.parametrize(("path", "extra"), [("/generate", {"stream": True}), ("/generate_stream", {})])
def test_generate_stream_has_no_done(env: Env, path: str, extra: dict[str, Any]) -> None:
    with env.http.stream("POST", path, json={"inputs": "x y z", "model": "llm", **extra}) as response:
        assert response.status_code == 200
        body = b"".join(response.iter_raw())
    events = [json.loads(e[len(b"data:") :]) for e in body.split(b"\n\n") if e]
    assert "".join(e["token"]["text"] for e in events) == "x y z"
    assert events[-1]["finished"] is True and events[-1]["finish_reason"] == "stop"
    assert b"[DONE]" not in body
    assert env.last_generate()["path"] == "/generate_stream"


def test_generate_417_is_reshaped_keeping_status(env: Env) -> None:
    response = env.http.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 0}})
    assert_error(response, 417)
    assert "max_new_tokens" in response.json()["error"]["message"]


def test_generate_url_image_is_inlined_as_base64(env: Env) -> None:
    images = [
        {"type": "url", "data": env.image_url},
        {"type": "base64", "data": base64.b64encode(PNG).decode()},
        {"type": "image_size", "data": [8, 8]},
    ]
    response = env.http.post("/generate", json={"inputs": "<img> look", "multimodal_params": {"images": images}})
    assert response.status_code == 200, response.text
    assert response.json()["generated_text"] == ["[images=2] <img> look"]
    sent = env.last_generate()["body"]["multimodal_params"]["images"]
    assert [i["type"] for i in sent] == ["base64", "base64", "image_size"]
    assert hashlib.sha256(base64.b64decode(sent[0]["data"])).hexdigest() == PNG_SHA


def test_generate_refusals(env: Env) -> None:
    assert_error(env.http.post("/generate", json={"inputs": "a", "model": "chat"}), 400, "unsupported_endpoint")
    assert_error(env.http.post("/generate", json={"parameters": {}}), 400, "missing_field", "inputs")
    local = {"inputs": "a", "multimodal_params": {"images": [{"type": "url", "data": "/etc/passwd"}]}}
    assert_error(env.http.post("/generate", json=local), 400, "image_url_forbidden")
    audio = {"inputs": "a", "multimodal_params": {"audios": [{"type": "url", "data": env.image_url}]}}
    assert_error(env.http.post("/generate", json=audio), 400, "unsupported_content")
