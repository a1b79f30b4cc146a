"""The real CPU engine under the gateway: `transformers serve` launched, supervised, routed to and stopped."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import Gateway, run_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def _png(size: int = 28) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gateway(tiny_chat_model: Path, tiny_vl_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = {
        "media": {"allow_private_networks": True},  # the test's image server is on 127.0.0.1
        "models": {
            "tiny-chat": {
                "engine": "transformers",
                "model": str(tiny_chat_model),
                "aliases": ["gpt-4o-mini"],
                "health": {"startup_interval": 0.25},
                "stop_grace": 5,
            },
            "tiny-vl": {
                "engine": "transformers",
                "model": str(tiny_vl_model),
                "health": {"startup_interval": 0.25},
                "stop_grace": 5,
            },
        },
    }
    with run_gateway(config, tmp_path_factory.mktemp("gw"), ready_timeout=120) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_chat_non_stream_and_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=6)
    assert reply.model == "tiny-chat"  # never the engine's path
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.model == "tiny-chat" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_stream_ends_with_done_added_by_gateway(gateway: Gateway) -> None:
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        timeout=60,
        json={"model": "tiny-chat", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        body = b"".join(response.iter_raw())
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in body


def test_image_reaches_the_vision_model(client: openai.OpenAI) -> None:
    text_only = client.chat.completions.create(
        model="tiny-vl", max_tokens=2, messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}]}]
    )
    data_url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    with_image = client.chat.completions.create(
        model="tiny-vl",
        max_tokens=2,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": data_url}}],
            }
        ],
    )
    assert text_only.usage is not None and with_image.usage is not None
    # One 28 px image is 4 image tokens plus a separator in this model's template.
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 5


def test_remote_image_is_fetched_by_the_gateway_and_inlined(client: openai.OpenAI) -> None:
    png = _png()
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")  # a lie: the gateway sniffs the bytes
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cat.png?sig=secret"
        reply = client.chat.completions.create(
            model="tiny-vl",
            max_tokens=2,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": url}],
                }
            ],
        )
        assert reply.usage is not None and reply.usage.prompt_tokens > 5
        assert hits == ["/cat.png?sig=secret"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_health_and_models_show_the_engines(gateway: Gateway) -> None:
    health = httpx.get(gateway.url + "/health", timeout=5).json()
    assert health["models"]["tiny-chat"]["state"] == "ready"
    assert health["models"]["tiny-chat"]["replicas"][0]["pid"] in gateway.engine_pids()
    ids = {m["id"]: m for m in httpx.get(gateway.url + "/v1/models", timeout=5).json()["data"]}
    assert ids["gpt-4o-mini"]["alias_of"] == "tiny-chat" and ids["tiny-vl"]["loaded"] is True
