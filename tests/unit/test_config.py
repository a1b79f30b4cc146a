import pytest

from gateway.config.loader import ConfigError, build_config, load_config


def test_minimal_config_builds_specs_in_order():
    config = build_config(
        {
            "models": {
                "chat": {"engine": "vllm", "model": "/m/a", "aliases": ["gpt-4o-mini"], "gpus": [0, 1]},
                "remote": {"engine": "openai", "url": "http://10.0.0.5:8000/v1"},
            }
        }
    )
    assert [m.name for m in config.models] == ["chat", "remote"]
    assert config.models[0].served_names == ("chat", "gpt-4o-mini")
    assert config.models[0].tp_size == 2


@pytest.mark.parametrize(
    ("models", "needle"),
    [
        ({"x": {"engine": "tgi", "model": "/m"}}, "models.x.engine"),
        ({"x": {"engine": "vllm"}}, "engine 'vllm' needs 'model'"),
        ({"x": {"engine": "openai"}}, "needs 'url'"),
        ({"x": {"engine": "vllm", "model": "/m", "gpu": [0]}}, "models.x.gpu"),
        (
            {"a": {"engine": "vllm", "model": "/m", "aliases": ["b"]}, "b": {"engine": "vllm", "model": "/m"}},
            "'b' is used by both 'a' and 'b'",
        ),
        ({"a": {"engine": "vllm", "model": "/m", "aliases": ["a"]}}, "lists 'a' twice"),
        ({"x": "vllm"}, "models.x: must be a mapping"),
    ],
)
def test_errors_name_the_offending_key(models, needle):
    with pytest.raises(ConfigError) as info:
        build_config({"models": models})
    assert needle in str(info.value)


def test_unknown_top_level_and_server_keys_are_refused():
    with pytest.raises(ConfigError, match="colour"):
        build_config({"colour": "blue"})
    with pytest.raises(ConfigError, match=r"server\.prot"):
        build_config({"server": {"prot": 1}})


def test_environment_overrides_server_block(monkeypatch):
    monkeypatch.setenv("GATEWAY_PORT", "9123")
    monkeypatch.setenv("GATEWAY_IDLE_TIMEOUT", "7.5")
    config = build_config({"server": {"port": 8000, "host": "0.0.0.0"}})
    assert config.server.port == 9123
    assert config.server.idle_timeout == 7.5
    assert config.server.host == "0.0.0.0"


def test_load_config_reports_unreadable_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)
