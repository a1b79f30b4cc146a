"""Everything that says something about a path follows the one endpoint table (gateway/http/endpoints.py):
the app's routes, the passthrough routes' handlers, the key ring's permissions, the metrics labels, the body
rules and the engines' capabilities. Checked on the objects themselves, not on their source text; the
fast path and the rest end to end are in tests/integration/test_endpoint_row.py."""

from __future__ import annotations

from typing import Any, get_args

import pytest
from fastapi.routing import APIRoute

from engines.adapters import ADAPTERS, Capability
from gateway.app import create_app
from gateway.config.auth import AuthConfig, Permission
from gateway.config.loader import build_config
from gateway.deps import get_state
from gateway.http.endpoints import ANY, ENDPOINTS, OTHER, PUBLIC, Endpoint, EndpointTable
from gateway.http.errors import ANTHROPIC, OPENAI, BadRequest, PermissionDenied, Unauthorized
from gateway.http.keys import KeyRing
from gateway.proxy.body import BodyRule, check_fields
from gateway.routes import audio, openai, responses
from gateway.routes.audio import form_fields

EXTRA = Endpoint("/v2/rerank", "rerank_v2", "rerank", capability="rerank", fast_path=True)


def app_paths(table: EndpointTable = ENDPOINTS) -> dict[str, set[str]]:
    """Path → methods, of every route an app built with ``table`` serves (its OpenAPI schema)."""
    app = create_app(build_config({}), endpoints=table)  # not started: only its routes are read
    return {path: {m.upper() for m in operations} for path, operations in app.openapi()["paths"].items()}


def passthrough_routes(table: EndpointTable = ENDPOINTS) -> dict[str, APIRoute]:
    """The routes create_app includes for ``table``'s passthrough rows (not those with handlers of their own)."""
    own = {r.path for router in (audio.router, responses.router) for r in router.routes if isinstance(r, APIRoute)}
    return {r.path: r for r in openai.build_router(table).routes if isinstance(r, APIRoute) and r.path not in own}


def ring(*permissions: str, metrics_public: bool = True) -> KeyRing:
    keys = [{"name": "k", "key": "sk-key-0123456789", "permissions": list(permissions)}] if permissions else []
    return KeyRing(AuthConfig.model_validate({"api_keys": keys, "metrics_public": metrics_public}))


KEY = b"Bearer sk-key-0123456789"


def test_every_route_of_the_app_has_a_row_and_every_row_a_route() -> None:
    paths = set(app_paths())
    for path in paths:  # a route with no row would be labelled "other" and need only *a* key
        assert ENDPOINTS.by_path(path) is not None, path
    for row in ENDPOINTS:
        assert row.path in paths or (row.subtree and any(p.startswith(row.path + "/") for p in paths)), row.path


@pytest.mark.parametrize("table", [ENDPOINTS, ENDPOINTS.with_rows(EXTRA)], ids=["default", "one-more-row"])
def test_each_passthrough_row_is_one_generic_post_route(table: EndpointTable) -> None:
    routes, served = passthrough_routes(table), app_paths(table)
    passthroughs = table.passthroughs()
    assert set(routes) == {r.path for r in passthroughs} == {r.path for r in table if r.fast_path}
    for row in passthroughs:
        route = routes[row.path]
        assert route.methods == {"POST"} and served[row.path] == {"POST"}
        # Only the request and the state: the middleware's fast path calls forward(request, state, row) with
        # exactly these, so a parameter or dependency on the route would be skipped there.
        dependant = route.dependant
        assert [d.call for d in dependant.dependencies] == [get_state], row.path
        assert dependant.request_param_name == "request"
        assert not (
            dependant.path_params
            or dependant.query_params
            or dependant.header_params
            or dependant.cookie_params
            or dependant.body_params
        ), row.path
        assert route.openapi_extra is not None and route.openapi_extra["requestBody"]["required"] is True
    assert (EXTRA.path in served) == (EXTRA in table.rows)


def test_the_openai_routes_keep_their_openapi_names() -> None:
    routes = passthrough_routes()
    assert routes["/v1/chat/completions"].name == "chat_completions"
    assert routes["/v1/completions"].name == "completions"
    assert routes["/v1/embeddings"].name == "embeddings"
    assert routes["/v1/rerank"].name == "rerank"


