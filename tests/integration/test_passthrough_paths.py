"""The config's ``passthrough:`` section end to end: a path the gateway has no row for, served by an engine.

A real ``gateway serve`` (one process, and ``server.workers: 2``) in front of a vLLM stand-in, which serves
``POST /v2/rerank`` and ``/rerank`` (as real vLLM does), and an LMDeploy stand-in, which serves neither. The
config lists both paths for ``engines: [vllm]``; with nothing else written for them they get: routing by
``model``, the configured permission (Bearer and ``x-api-key``; ``admin`` when none is named), the configured
metrics label, the x-request-id both ways, a 400 naming the model for an engine kind the entry does not
name (its engine never sees the request), and a reload that changes the section says restart_required.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Gateway, run_gateway, standin_command, standin_model, wait_until
from tests.standin.harness import read_records

OPS, RERANKER, CHATTER = "sk-ops-0123456789", "sk-rerank-0123456789", "sk-chat-0123456789"
BODY = {"query": "red apples", "documents": ["green pears", "red apples and plums"]}
PASSTHROUGH = {
    "/v2/rerank": {"engines": ["vllm"], "permission": "rerank", "label": "rerank_v2"},
    "/rerank": {"engines": ["vllm"]},  # no permission named: admin
}


@dataclass
class Env:
    gateway: Gateway
    records: dict[str, Path]
    config: Path

    def post(self, path: str, key: str | None, body: dict[str, Any], **headers: str) -> httpx.Response:
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.post(self.gateway.url + path, json=body, headers=headers, timeout=10)

    def reached(self, model: str, path: str) -> list[dict[str, Any]]:
        return [r for r in read_records(self.records[model], "request") if r["path"] == path]


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-workers"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("passthrough")
    records = {name: tmp / f"{name}.jsonl" for name in ("v", "l")}
    config = {
        "server": {"workers": request.param},
        "auth": {
            "api_keys": [
                {"name": "ops", "key": OPS, "permissions": ["all"]},
                {"name": "reranker", "key": RERANKER, "permissions": ["rerank"]},
                {"name": "chatter", "key": CHATTER, "permissions": ["chat"]},
            ]
        },
        "models": {
            "v": standin_model(env={"STANDIN_RECORD": str(records["v"])}),
            "l": standin_model(
                engine="lmdeploy", command=standin_command("lmdeploy"), env={"STANDIN_RECORD": str(records["l"])}
            ),
        },
        "passthrough": PASSTHROUGH,
    }
    with run_gateway(config, tmp) as gateway:
        yield Env(gateway, records, tmp / f"gateway-{gateway.port}.yaml")


def requests_total(env: Env, **labels: str) -> float:
    """``gateway_requests_total`` summed over the series that carry ``labels``."""
    text = httpx.get(env.gateway.url + "/metrics", timeout=5).text
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total" and labels.items() <= sample.labels.items()
    )


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and response.headers["x-request-id"], error
    return error


def test_a_configured_path_is_routed_by_model_with_the_request_id(env: Env) -> None:
    response = env.post("/v2/rerank", RERANKER, {"model": "v", **BODY}, **{"x-request-id": "pass-v-1"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "pass-v-1"
    answer = response.json()
    assert answer["model"] == "v" and answer["results"][0]["document"]["text"] == "red apples and plums"
    reached = env.reached("v", "/v2/rerank")
    assert reached and reached[-1]["headers"]["x-request-id"] == "pass-v-1"
    assert reached[-1]["body"] == {"model": "v", **BODY}
    # The key as Anthropic clients send it works here as on every path.
    by_x_api_key = httpx.post(
        env.gateway.url + "/v2/rerank", json={"model": "v", **BODY}, headers={"x-api-key": RERANKER}
    )
    assert by_x_api_key.status_code == 200, by_x_api_key.text


def test_an_engine_kind_the_entry_does_not_name_is_a_400_and_never_reached(env: Env) -> None:
    error = assert_error(env.post("/v2/rerank", RERANKER, {"model": "l", **BODY}), 400, "unsupported_endpoint")
    assert "'l'" in error["message"] and "/v2/rerank" in error["message"] and error["param"] == "model"
    assert env.reached("l", "/v2/rerank") == []
    assert_error(env.post("/v2/rerank", RERANKER, {"model": "nope", **BODY}), 404, "model_not_found")
    assert_error(env.post("/v2/rerank", RERANKER, BODY), 400, "missing_model")


def test_a_configured_path_needs_its_permission(env: Env) -> None:
    body = {"model": "v", **BODY}
    assert_error(env.post("/v2/rerank", None, body), 401, "invalid_api_key")
    assert "'rerank'" in assert_error(env.post("/v2/rerank", CHATTER, body), 403, "permission_denied")["message"]
    # /rerank names no permission: admin, so the rerank key that opens /v2/rerank does not open it.
    before = len(env.reached("v", "/rerank"))
    assert "'admin'" in assert_error(env.post("/rerank", RERANKER, body), 403, "permission_denied")["message"]
    assert len(env.reached("v", "/rerank")) == before
    assert env.post("/rerank", OPS, body).status_code == 200
    assert len(env.reached("v", "/rerank")) == before + 1


def test_a_configured_path_has_its_metrics_label(env: Env) -> None:
    ok = {"endpoint": "rerank_v2", "model": "v", "status": "200"}
    denied = {"endpoint": "/rerank", "model": "", "status": "403"}
    before_ok, before_denied = requests_total(env, **ok), requests_total(env, **denied)
    assert env.post("/v2/rerank", RERANKER, {"model": "v", **BODY}).status_code == 200
    assert env.post("/rerank", RERANKER, {"model": "v", **BODY}).status_code == 403
    # Counted once the response has ended (in a worker, then scraped by the owner): hence the wait.
    assert wait_until(lambda: requests_total(env, **ok) == before_ok + 1, 10), requests_total(env, **ok)
    assert wait_until(lambda: requests_total(env, **denied) == before_denied + 1, 10)


def test_a_reload_that_changes_the_section_says_restart_required(env: Env) -> None:
    original = env.config.read_text()
    changed = yaml.safe_load(original)
    changed["passthrough"] = {"/v2/score": {"engines": ["vllm"], "permission": "rerank"}}
    env.config.write_text(yaml.safe_dump(changed))
    try:
        reload = httpx.post(env.gateway.url + "/admin/reload", headers={"authorization": f"Bearer {OPS}"}, timeout=30)
        assert reload.status_code == 200, reload.text
        assert reload.json()["restart_required"] == ["passthrough"]
        # Not applied: the running table is the one the gateway started with.
        assert env.post("/v2/rerank", RERANKER, {"model": "v", **BODY}).status_code == 200
        assert env.post("/v2/score", OPS, {"model": "v", **BODY}).status_code == 404
        assert "restart required for passthrough" in env.gateway.log()
    finally:
        env.config.write_text(original)
