import pytest

from gateway.config.auth import AuthConfig
from gateway.http.endpoints import ENDPOINTS
from gateway.http.errors import PermissionDenied, Unauthorized
from gateway.http.keys import KeyRing


def ring(**kw):
    return KeyRing(
        AuthConfig.model_validate(
            {
                "api_keys": [
                    {"name": "ops", "key": "sk-ops-123456", "permissions": ["all"]},
                    {"name": "app", "key": "sk-app-123456", "permissions": ["chat", "models"]},
                ],
                **kw,
            }
        )
    )


@pytest.mark.parametrize(
    ("path", "needed"),
    [
        ("/health", "public"),
        ("/ready", "public"),
        ("/v1/chat/completions", "chat"),
        ("/v1/models/a/b", "models"),
        ("/admin/engines", "admin"),
        ("/docs", "any"),
        ("//v1/chat/completions", "any"),
        ("/v1/chat/completions/", "any"),
    ],
)
def test_required_permission_uses_exact_paths(path, needed):
    assert ENDPOINTS.permission(path, metrics_public=True) == needed


def test_keys_and_permissions():
    keys = ring()
    assert keys.check("/v1/chat/completions", b"Bearer sk-app-123456").name == "app"
    assert keys.check("/health", None) is None
    with pytest.raises(Unauthorized):
        keys.check("/v1/chat/completions", None)
    with pytest.raises(Unauthorized):
        keys.check("/v1/chat/completions", b"Basic sk-app-123456")
    with pytest.raises(Unauthorized):
        keys.check("/nope", b"Bearer wrong")
    with pytest.raises(PermissionDenied):
        keys.check("/v1/embeddings", b"Bearer sk-app-123456")
    assert keys.check("/v1/embeddings", b"bearer sk-ops-123456").name == "ops"


def test_metrics_can_require_a_key():
    assert ring().check("/metrics", None) is None
    with pytest.raises(Unauthorized):
        ring(metrics_public=False).check("/metrics", None)


def test_key_from_env_must_exist(monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(ValueError, match="NOPE_KEY"):
        KeyRing(AuthConfig.model_validate({"api_keys": [{"name": "x", "key_env": "NOPE_KEY"}]}))
    monkeypatch.setenv("NOPE_KEY", "sk-from-env-1")
    assert (
        KeyRing(AuthConfig.model_validate({"api_keys": [{"name": "x", "key_env": "NOPE_KEY"}]}))
        .identify(b"Bearer sk-from-env-1")
        .name
        == "x"
    )