def test_the_default_table_rows() -> None:
    assert {r.path for r in ENDPOINTS.passthroughs()} == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/tokenize",
        "/detokenize",
        "/v1/score",
        "/v1/classify",
        "/pooling",
        "/v1/audio/speech",
        "/v1/images/generations",
    }
    for row in ENDPOINTS.passthroughs():
        assert row.upstream_path == row.path  # an OpenAI passthrough is posted where it was received
    assert ENDPOINTS.by_path(EXTRA.path) is None  # the extra row of these tests is not served by default


@pytest.mark.parametrize("row", [*ENDPOINTS.rows, EXTRA], ids=lambda r: r.path)
def test_the_key_ring_asks_each_row_for_its_permission(row: Endpoint) -> None:
    table = ENDPOINTS.with_rows(EXTRA) if row is EXTRA else ENDPOINTS
    paths = [row.path, row.path + "/x"] if row.subtree else [row.path]
    for path in paths:
        needed = table.permission(path, metrics_public=False)
        assert needed == row.permission
        if needed == PUBLIC:
            assert ring("chat").check(path, None, table) is None  # no key asked for
            continue
        assert ring(needed, metrics_public=False).check(path, KEY, table) is not None
        other = next(p for p in get_args(Permission) if p not in (needed, "all"))
        with pytest.raises(PermissionDenied):
            ring(other, metrics_public=False).check(path, KEY, table)


def test_metrics_is_public_unless_configured() -> None:
    assert ENDPOINTS.permission("/metrics", metrics_public=True) == PUBLIC
    assert ENDPOINTS.permission("/metrics", metrics_public=False) == "metrics"
    assert ring("chat").check("/metrics", None) is None
    assert ring("metrics", metrics_public=False).check("/metrics", KEY) is not None


@pytest.mark.parametrize(
    ("path", "label", "permission"),
    [
        ("/v1/chat/completions", "chat", "chat"),
        ("/v1/models", "models", "models"),
        ("/v1/models/org/name", "models", "models"),
        ("/admin", "admin", "admin"),
        ("/admin/engines/x/restart", "admin", "admin"),
        ("/adminx", OTHER, ANY),  # a subtree holds its path and what is below it, not every longer name
        ("/v1/chat/completions/", OTHER, ANY),
        ("//v1/chat/completions", OTHER, ANY),
        ("/docs", OTHER, ANY),
        ("/v2/rerank", OTHER, ANY),
    ],
)
def test_labels_and_permissions_of_paths(path: str, label: str, permission: str) -> None:
    assert ENDPOINTS.label(path) == label
    assert ENDPOINTS.permission(path, metrics_public=True) == permission


def test_a_row_more_labels_its_path() -> None:
    table = ENDPOINTS.with_rows(EXTRA)
    assert table.label(EXTRA.path) == "rerank_v2" and table.fast_path(EXTRA.path) is EXTRA
    assert ENDPOINTS.label(EXTRA.path) == OTHER and ENDPOINTS.fast_path(EXTRA.path) is None


def test_a_table_refuses_two_rows_for_one_path_and_a_passthrough_without_capability() -> None:
    with pytest.raises(ValueError, match="two rows"):
        ENDPOINTS.with_rows(Endpoint("/v1/rerank", "x", "rerank"))
    with pytest.raises(ValueError, match="capability"):
        Endpoint("/v2/x", "x", "chat", fast_path=True)


@pytest.mark.parametrize("row", ENDPOINTS.passthroughs(), ids=lambda r: r.path)
def test_each_passthrough_body_is_checked_by_its_row(row: Endpoint) -> None:
    for missing in row.body.required:
        body: dict[str, Any] = {"model": "m", **{f: "x" for f in row.body.required if f != missing}}
        with pytest.raises(BadRequest) as caught:
            check_fields(body, row.body)
        assert caught.value.param == missing and caught.value.code == "missing_field"


def test_body_rules() -> None:
    chat = ENDPOINTS.by_path("/v1/chat/completions")
    assert chat is not None and chat.media and chat.body.required == ("messages",)
    with pytest.raises(BadRequest, match="non-empty list"):
        check_fields({"messages": []}, chat.body)
    assert check_fields({"messages": [{"role": "user", "content": "hi"}], "stream": True}, chat.body) is True
    rerank = ENDPOINTS.by_path("/v1/rerank")
    assert rerank is not None
    with pytest.raises(BadRequest, match="'documents' must be a list"):
        check_fields({"query": "q", "documents": "d"}, rerank.body)
    assert check_fields({"anything": 1}, BodyRule()) is False


def test_capabilities_are_what_rows_ask_and_adapters_serve() -> None:
    asked = {r.capability for r in ENDPOINTS if r.capability is not None}
    served = set().union(*(a.capabilities for a in ADAPTERS.values()))
    assert asked == served == set(get_args(Capability))


