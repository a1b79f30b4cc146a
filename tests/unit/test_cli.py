from pathlib import Path

import pytest

from gateway.cli import main


def test_check_prints_each_engine_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("""
models:
  chat: {engine: vllm, model: /m/chat, gpus: [0, 1], aliases: [gpt-4o-mini], command: [/opt/vllm/bin/vllm]}
  vl: {engine: lmdeploy, model: /m/vl, port: 23333}
  remote: {engine: openai, url: "http://10.0.0.5:8000/v1"}
""")
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert (
        "CUDA_VISIBLE_DEVICES=0,1 VLLM_MEDIA_URL_ALLOW_REDIRECTS=0 /opt/vllm/bin/vllm serve /m/chat "
        "--served-model-name chat gpt-4o-mini --host 127.0.0.1 --port '<free port>' "
        "--tensor-parallel-size 2"
    ) in out
    assert "lmdeploy serve api_server /m/vl --server-name 127.0.0.1 --server-port 23333 --model-name vl" in out
    assert "remote: http://10.0.0.5:8000/v1" in out and "config OK: 3 model(s)" in out


def test_check_reports_config_errors_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("models: {x: {engine: tgi, model: /m}}")
    assert main(["check", "--config", str(config)]) == 2
    assert "models.x.engine" in capsys.readouterr().err
