import orjson
import pytest

from gateway.http.errors import EngineUnavailable, ModelNotFound, Unauthorized, reshape_upstream_error, sse_error_event


def test_error_body_shape_and_headers():
    exc = EngineUnavailable("not ready", retry_after=4.6)
    assert exc.status == 503
    assert orjson.loads(exc.body()) == {
        "error": {"message": "not ready", "type": "service_unavailable", "param": None, "code": "engine_unavailable"}
    }
    assert exc.headers() == {"retry-after": "5"}
    assert Unauthorized("no").headers() == {"www-authenticate": "Bearer"}
    assert ModelNotFound("x", param="model").status == 404


@pytest.mark.parametrize(
    ("status", "body", "message", "type_"),
    [
        # LMDeploy's flat body
        (
            404,
            b'{"message":"The model \'x\' does not exist.","type":"not_found_error","code":404,"param":null,'
            b'"object":"error"}',
            "The model 'x' does not exist.",
            "not_found_error",
        ),
        # vLLM's 401
        (401, b'{"error":"Unauthorized"}', "Unauthorized", "authentication_error"),
        # LMDeploy <= 0.15 validation
        (
            422,
            b'{"detail":[{"loc":["body","messages"],"msg":"field required"}]}',
            "The request was not valid for this model.",
            "invalid_request_error",
        ),
        (500, b"<html>oops</html>", "The engine failed to answer.", "upstream_error"),
    ],
)
def test_reshape_keeps_status_message(status, body, message, type_):
    error = orjson.loads(reshape_upstream_error(status, body))["error"]
    assert error["message"] == message
    assert error["type"] == type_
    assert set(error) == {"message", "type", "param", "code"}


def test_vllm_nested_error_passes_unchanged():
    body = b'{"error":{"message":"too long","type":"BadRequestError","param":"input_tokens","code":400}}'
    assert reshape_upstream_error(400, body) is body


def test_sse_error_event_is_one_event():
    event = sse_error_event("cut", "upstream_error", "upstream_disconnected")
    assert event.startswith(b"data: {") and event.endswith(b"\n\n") and event.count(b"\n\n") == 1
