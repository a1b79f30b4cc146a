"""Hostile requests against a real gateway process (docs/RELIABILITY.md §6: G1 huge bodies and many images, G2 JSON
bombs and hostile parameters).

What reached the engine is read from the stand-in's STANDIN_RECORD file: a request the gateway refuses must
never be there, and one it forwards shows exactly what the gateway stripped.
"""

from __future__ import annotations

import base64
import io
import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.helpers import Gateway, run_gateway, standin_command
from tests.standin.harness import read_records

pytestmark = pytest.mark.timeout(60)

MAX_BODY = 16 * 2**20  # room for the 1M-key object (~10 MB); the oversized bodies go far past it
MAX_IMAGES = 2


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


DATA_URL = "data:image/png;base64," + base64.b64encode(_png()).decode()


class Env:
    def __init__(self, gateway: Gateway, record: Path) -> None:
        self.gateway, self.record = gateway, record

    def rows(self, event: str = "request") -> list[dict[str, Any]]:
        return read_records(self.record, event)

    def post(self, body: bytes | dict[str, Any]) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(
            self.gateway.url + "/v1/chat/completions",
            content=content,
            timeout=30,
            headers={"content-type": "application/json"},
        )

    def healthy(self) -> bool:
        return httpx.get(self.gateway.url + "/health", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("abuse")
    record = tmp / "engine.jsonl"
    config = {
        "server": {"max_body_bytes": MAX_BODY},
        "media": {"max_images_per_request": MAX_IMAGES},
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/m",
                "command": standin_command("vllm"),
                "env": {"STANDIN_RECORD": str(record)},
                "stop_grace": 2,
                "health": {"interval": 1, "startup_interval": 0.1},
            }
        },
    }
    with run_gateway(config, tmp) as gateway:
        yield Env(gateway, record)


def chat_body(content: Any = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["param"] == param


# -- G1 ----------------------------------------------------------------------------------------------------


def _send_until_answered(sock: socket.socket, planned: int) -> int:
    """Send chunked frames of a ``planned``-byte body until the gateway answers (or shuts the door): bytes sent."""
    frame = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
    sock.setblocking(False)
    pending = b""
    sent = 0
    while sent < planned:
        readable, writable, _ = select.select([sock], [sock], [], 10)
        if readable:
            break  # the answer is there: stop, as a client that reads while it writes would
        assert writable, "the gateway neither read the body nor answered for 10 s"
        pending = pending or frame
        try:
            n = sock.send(pending)
        except (BrokenPipeError, ConnectionResetError):
            break
        pending, sent = pending[n:], sent + n
    return sent


def _read_to_eof(sock: socket.socket) -> bytes:
    sock.setblocking(True)
    sock.settimeout(10)  # a connection the gateway leaves open fails here rather than hanging the test
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # closed with the client's unsent rest still arriving: a reset, after the answer was read
    except TimeoutError:
        raise AssertionError(f"the gateway left the connection open after answering: {data[:300]!r}") from None
    return data


def test_g1_chunked_body_over_the_limit_is_413_before_it_is_all_sent(env: Env) -> None:
    before = len(env.rows())
    planned = 16 * MAX_BODY  # 256 MB, no Content-Length: only counting while reading can stop it
    with socket.create_connection(("127.0.0.1", env.gateway.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sent = _send_until_answered(sock, planned)
        answer = _read_to_eof(sock)
    # The answer came while most of the body was still unsent: the gateway stopped reading at its limit.
    assert sent < planned // 2, sent
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert b"\r\nconnection: close" in head.lower()  # the unread rest makes the connection unusable
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_too_large"
    assert len(env.rows()) == before  # nothing reached the engine
    assert env.healthy()


def test_g1_more_images_than_allowed_is_400_and_nothing_reaches_the_engine(env: Env) -> None:
    def parts(n: int) -> list[dict[str, Any]]:
        return [{"type": "text", "text": "describe"}] + [{"type": "image_url", "image_url": {"url": DATA_URL}}] * n

    before = len(env.rows())
    too_many = env.post(chat_body(parts(MAX_IMAGES + 1)))
    assert_error(too_many, 400, "too_many_images", "messages")
    assert f"at most {MAX_IMAGES}" in too_many.json()["error"]["message"]
    assert len(env.rows()) == before
    # The limit itself is allowed: the same request with one image fewer goes through with its images.
    media_before = len(env.rows("media"))
    assert env.post(chat_body(parts(MAX_IMAGES))).status_code == 200
    assert len(env.rows()) == before + 1 and len(env.rows("media")) == media_before + MAX_IMAGES


# -- G2 ----------------------------------------------------------------------------------------------------


def test_g2_deep_nesting_is_400_without_reaching_the_engine(env: Env) -> None:
    before = len(env.rows())
    depth = 100_000
    bomb = b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"x":' + b"[" * depth + b"]" * depth + b"}"
    assert_error(env.post(bomb), 400, "invalid_json")
    assert len(env.rows()) == before
    assert env.healthy()


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'"max_tokens":1e12', "max_tokens"),  # a float in JSON: not an integer at all
        (b'"max_tokens":1000000000000', "max_tokens"),  # an integer, far past payload.MAX_TOKENS
        (b'"max_completion_tokens":1000000000000', "max_completion_tokens"),
        (b'"n":1000000', "n"),
    ],
)
def test_g2_hostile_counts_are_400_not_clamped(env: Env, raw: bytes, param: str) -> None:
    before = len(env.rows())
    body = b'{"model":"chat","messages":[{"role":"user","content":"hi"}],' + raw + b"}"
    assert_error(env.post(body), 400, "invalid_request", param)
    assert len(env.rows()) == before
    assert env.healthy()


def test_g2_template_kwargs_and_routing_fields_are_stripped(env: Env) -> None:
    kwargs = {"tokenize": True, "chat_template": "{{ evil }}", "return_dict": True, "enable_thinking": False}
    answer = env.post(
        chat_body(
            chat_template_kwargs=kwargs,
            api_base="http://169.254.169.254/",
            chat_template="{{ evil }}",
            extra_headers={"x": "y"},
        )
    )
    assert answer.status_code == 200, answer.text
    sent = env.rows()[-1]["body"]
    # payload.py drops the kwargs that turn a chat request into something else, keeps the harmless one...
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}
    # ...and the fields that would steer or re-template the request never leave the gateway.
    assert not {"api_base", "chat_template", "extra_headers"} & set(sent)
    assert env.healthy()


def test_g2_a_million_top_level_keys_is_forwarded_and_the_gateway_stays_responsive(env: Env) -> None:
    keys = 1_000_000
    filler = ",".join(f'"k{i:x}":0' for i in range(keys)).encode()
    body = b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"max_tokens":2,' + filler + b"}"
    assert len(body) < MAX_BODY
    answer = env.post(body)
    assert env.healthy()  # right after: the parse did not leave the event loop stuck
    # payload.py strips a fixed list of fields and lets every other one through to the engine (engines take
    # many sampling extensions); it does not cap how many there are. That is what is asserted here.
    assert answer.status_code == 200, answer.text[:300]
    sent = env.rows()[-1]["body"]
    assert len(sent) == keys + 3 and sent["k0"] == 0 and f"k{keys - 1:x}" in sent
