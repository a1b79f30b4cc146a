from engines.adapters import adapter_for, render_flags
from engines.spec import ModelSpec


def spec(**kw):
    return ModelSpec.model_validate({"name": "qwen", "model": "/models/q", **kw})


def test_render_flags():
    assert render_flags(
        {"a": 1, "b": True, "c": False, "d": None, "e": [1, 2], "f": {"image": 4}}, negate_false=True
    ) == ["--a", "1", "--b", "--no-c", "--e", "1", "2", "--f", '{"image":4}']
    assert render_flags({"c": False}) == []


def test_vllm_argv_and_env():
    s = spec(
        engine="vllm",
        aliases=["gpt-4o-mini"],
        gpus=[0, 1],
        args={"max-model-len": 8192},
        command=["/opt/vllm/bin/vllm"],
    )
    a = adapter_for("vllm")
    assert a.argv(s, "127.0.0.1", 9000) == [
        "/opt/vllm/bin/vllm",
        "serve",
        "/models/q",
        "--served-model-name",
        "qwen",
        "gpt-4o-mini",
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
        "--tensor-parallel-size",
        "2",
        "--max-model-len",
        "8192",
    ]
    assert a.env(s)["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert a.request_model(s) == "qwen"


def test_lmdeploy_argv_single_gpu_has_no_tp():
    a = adapter_for("lmdeploy")
    assert a.argv(spec(engine="lmdeploy", gpus=[2]), "127.0.0.1", 23333) == [
        "lmdeploy",
        "serve",
        "api_server",
        "/models/q",
        "--server-name",
        "127.0.0.1",
        "--server-port",
        "23333",
        "--model-name",
        "qwen",
    ]
    assert a.argv(spec(engine="lmdeploy", gpus=[2, 3], args={"backend": "pytorch"}), "127.0.0.1", 1)[-4:] == [
        "--tp",
        "2",
        "--backend",
        "pytorch",
    ]
    assert a.dialect == "lmdeploy"


def test_sglang_lightllm_transformers_argv():
    assert adapter_for("sglang").argv(spec(engine="sglang", gpus=[0, 1]), "127.0.0.1", 1)[-8:] == [
        "--served-model-name",
        "qwen",
        "--host",
        "127.0.0.1",
        "--port",
        "1",
        "--tp-size",
        "2",
    ]
    light = adapter_for("lightllm").argv(spec(engine="lightllm"), "127.0.0.1", 1)
    assert light[1:3] == ["-m", "lightllm.server.api_server"] and "--model_dir" in light and light[-2:] == ["--tp", "1"]
    t = adapter_for("transformers")
    s = spec(engine="transformers", model="org/tiny")
    argv = t.argv(s, "127.0.0.1", 5)
    assert argv[0].endswith("transformers")  # the CLI of the gateway's own environment, activated or not
    assert argv[1:] == ["serve", "org/tiny", "--host", "127.0.0.1", "--port", "5", "--device", "cpu"]
    assert t.request_model(s) == "org/tiny" and t.response_model(s) == "org/tiny@main"
    assert t.env(s)["HF_HUB_OFFLINE"] == "1"


def test_remote_openai_adapter_never_spawns():
    a = adapter_for("openai")
    s = ModelSpec.model_validate({"name": "r", "engine": "openai", "url": "http://10.0.0.5:8000/v1/"})
    assert not a.spawns
    assert a.base_url(s, "", 0) == "http://10.0.0.5:8000"
    assert a.health_url(s, "", 0) == "http://10.0.0.5:8000/v1/models"
