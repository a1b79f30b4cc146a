"""The config's ``passthrough:`` section (gateway/config/passthrough.py): what it accepts and refuses, and the
rows it adds to the endpoint table (gateway/http/endpoints.py). End to end, with a real gateway in one and in
several processes: tests/integration/test_passthrough_paths.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.adapters import ADAPTERS
from engines.scheduling.entry import ModelEntry
from engines.spec import ModelSpec
from gateway.app import create_app
from gateway.config.loader import ConfigError, build_config
from gateway.http.endpoints import ENDPOINTS, endpoint_table
from gateway.proxy.pipeline import serves
from gateway.workers.worker import Worker

MODELS = {
    "v": {"engine": "vllm", "model": "org/v"},
    "l": {"engine": "lmdeploy", "model": "org/l"},
}


def test_an_entry_becomes_a_fast_path_row_with_its_permission_label_and_engines() -> None:
    config = build_config(
        {
            "models": MODELS,
            "passthrough": {
                "/v2/rerank": {"permission": "rerank", "engines": ["vllm"], "label": "rerank_v2"},
                "/v1/load_lora_adapter": {"engines": ["vllm", "sglang"]},
            },
        }
    )
    table = endpoint_table(config.passthrough)
    rerank, lora = table.fast_path("/v2/rerank"), table.fast_path("/v1/load_lora_adapter")
    assert rerank is not None and lora is not None
    assert (rerank.permission, rerank.label, rerank.engines, rerank.upstream_path) == (
        "rerank",
        "rerank_v2",
        frozenset({"vllm"}),
        "/v2/rerank",
    )
    # Unnamed: the permission that opens it to no application key, the path as its label.
    assert (lora.permission, lora.label, lora.engines) == (
        "admin",
        "/v1/load_lora_adapter",
        frozenset({"vllm", "sglang"}),
    )
    assert table.configured() == (rerank, lora)
    assert table.permission("/v2/rerank", metrics_public=True) == "rerank"
    assert ENDPOINTS.fast_path("/v2/rerank") is None  # the module's table is untouched
    # The app the config builds has the route (OpenAPI, 405 for other methods).
    paths = create_app(config).openapi()["paths"]
    assert set(paths["/v2/rerank"]) == {"post"} and "/v1/load_lora_adapter" in paths


def test_only_the_named_engine_kinds_serve_a_configured_path() -> None:
    config = build_config({"models": MODELS, "passthrough": {"/v2/rerank": {"engines": ["vllm"]}}})
    row = endpoint_table(config.passthrough).fast_path("/v2/rerank")
    assert row is not None
    vllm, lmdeploy = (entry(config.model(name)) for name in ("v", "l"))
    assert serves(vllm, row)
    # LMDeploy serves /v1/rerank (its adapter's capability), not /v2/rerank: the config's word counts here.
    assert not serves(lmdeploy, row) and "rerank" in lmdeploy.adapter.capabilities


def test_a_worker_answers_a_configured_path_itself(tmp_path: Path) -> None:
    """Not forwarded to the owner (a second hop for every request): the worker's table and routes have it."""
    config = build_config({"models": MODELS, "passthrough": {"/v2/rerank": {"engines": ["vllm"]}}})
    worker = Worker(config, 1, tmp_path)  # built, not started
    assert worker.endpoints.fast_path("/v2/rerank") is not None
    assert {"/v2/rerank", "/v1/chat/completions"} <= worker.local_paths and "/v1/models" not in worker.local_paths


def entry(spec: ModelSpec | None) -> ModelEntry:
    assert spec is not None
    return ModelEntry(spec, ADAPTERS[spec.engine])


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"/admin/reload": {"engines": ["vllm"], "permission": "chat"}}, "the gateway's /admin"),
        ({"/v1/chat/completions": {"engines": ["vllm"]}}, "the gateway's /v1/chat/completions"),
        ({"/v1/messages/batches": {"engines": ["vllm"]}}, "the gateway's /v1/messages"),
        ({"/v1/models/x": {"engines": ["vllm"]}}, "the gateway's /v1/models"),
        ({"/v2/rerank": None}, "engines"),
        ({"/v2/rerank": {"engines": []}}, "engines"),
        ({"/v2/rerank": {"engines": ["vllm"], "permission": "root"}}, "permission"),
        ({"/v2/rerank": {"engines": ["tgi"]}}, "engines"),
        ({"/v2/rerank": {"engines": ["vllm"], "method": "GET"}}, "method"),
        ({"v2/rerank": {"engines": ["vllm"]}}, "plain segments"),
        ({"/v2/../admin": {"engines": ["vllm"]}}, "plain segments"),
        ({"/v2//rerank": {"engines": ["vllm"]}}, "plain segments"),
        ({"/v2/rerank/": {"engines": ["vllm"]}}, "plain segments"),
        ({"/v2/re%72ank": {"engines": ["vllm"]}}, "plain segments"),
        ({"/v2/rerank?x=1": {"engines": ["vllm"]}}, "plain segments"),
    ],
)
def test_a_bad_entry_is_a_config_error_that_names_it(section: object, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"models": MODELS, "passthrough": section})
    assert says in str(caught.value), caught.value
    assert "passthrough" in str(caught.value), caught.value
