"""Schema fuzzing (RELIABILITY J3): schemathesis against the gateway's own OpenAPI, stand-in engines behind it.

Whatever a client sends, the gateway never answers 5xx of its own making: bad input is a 4xx in the
error shape. (An engine's own 5xx would be passed through; the stand-ins here answer every valid request.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Gateway, run_gateway, standin_command

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config = {
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/chat",
                "aliases": ["gpt-4o-mini"],
                "command": standin_command("vllm"),
                "health": {"startup_interval": 0.1},
            }
        }
    }
    with run_gateway(config, tmp_path_factory.mktemp("fuzz")) as gw:
        yield gw


def test_no_server_errors(gateway: Gateway) -> None:
    # schemathesis' pytest plugin does not load under pytest 9; its strategies are driven directly here.
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/admin") and operation.method.upper() == "POST":
            continue  # engine commands are exercised by the admin tests, not fuzzed

        @given(case=operation.as_strategy())
        @settings(
            max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def call(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(timeout=10)
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400 and response.headers.get("content-type") == "application/json":
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        call()
        checked += 1
    assert checked >= 10
