"""The one relay over both exchanges: mid-stream faults end the same way over raw connections and aiohttp.

gateway/proxy/relay.py is written once against gateway/proxy/upstream/exchange.py; these run the same faults
through a real gateway with raw connections on (RawExchange, events written in callbacks) and off
(SessionExchange, aiohttp): one idle clock, one SSE error ending, the same bytes for the client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.helpers import run_gateway, standin_command

pytestmark = pytest.mark.timeout(60)

BODY = {"model": "chat", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 20, "stream": True}


def config(raw: bool, faults: str) -> dict[str, Any]:
    return {
        "server": {"raw_connections": raw, "idle_timeout": 1},
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/m",
                "command": standin_command("vllm"),
                "env": {"STANDIN_FAULTS": faults},
                "health": {"interval": 0.5, "startup_interval": 0.1},
            }
        },
    }


def events(url: str) -> list[bytes]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=BODY, timeout=20) as response:
        assert response.status_code == 200
        return [e for e in b"".join(response.iter_raw()).split(b"\n\n") if e]


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "aiohttp"])
@pytest.mark.parametrize(
    ("faults", "code"),
    [
        ("error-after-chunks=3", None),  # the engine's own error event, in the gateway's shape
        ("stall-after-chunks=3", "upstream_timeout"),  # silent past idle_timeout: the idle clock
        ("crash-after-chunks=3", "upstream_disconnected"),  # the engine dies mid-stream
    ],
)
def test_a_stream_broken_mid_way_ends_with_one_error_event_and_no_done(
    tmp_path: Path, raw: bool, faults: str, code: str | None
) -> None:
    with run_gateway(config(raw, faults), tmp_path) as gw:
        got = events(gw.url)
    assert b"[DONE]" not in got[-1]
    assert all(b'"error"' not in e for e in got[:-1])
    assert len(got) == 4  # the three whole events the engine sent, then the error
    error = orjson.loads(got[-1].removeprefix(b"data: "))["error"]
    assert error["message"] and (code is None or error["code"] == code)
