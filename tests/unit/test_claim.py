"""A request's claim on a replica (gateway/proxy/claim.py): its priority from ``X-Priority`` and its key, its
affinity from a session key or the prompt's leading part. Requests are real Starlette requests over an ASGI
scope as the middleware leaves it (the key's ``Identity`` under ``IDENTITY_KEY``); the key ring is the real one.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from starlette.requests import Request

from engines.adapters import adapter_for
from engines.scheduling.contract import NO_CLAIM, Claim
from engines.scheduling.entry import ModelEntry
from engines.spec import ModelSpec
from gateway.config.auth import ApiKey, AuthConfig
from gateway.http.errors import BadRequest
from gateway.http.keys import Identity, KeyRing
from gateway.http.scope import IDENTITY_KEY
from gateway.proxy.claim import PREFIX_CHARS, affinity_of, claim_for, prompt_prefix


def entry(replicas: int = 2) -> ModelEntry:
    spec = ModelSpec(name="m", engine="vllm", model="org/m", replicas=replicas)
    return ModelEntry(spec, adapter_for("vllm"), request_model="org/m")


def request(headers: dict[str, str] | None = None, identity: Identity | None = None) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        IDENTITY_KEY: identity,
    }
    return Request(scope)


def chat(*turns: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": role, "content": content} for role, content in turns], **extra}


RING = KeyRing(
    AuthConfig(
        api_keys=(
            ApiKey(name="batch", key="sk-batch-123456", priority=-5),
            ApiKey(name="plain", key="sk-plain-123456"),
            ApiKey(name="vip", key="sk-vip-1234567", priority=5),
        )
    )
)


def key(secret: str) -> Identity:
    found = RING.identify(b"Bearer " + secret.encode())
    assert found is not None
    return found


# -- priority ---------------------------------------------------------------------------------------------------


def test_the_common_path_is_the_shared_no_claim() -> None:
    body = chat(("user", "hi"))
    assert claim_for(request(), entry(1), body, "chat") is NO_CLAIM
    assert claim_for(request({"X-Priority": "0"}), entry(1), body, "chat") is NO_CLAIM
    assert claim_for(request(identity=key("sk-plain-123456")), entry(1), body, "chat") is NO_CLAIM


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("-10", -10), ("10", 10), ("+2", 2), ("07", 7)])
def test_an_open_gateway_takes_the_header_as_it_is(value: str, expected: int) -> None:
    assert claim_for(request({"X-Priority": value}), entry(1)) == Claim(expected, None)


@pytest.mark.parametrize("value", ["11", "-11", "high", "1.5", "", " ", "1_0", "100", "0x1", "--1", "٣"])
def test_a_bad_header_is_a_400_naming_it(value: str) -> None:
    with pytest.raises(BadRequest) as raised:
        claim_for(request({"X-Priority": value}), entry(1))
    assert raised.value.status == 400
    assert raised.value.param == "X-Priority"
    assert "-10 to 10" in raised.value.message


def test_a_bad_header_is_refused_even_with_a_key_that_would_clamp_it() -> None:
    with pytest.raises(BadRequest):
        claim_for(request({"X-Priority": "99"}, key("sk-plain-123456")), entry(1))


def test_the_key_is_default_and_ceiling() -> None:
    vip, batch, plain = key("sk-vip-1234567"), key("sk-batch-123456"), key("sk-plain-123456")
    assert (vip.priority, batch.priority, plain.priority) == (5, -5, 0)
    assert claim_for(request(identity=vip), entry(1)).priority == 5
    assert claim_for(request(identity=batch), entry(1)).priority == -5
    assert claim_for(request({"X-Priority": "9"}, vip), entry(1)).priority == 5  # clamped, not refused
    assert claim_for(request({"X-Priority": "2"}, vip), entry(1)).priority == 2  # lowered: allowed
    assert claim_for(request({"X-Priority": "-10"}, vip), entry(1)).priority == -10
    assert claim_for(request({"X-Priority": "0"}, batch), entry(1)).priority == -5
    assert claim_for(request({"X-Priority": "-8"}, batch), entry(1)).priority == -8
    assert claim_for(request({"X-Priority": "3"}, plain), entry(1)) is NO_CLAIM


def test_a_key_priority_out_of_range_is_a_config_error() -> None:
    for bad in (11, -11):
        with pytest.raises(ValueError, match="priority"):
            AuthConfig.model_validate({"api_keys": [{"name": "k", "key": "sk-k-12345678", "priority": bad}]})


# -- affinity ---------------------------------------------------------------------------------------------------


def test_one_replica_hashes_nothing() -> None:
    body = chat(("user", "hi"), user="alice")
    assert claim_for(request({"X-Session-ID": "s1"}), entry(1), body, "chat") is NO_CLAIM


def test_the_affinity_is_a_stable_63_bit_blake2b() -> None:
    got = claim_for(request({"X-Session-ID": "s1"}), entry(), chat(("user", "hi")), "chat").affinity
    digest = hashlib.blake2b(b"s1", digest_size=8, person=b"gw.session").digest()
    assert got == int.from_bytes(digest, "big") & ((1 << 63) - 1)
    assert got is not None and 0 <= got < 1 << 63


def test_session_header_then_body_user_then_prompt() -> None:
    body = chat(("user", "hi"))
    by_prompt = claim_for(request(), entry(), body, "chat").affinity
    by_user = claim_for(request(), entry(), {**body, "user": "alice"}, "chat").affinity
    by_header = claim_for(request({"X-Session-ID": "alice"}), entry(), {**body, "user": "bob"}, "chat").affinity
    assert None not in (by_prompt, by_user, by_header)
    assert by_header == by_user  # the same session key, sent either way
    assert by_prompt != by_user
    assert claim_for(request({"X-Session-ID": "bob"}), entry(), body, "chat").affinity != by_header
    # An empty header or user is no session key.
    assert claim_for(request({"X-Session-ID": ""}), entry(), {**body, "user": ""}, "chat").affinity == by_prompt


def test_priority_and_affinity_together() -> None:
    got = claim_for(request({"X-Priority": "-3", "X-Session-ID": "s"}), entry(), None, "transcription")
    assert got.priority == -3
    assert got.affinity == affinity_of(None, None, b"s")


def test_later_turns_of_a_conversation_hash_alike() -> None:
    system = ("system", "You are terse.")
    first = chat(system, ("user", "What is a prefix cache?"))
    later = chat(
        system,
        ("user", "What is a prefix cache?"),
        ("assistant", "A cache of KV blocks."),
        ("user", "And why does it matter?"),
        ("assistant", "Speed."),
        ("user", "Thanks."),
    )
    a = claim_for(request(), entry(), first, "chat").affinity
    assert a is not None
    assert claim_for(request(), entry(), later, "chat").affinity == a
    # The sampling settings and the model name are not the conversation.
    assert claim_for(request(), entry(), {**later, "temperature": 0.3, "model": "alias"}, "chat").affinity == a


def test_a_different_first_user_message_or_system_hashes_differently() -> None:
    system = ("system", "You are terse.")
    a = claim_for(request(), entry(), chat(system, ("user", "Question one")), "chat").affinity
    b = claim_for(request(), entry(), chat(system, ("user", "Question two")), "chat").affinity
    c = claim_for(request(), entry(), chat(("system", "You are verbose."), ("user", "Question one")), "chat").affinity
    d = claim_for(request(), entry(), chat(("user", "Question one")), "chat").affinity
    assert len({a, b, c, d}) == 4


def test_role_boundaries_count() -> None:
    joined = prompt_prefix(chat(("system", "ab"), ("user", "c")), "chat")
    moved = prompt_prefix(chat(("system", "a"), ("user", "bc")), "chat")
    assert joined != moved


def test_images_are_ignored_and_parts_read_as_text() -> None:
    plain = chat(("user", "Describe this picture."))
    parts = chat(
        (
            "user",
            [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "text", "text": "Describe "},
                {"type": "text", "text": "this picture."},
            ],
        )
    )
    other_image = chat(
        (
            "user",
            [
                {"type": "text", "text": "Describe this picture."},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        )
    )
    hashes = {claim_for(request(), entry(), body, "chat").affinity for body in (plain, parts, other_image)}
    assert len(hashes) == 1 and None not in hashes
    only_image = chat(("user", [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]))
    assert claim_for(request(), entry(), only_image, "chat") is NO_CLAIM


def test_only_the_leading_text_counts() -> None:
    head = "x" * PREFIX_CHARS
    a = claim_for(request(), entry(), chat(("system", head), ("user", "one")), "chat").affinity
    b = claim_for(request(), entry(), chat(("system", head), ("user", "two")), "chat").affinity
    assert a == b  # a system prompt longer than the prefix: one shared prefix, one affinity
    text = prompt_prefix(chat(("system", head * 50), ("user", "q")), "chat")
    assert text is not None and len(text) < PREFIX_CHARS + 32


def test_the_dialects_agree_on_one_conversation() -> None:
    openai_chat = chat(("system", "Be brief."), ("user", "Hello"), ("assistant", "Hi"), ("user", "More"))
    anthropic = {
        "model": "m",
        "max_tokens": 5,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
    }
    responses = {"model": "m", "instructions": "Be brief.", "input": "Hello"}
    responses_items = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
    }
    developer = chat(("developer", "Be brief."), ("user", "Hello"))
    hashes = {
        claim_for(request(), entry(), openai_chat, "chat").affinity,
        claim_for(request(), entry(), anthropic, "messages").affinity,
        claim_for(request(), entry(), responses, "responses").affinity,
        claim_for(request(), entry(), responses_items, "responses").affinity,
        claim_for(request(), entry(), developer, "chat").affinity,
    }
    assert len(hashes) == 1 and None not in hashes


def test_completions_hash_their_prompt() -> None:
    one = claim_for(request(), entry(), {"model": "m", "prompt": "Once upon a time"}, "completions").affinity
    listed = claim_for(request(), entry(), {"model": "m", "prompt": ["Once upon a time", "x"]}, "completions")
    other = claim_for(request(), entry(), {"model": "m", "prompt": "In a galaxy"}, "completions").affinity
    tokens = claim_for(request(), entry(), {"model": "m", "prompt": [1, 2, 3]}, "completions").affinity
    token_lists = claim_for(request(), entry(), {"model": "m", "prompt": [[1, 2, 3], [4]]}, "completions").affinity
    generate = claim_for(request(), entry(), {"inputs": "Once upon a time"}, "generate").affinity
    assert one is not None and listed.affinity == one and other != one
    assert tokens is not None and tokens == token_lists and tokens != one
    assert generate == one


@pytest.mark.parametrize(
    ("capability", "body"),
    [
        ("embeddings", {"model": "m", "input": "some text"}),
        ("rerank", {"model": "m", "query": "q", "documents": ["a"]}),
        ("tokenize", {"model": "m", "prompt": "hi"}),
        (None, {"model": "m", "prompt": "hi"}),
        ("chat", {"model": "m", "messages": "not a list"}),
        ("completions", {"model": "m", "prompt": [True, False]}),
        ("completions", {"model": "m", "prompt": []}),
    ],
)
def test_no_prompt_affinity_where_no_prompt_is_cached(capability: str | None, body: dict[str, Any]) -> None:
    assert claim_for(request(), entry(), body, capability) is NO_CLAIM
    # An explicit session key still holds the conversation to its replica.
    assert claim_for(request({"X-Session-ID": "s"}), entry(), body, capability).affinity is not None
