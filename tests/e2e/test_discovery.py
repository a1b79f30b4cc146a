"""A model folder served with no config entry: models_dir discovery → the real CPU engine → the openai SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.observability.gpu_probe import GpuProbe
from tests.helpers import Gateway, run_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def gateway(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    models = tmp_path_factory.mktemp("models_dir")
    (models / "tiny-chat").symlink_to(tiny_chat_model, target_is_directory=True)
    (models / "half-download").mkdir()
    (models / "half-download" / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')  # no weights
    config: dict[str, object] = {"models_dir": str(models)}
    if GpuProbe().count():  # on a GPU host the table says vLLM; this test is about the CPU engine
        config["discovery"] = {"gpus": []}
    with run_gateway(config, tmp_path_factory.mktemp("gw"), ready_timeout=60) as gw:
        yield gw


def test_discovered_model_answers_through_the_sdk(gateway: Gateway) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
        reply = client.chat.completions.create(
            model="tiny-chat", max_tokens=4, messages=[{"role": "user", "content": "hello"}]
        )
        assert reply.model == "tiny-chat"
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        chunks = list(
            client.chat.completions.create(
                model="tiny-chat", max_tokens=4, stream=True, messages=[{"role": "user", "content": "hi"}]
            )
        )
        assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_models_list_shows_the_discovered_model_and_the_skipped_folder(gateway: Gateway) -> None:
    body = httpx.get(gateway.url + "/v1/models", timeout=5).json()
    [card] = body["data"]
    assert card["id"] == "tiny-chat" and card["engine"] == "transformers" and card["loaded"] is True
    assert card["kind"] == "chat" and card["source"] == "discovered"
    assert body["skipped"] == [
        {"folder": "half-download", "reason": "no weight files (*.safetensors, pytorch_model*.bin)"}
    ]
    assert "skipped half-download: no weight files" in gateway.log()
