"""Anthropic Messages and Responses on the real CPU engine by translation: `transformers serve` has no
/v1/messages (transformers/cli/serving/server.py), and its /v1/responses streams when ``stream`` is absent,
so its adapter lists neither and the gateway translates both to chat. Random weights: shapes are checked,
never words."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.helpers import Gateway, run_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def gateway(tiny_chat_model: Path, tiny_vl_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    probe = {"startup_interval": 0.25}
    config = {
        "models": {
            "tiny-chat": {"engine": "transformers", "model": str(tiny_chat_model), "health": probe, "stop_grace": 5},
            "tiny-vl": {"engine": "transformers", "model": str(tiny_vl_model), "health": probe, "stop_grace": 5},
        },
    }
    with run_gateway(config, tmp_path_factory.mktemp("gw"), ready_timeout=120) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_messages_non_stream(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="tiny-chat", max_tokens=4, system="Be brief.", messages=[{"role": "user", "content": "hello there"}]
    )
    assert message.model == "tiny-chat" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert all(block.type == "text" for block in message.content)
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 4


def test_messages_stream(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="tiny-chat", max_tokens=4, messages=[{"role": "user", "content": "hi"}]) as s:
        kinds = [event.type for event in s]
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.model == "tiny-chat" and final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= 4


def test_messages_with_an_image(client: anthropic.Anthropic) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), (200, 30, 30)).save(buffer, format="PNG")
    image: Any = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(buffer.getvalue()).decode()},
    }
    message = client.messages.create(
        model="tiny-vl",
        max_tokens=3,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "what is this"}]}],
    )
    assert message.model == "tiny-vl" and message.usage.output_tokens > 0


def test_responses_non_stream_and_stream(gateway: Gateway) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        response = client.responses.create(
            model="tiny-chat", input="hello there", instructions="Be brief.", max_output_tokens=4
        )
        assert response.model == "tiny-chat" and response.object == "response"
        assert response.status in ("completed", "incomplete") and response.output[0].type == "message"
        assert response.usage is not None and 0 < response.usage.output_tokens <= 4
        with client.responses.stream(model="tiny-chat", input="hi", max_output_tokens=4) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.model == "tiny-chat" and final.usage is not None and 0 < final.usage.output_tokens <= 4
