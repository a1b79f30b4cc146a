"""Adding a passthrough endpoint is one row of the endpoint table (gateway/http/endpoints.py).

A real gateway process (endpoint_row_gateway.py: ``create_app`` given the default table plus one row for
``POST /v2/rerank``) in front of two vLLM stand-ins, which serve that path. With nothing else written for
it, the new path gets: API keys and its row's permission, its metrics label, the x-request-id both ways,
routing by ``model``, its row's body rule (and the fields the gateway strips), errors in the gateway's
shape, a FastAPI route (OpenAPI, 405 for other methods) and the middleware's fast path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import REPO, Gateway, free_port, standin_model, stop_gateway, wait_until
from tests.integration.endpoint_row_gateway import ROW
from tests.standin.harness import read_records

OPS, RERANKER, CHATTER = "sk-ops-0123456789", "sk-rerank-0123456789", "sk-chat-0123456789"
BODY = {"query": "red apples", "documents": ["green pears", "red apples and plums"]}


@dataclass
class Env:
    gateway: Gateway
    records: dict[str, Path]

    def post(self, key: str | None, body: dict[str, Any], **headers: str) -> httpx.Response:
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.post(self.gateway.url + ROW.path, json=body, headers=headers, timeout=10)

    def reached(self, model: str) -> list[dict[str, Any]]:
        """The requests the stand-in serving ``model`` got on the new path."""
        return [r for r in read_records(self.records[model], "request") if r["path"] == ROW.path]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("row")
    records = {name: tmp / f"{name}.jsonl" for name in ("a", "b")}
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "auth": {
            "api_keys": [
                {"name": "ops", "key": OPS, "permissions": ["all"]},
                {"name": "reranker", "key": RERANKER, "permissions": ["rerank"]},
                {"name": "chatter", "key": CHATTER, "permissions": ["chat"]},
            ]
        },
        "models": {name: standin_model(env={"STANDIN_RECORD": str(path)}) for name, path in records.items()},
    }
    config_path = tmp / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp / "gateway.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.endpoint_row_gateway", str(config_path)],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    gateway = Gateway(proc, port, log_path)
    try:
        wait_until(lambda: _ready(gateway.url) or proc.poll() is not None, 30)
        assert proc.poll() is None and _ready(gateway.url), gateway.log()[-4000:]
        yield Env(gateway, records)
    finally:
        stop_gateway(gateway)


def requests_total(env: Env, **labels: str) -> float:
    text = httpx.get(env.gateway.url + "/metrics", timeout=5).text  # public: auth.metrics_public defaults to true
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_requests_total" and sample.labels == labels:
                return float(sample.value)
    return 0.0


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert error["param"] == param, error
    assert response.headers["x-request-id"]


def test_the_row_is_routed_by_model_with_the_request_id(env: Env) -> None:
    for model in ("b", "a"):
        response = env.post(RERANKER, {"model": model, **BODY}, **{"x-request-id": f"row-{model}-1"})
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == f"row-{model}-1"
        answer = response.json()
        assert answer["model"] == model and answer["results"][0]["document"]["text"] == "red apples and plums"
        reached = env.reached(model)
        assert len(reached) == 1, reached  # this model's engine, and only it
        assert reached[0]["method"] == "POST" and reached[0]["headers"]["x-request-id"] == f"row-{model}-1"
        assert reached[0]["body"] == {"model": model, **BODY}


def test_the_row_needs_its_permission(env: Env) -> None:
    body = {"model": "a", **BODY}
    missing = env.post(None, body)
    assert_error(missing, 401, "invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    denied = env.post(CHATTER, body)
    assert_error(denied, 403, "permission_denied")
    assert "'rerank'" in denied.json()["error"]["message"]
    assert env.post(OPS, body).status_code == 200


def test_the_row_checks_its_body(env: Env) -> None:
    before = len(env.reached("a"))
    assert_error(env.post(RERANKER, {"model": "a", "documents": []}), 400, "missing_field", "query")
    assert_error(env.post(RERANKER, {"model": "a", "query": "q", "documents": "x"}), 400, "missing_field", "documents")
    assert_error(env.post(RERANKER, {"model": "nope", **BODY}), 404, "model_not_found", "model")
    assert_error(env.post(RERANKER, {**BODY}), 400, "missing_model", "model")
    assert len(env.reached("a")) == before  # none of them reached an engine
    # The fields the gateway never forwards are stripped here too.
    assert env.post(RERANKER, {"model": "a", "api_base": "http://evil", **BODY}).status_code == 200
    assert "api_base" not in env.reached("a")[-1]["body"]


def test_the_row_has_its_metrics_label(env: Env) -> None:
    ok = {"endpoint": ROW.label, "model": "b", "status": "200"}
    denied = {"endpoint": ROW.label, "model": "", "status": "403"}
    before_ok, before_denied = requests_total(env, **ok), requests_total(env, **denied)
    assert env.post(RERANKER, {"model": "b", **BODY}).status_code == 200
    assert env.post(CHATTER, {"model": "b", **BODY}).status_code == 403
    # Counted once the response has ended, just after the client read it: hence the wait.
    assert wait_until(lambda: requests_total(env, **ok) == before_ok + 1, 5), requests_total(env, **ok)
    assert wait_until(lambda: requests_total(env, **denied) == before_denied + 1, 5)


def test_the_row_has_a_route(env: Env) -> None:
    headers = {"authorization": f"Bearer {OPS}"}
    schema = httpx.get(env.gateway.url + "/openapi.json", headers=headers, timeout=5).json()
    post = schema["paths"][ROW.path]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["required"] == ["model"]
    other_method = httpx.get(env.gateway.url + ROW.path, headers=headers, timeout=5)
    assert other_method.status_code == 405 and other_method.json()["error"]["code"] == 405