# path, label, permission, capability, error dialect: every engine endpoint of issue 16.
ENGINE_ROWS = [
    ("/v1/responses", "responses", "chat", "responses", OPENAI),
    ("/v1/messages", "messages", "chat", "messages", ANTHROPIC),
    ("/v1/messages/count_tokens", "messages", "chat", "count_tokens", ANTHROPIC),
    ("/tokenize", "tokenize", "chat", "tokenize", OPENAI),
    ("/detokenize", "tokenize", "chat", "tokenize", OPENAI),
    ("/v1/audio/transcriptions", "audio", "audio", "transcription", OPENAI),
    ("/v1/audio/translations", "audio", "audio", "transcription", OPENAI),
    ("/v1/audio/speech", "audio", "audio", "speech", OPENAI),
    ("/v1/score", "score", "rerank", "score", OPENAI),
    ("/v1/classify", "classify", "embeddings", "classify", OPENAI),
    ("/pooling", "pooling", "embeddings", "pooling", OPENAI),
    ("/v1/images/generations", "images", "images", "images", OPENAI),
]


@pytest.mark.parametrize(("path", "label", "permission", "capability", "errors"), ENGINE_ROWS)
def test_each_engine_endpoint_is_a_row(path: str, label: str, permission: str, capability: str, errors: Any) -> None:
    row = ENDPOINTS.by_path(path)
    assert row is not None and row.path == path
    assert (row.label, row.permission, row.capability, row.errors) == (label, permission, capability, errors)
    assert row.upstream_path == path


def test_paths_below_the_dialect_rows() -> None:
    # Stored responses: their own subtree row (routes/responses answers why they are not routed).
    assert ENDPOINTS.label("/v1/responses/resp_1") == "responses"
    assert ENDPOINTS.permission("/v1/responses/resp_1/cancel", metrics_public=True) == "chat"
    # Anything below /v1/messages is Anthropic's: its errors too.
    assert ENDPOINTS.errors("/v1/messages/batches") is ANTHROPIC
    assert ENDPOINTS.by_path("/v1/messages") is ENDPOINTS.fast_path("/v1/messages")
    assert ENDPOINTS.errors("/v1/chat/completions") is OPENAI and ENDPOINTS.errors("/nowhere") is OPENAI


def test_a_key_works_as_x_api_key_too() -> None:
    keys = ring("chat")
    assert keys.check("/v1/messages", None, api_key=b"sk-key-0123456789") is not None
    assert keys.check("/v1/messages", KEY, api_key=b"wrong") is not None  # Authorization first
    with pytest.raises(Unauthorized):
        keys.check("/v1/messages", None, api_key=b"sk-key-wrong-0000")
    with pytest.raises(PermissionDenied):
        ring("embeddings").check("/tokenize", None, api_key=b"sk-key-0123456789")


def test_anthropic_error_shapes() -> None:
    import orjson

    from gateway.http.errors import ModelNotFound, QueueFull, UpstreamTimeout, error_body

    assert orjson.loads(ANTHROPIC.body(ModelNotFound("no such model"))) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "no such model"},
    }
    assert orjson.loads(ANTHROPIC.body(QueueFull("busy")))["error"]["type"] == "rate_limit_error"
    assert orjson.loads(ANTHROPIC.body(UpstreamTimeout("slow")))["error"]["type"] == "timeout_error"
    for status, kind in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (413, "request_too_large"),
        (500, "api_error"),
        (503, "overloaded_error"),
    ]:
        reshaped = orjson.loads(ANTHROPIC.reshape(status, error_body("m", "x", "c")))
        assert reshaped == {"type": "error", "error": {"type": kind, "message": "m"}}
    native = b'{"type":"error","error":{"type":"not_found_error","message":"from the engine"}}'
    assert ANTHROPIC.reshape(404, native) == native
    event = ANTHROPIC.event("cut", "upstream_error", "upstream_disconnected")
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n") and event.count(b"\n\n") == 1
    assert orjson.loads(event.split(b"data: ", 1)[1]) == {
        "type": "error",
        "error": {"type": "api_error", "message": "cut"},
    }


def test_the_model_of_a_multipart_form_is_found_in_place() -> None:
    form = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\nRIFF--XyZ not a delimiter\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n--XyZ--\r\n'
    )
    fields = form_fields(form, b"XyZ")
    assert {k: form[s:e] for k, (s, e) in fields.items()} == {b"model": b"whisper", b"stream": b"true"}
    assert form_fields(b"garbage", b"XyZ") == {}
