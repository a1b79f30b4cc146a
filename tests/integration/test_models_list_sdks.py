"""``GET /v1/models`` is one list that both official SDKs read: ``openai``'s and ``anthropic``'s
``client.models.list()`` and ``models.retrieve``, through a real gateway with API keys (the anthropic SDK
sends its key as ``x-api-key``), in front of two vLLM stand-ins, one with an alias."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import anthropic
import openai
import pytest

from tests.helpers import Gateway, run_gateway, standin_model

KEY = "sk-models-0123456789"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = {
        "auth": {"api_keys": [{"name": "app", "key": KEY, "permissions": ["models", "chat"]}]},
        "models": {
            "a": standin_model(display_name="Model A"),
            "b": standin_model(aliases=["b-alias"]),
        },
    }
    with run_gateway(config, tmp_path_factory.mktemp("models")) as gw:
        yield gw


def test_the_anthropic_sdk_lists_and_retrieves_the_models(gateway: Gateway) -> None:
    with anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0) as client:
        page = client.models.list()
        models = list(page)  # auto-pagination stops: has_more is false
        assert [m.id for m in models] == ["a", "b", "b-alias"]
        assert page.has_more is False and (page.first_id, page.last_id) == ("a", "b-alias")
        first = models[0]
        assert first.type == "model" and first.display_name == "Model A"
        assert isinstance(first.created_at, datetime) and first.created_at.tzinfo is not None
        assert first.created_at <= datetime.now(UTC)  # the gateway's start
        alias = client.models.retrieve("b-alias")
        assert (alias.id, alias.type, alias.display_name) == ("b-alias", "model", "b")
        with pytest.raises(anthropic.NotFoundError):
            client.models.retrieve("nope")
    with anthropic.Anthropic(base_url=gateway.url, api_key="sk-wrong-0123456789", max_retries=0) as wrong:
        with pytest.raises(anthropic.AuthenticationError):
            wrong.models.list()


def test_the_openai_sdk_reads_the_same_list(gateway: Gateway) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0) as client:
        models = list(client.models.list())
        assert [m.id for m in models] == ["a", "b", "b-alias"]
        assert all(m.object == "model" and m.owned_by == "gateway" and m.created > 0 for m in models)
        # The two clocks say the same second.
        extra = models[0].model_extra or {}
        assert datetime.fromisoformat(extra["created_at"]).timestamp() == models[0].created
        assert client.models.retrieve("b-alias").id == "b-alias"
