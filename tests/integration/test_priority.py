"""Request priority through a real gateway and the vLLM stand-in: ``X-Priority`` and the keys' ``priority``.

One model with ``max_concurrency: 1``: a long stream holds its only slot while others queue, one at a time,
each seen in ``/health``'s ``queue_depth`` before the next is sent; the order the engine then receives them in
(its STANDIN_RECORD file) is the queue's order. A key's priority is the default of its requests and their
ceiling (a header above it is clamped, not refused); a header outside -10..10 is a 400 naming it, in the
client's error dialect (the official openai and anthropic SDKs read them), and reaches no engine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.helpers import Gateway, run_gateway, standin_model, wait_until
from tests.standin.harness import read_records

pytestmark = pytest.mark.timeout(90)

VIP, PLAIN, BATCH = "sk-vip-0123456789", "sk-plain-0123456789", "sk-batch-0123456789"


class Env:
    def __init__(self, gateway: Gateway, record: Path) -> None:
        self.gateway, self.record = gateway, record

    def reached(self) -> list[dict[str, Any]]:
        return [r for r in read_records(self.record, "request") if r["path"] == "/v1/chat/completions"]

    def depth(self) -> int:
        models = httpx.get(self.gateway.url + "/health", headers=auth(VIP), timeout=5).json()["models"]
        return int(models["one"]["queue_depth"])


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("priority")
    record = tmp / "one.jsonl"
    config = {
        "auth": {
            "api_keys": [
                {"name": "vip", "key": VIP, "priority": 5},
                {"name": "plain", "key": PLAIN},
                {"name": "batch", "key": BATCH, "priority": -5},
            ]
        },
        "models": {
            # A stream's events come token-interval apart: the holder's long one keeps the slot.
            "one": standin_model(
                max_concurrency=1, env={"STANDIN_RECORD": str(record), "STANDIN_FAULTS": "token-interval=0.1"}
            ),
        },
    }
    with run_gateway(config, tmp) as gateway:
        yield Env(gateway, record)


def ask(env: Env, key: str, tag: str, tokens: int = 1, priority: str | None = None) -> int:
    """One request; a stream when it is long (the stand-in spaces only a stream's events)."""
    headers = auth(key) | ({} if priority is None else {"X-Priority": priority})
    body = {"model": "one", "messages": [{"role": "user", "content": tag}], "max_tokens": tokens, "ignore_eos": True}
    if tokens > 1:
        body["stream"] = True
    r = httpx.post(env.gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    return r.status_code


def test_the_queue_serves_by_priority_with_keys_as_ceilings(env: Env) -> None:
    statuses: list[int] = []
    threads: list[threading.Thread] = []

    def send(key: str, tag: str, tokens: int = 1, priority: str | None = None) -> None:
        thread = threading.Thread(target=lambda: statuses.append(ask(env, key, tag, tokens, priority)), daemon=True)
        thread.start()
        threads.append(thread)

    before = len(env.reached())
    send(PLAIN, "holder", tokens=30)  # ~3 s on the one slot
    assert wait_until(lambda: len(env.reached()) == before + 1, 10)
    # Queued in this order; (key, header) → priority: plain asks 10 → 0 (its ceiling); batch, no header → -5;
    # vip lowers itself to 3; plain lowers itself to -8; vip, no header → 5.
    queued = [
        (PLAIN, "plain-asks-ten", "10"),
        (BATCH, "batch-default", None),
        (VIP, "vip-lowered", "3"),
        (PLAIN, "plain-lowered", "-8"),
        (VIP, "vip-default", None),
    ]
    for depth, (key, tag, priority) in enumerate(queued, start=1):
        send(key, tag, priority=priority)
        assert wait_until(lambda depth=depth: env.depth() == depth, 5), f"{tag} did not queue"
    for thread in threads:
        thread.join(30)
    assert statuses == [200] * 6
    order = [r["body"]["messages"][0]["content"] for r in env.reached()[before:]]
    assert order == ["holder", "vip-default", "vip-lowered", "plain-asks-ten", "batch-default", "plain-lowered"]


@pytest.mark.parametrize("value", ["11", "-11", "urgent", "1.5", ""])
def test_a_bad_priority_is_a_400_in_the_openai_dialect(env: Env, value: str) -> None:
    before = len(env.reached())
    with (
        openai.OpenAI(base_url=env.gateway.url + "/v1", api_key=VIP, max_retries=0, timeout=10) as client,
        pytest.raises(openai.BadRequestError) as raised,
    ):
        client.chat.completions.create(
            model="one", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Priority": value}
        )
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["param"] == "X-Priority" and error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_priority" and "-10 to 10" in error["message"]
    assert len(env.reached()) == before  # refused before any engine was asked


def test_a_bad_priority_is_a_400_in_the_anthropic_dialect(env: Env) -> None:
    before = len(read_records(env.record, "request"))
    with (
        anthropic.Anthropic(base_url=env.gateway.url, api_key=VIP, max_retries=0, timeout=10) as client,
        pytest.raises(anthropic.BadRequestError) as raised,
    ):
        client.messages.create(
            model="one",
            max_tokens=4,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Priority": "99"},
        )
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "X-Priority" in body["error"]["message"]
    assert len(read_records(env.record, "request")) == before


def test_a_good_priority_is_served_and_not_forwarded(env: Env) -> None:
    with openai.OpenAI(base_url=env.gateway.url + "/v1", api_key=BATCH, max_retries=0, timeout=10) as client:
        answer = client.chat.completions.create(
            model="one",
            messages=[{"role": "user", "content": "fine"}],
            max_tokens=2,
            extra_headers={"X-Priority": "10", "X-Session-ID": "private-session"},  # clamped to -5, not refused
        )
    assert answer.choices[0].message.content == "fine"
    headers = env.reached()[-1]["headers"]
    assert "x-priority" not in headers and "x-session-id" not in headers  # the gateway's, not the engine's
