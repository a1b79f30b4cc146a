"""A stop the gateway makes with requests in flight ends them with an error a client can tell from success.

vLLM 0.32 (docs/real-vllm), and the stand-in like it, ends what it was generating when it gets SIGTERM with
``finish_reason: "abort"``: a stream gets that chunk, usage and ``[DONE]``, a whole answer 200 with the partial
text. Relayed as they are, both look like complete answers. The gateway ends the stream with its error event
(no ``[DONE]``) and answers the whole request 503 ``engine_unavailable`` with Retry-After.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.helpers import run_gateway, wait_until
from tests.helpers import standin_model as model
from tests.standin.harness import read_records

pytestmark = pytest.mark.timeout(60)

BODY = {
    "model": "chat",
    "messages": [{"role": "user", "content": "one two three"}],
    "max_tokens": 200,
    "ignore_eos": True,
}


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "aiohttp"])
def test_an_admin_stop_ends_a_stream_and_a_whole_answer_with_an_error(tmp_path: Path, raw: bool) -> None:
    record = tmp_path / "engine.jsonl"
    config = {
        "server": {"raw_connections": raw},
        "models": {
            "chat": model(env={"STANDIN_FAULTS": "token-interval=0.1", "STANDIN_RECORD": str(record)}),
        },
    }
    with run_gateway(config, tmp_path) as gw:
        whole: dict[str, Any] = {}

        def ask_whole() -> None:
            whole["response"] = httpx.post(gw.url + "/v1/chat/completions", json=BODY, timeout=30)

        asker = threading.Thread(target=ask_whole)
        with httpx.stream(
            "POST", gw.url + "/v1/chat/completions", json={**BODY, "stream": True}, timeout=30
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen = [next(lines) for _ in range(3)]
            asker.start()
            assert wait_until(lambda: len(read_records(record, "request")) == 2, 10)
            stopped = httpx.post(gw.url + "/admin/engines/chat/stop", timeout=30)
            assert stopped.status_code == 200, stopped.text
            seen += list(lines)
        asker.join(30)
    events = [line for line in seen if line.startswith("data: ")]
    assert events[-1] != "data: [DONE]" and "data: [DONE]" not in events
    last = orjson.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "engine_unavailable", last
    assert all('"abort"' not in e for e in events), events  # the abort chunk became the error event
    answer = whole["response"]
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "engine_unavailable"
    assert answer.headers.get("retry-after")
