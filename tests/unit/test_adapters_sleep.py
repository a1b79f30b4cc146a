"""Sleep in the adapters (engines/adapters/sleep.py): command lines, environment, the SleepApi of each engine
kind, and the host RAM a sleeper is counted for."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from engines.adapters import adapter_for
from engines.adapters.sleep import HttpCall, SleepApi, sleep_ram_gb
from engines.spec import ModelSpec


def spec(engine: str = "vllm", **kw: Any) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "engine": engine, "model": "/models/m", **kw})


def test_vllm_adds_enable_sleep_mode_only_with_gpus_and_dev_mode_whenever_it_sleeps() -> None:
    vllm = adapter_for("vllm")
    on_gpus = spec(gpus=[0, 1], sleep={"level": 1})
    assert vllm.argv(on_gpus, "127.0.0.1", 9000)[-3:] == ["--tensor-parallel-size", "2", "--enable-sleep-mode"]
    assert vllm.env(on_gpus)["VLLM_SERVER_DEV_MODE"] == "1"
    # the CPU build refuses the flag at start, while its sleep routes work: dev mode, no flag
    on_cpu = spec(sleep={"level": 1})
    assert "--enable-sleep-mode" not in vllm.argv(on_cpu, "h", 1) and vllm.env(on_cpu)["VLLM_SERVER_DEV_MODE"] == "1"
    plain = spec(gpus=[0])
    assert "--enable-sleep-mode" not in vllm.argv(plain, "h", 1) and "VLLM_SERVER_DEV_MODE" not in vllm.env(plain)
    # the config's word wins, either spelling
    off = spec(gpus=[0], sleep={"level": 1}, args={"enable-sleep-mode": False}, env={"VLLM_SERVER_DEV_MODE": "0"})
    argv = vllm.argv(off, "h", 1)
    assert "--enable-sleep-mode" not in argv and argv[-1] == "--no-enable-sleep-mode"
    assert vllm.env(off)["VLLM_SERVER_DEV_MODE"] == "0"
    once = vllm.argv(spec(gpus=[0], sleep={"level": 1}, args={"enable_sleep_mode": True}), "h", 1)
    assert once.count("--enable-sleep-mode") + once.count("--enable_sleep_mode") == 1


def test_vllm_sleep_api_level_1_and_2() -> None:
    vllm = adapter_for("vllm")
    assert vllm.sleep_api(spec(gpus=[0])) is None
    one = vllm.sleep_api(spec(gpus=[0], sleep={"level": 1}))
    assert one == SleepApi(
        1, HttpCall("POST", "/sleep?level=1&mode=abort"), (HttpCall("POST", "/wake_up"),), "/is_sleeping"
    )
    two = vllm.sleep_api(spec(gpus=[0], sleep={"level": 2}))
    assert two is not None and two.sleep.path == "/sleep?level=2&mode=abort"
    assert [(c.path, json.loads(c.body)) for c in two.wake] == [
        ("/wake_up?tags=weights", {}),
        ("/collective_rpc", {"method": "reload_weights"}),
        ("/wake_up?tags=kv_cache", {}),
    ]


def test_lmdeploy_sleeps_at_level_1_only_and_needs_no_flag() -> None:
    lmdeploy = adapter_for("lmdeploy")
    one = spec("lmdeploy", gpus=[0], sleep={"level": 1})
    assert lmdeploy.argv(one, "h", 1) == lmdeploy.argv(spec("lmdeploy", gpus=[0]), "h", 1)
    assert lmdeploy.sleep_api(one) == SleepApi(
        1, HttpCall("POST", "/sleep?level=1"), (HttpCall("POST", "/wakeup"),), "/is_sleeping"
    )
    two = spec("lmdeploy", sleep={"level": 2})
    assert lmdeploy.sleep_api(two) is None
    assert "level 1 only" in lmdeploy.no_sleep_reason(two)
    assert lmdeploy.no_sleep_reason(spec("lmdeploy")) == "the model 'm' has no 'sleep:' in its config"


def test_sglang_memory_saver_and_its_calls() -> None:
    sglang = adapter_for("sglang")
    one = spec("sglang", sleep={"level": 1})
    assert sglang.argv(one, "h", 1)[-2:] == ["--enable-memory-saver", "--enable-weights-cpu-backup"]
    api = sglang.sleep_api(one)
    assert api == SleepApi(
        1, HttpCall("POST", "/release_memory_occupation"), (HttpCall("POST", "/resume_memory_occupation"),)
    )
    assert api.is_sleeping is None
    two = spec("sglang", sleep={"level": 2}, args={"enable_memory_saver": True})
    assert sglang.argv(two, "h", 1)[-1] == "--enable_memory_saver"  # the config's own, not twice
    api = sglang.sleep_api(two)
    assert api is not None and [(c.path, json.loads(c.body)) for c in api.wake] == [
        ("/resume_memory_occupation", {}),
        ("/update_weights_from_disk", {"model_path": "/models/m"}),
    ]
    assert "--enable-memory-saver" not in sglang.argv(spec("sglang"), "h", 1)


@pytest.mark.parametrize("engine", ["transformers", "lightllm"])
def test_engines_without_a_sleep_api(engine: str) -> None:
    adapter = adapter_for(engine)
    sleepy = spec(engine, sleep={"level": 1})
    assert adapter.sleep_api(sleepy) is None
    assert adapter.no_sleep_reason(sleepy) == f"engine '{engine}' has no sleep API"
    remote = ModelSpec.model_validate({"name": "r", "engine": "openai", "url": "http://x/v1", "sleep": {}})
    assert adapter_for("openai").sleep_api(remote) is None


def test_reading_an_is_sleeping_answer() -> None:
    api = SleepApi(1, HttpCall("POST", "/s"), (HttpCall("POST", "/w"),), "/is_sleeping")
    assert api.asleep(b'{"is_sleeping": true}') is True
    assert api.asleep(b'{"is_sleeping":false}') is False
    for body in (b"", b"null", b"[]", b'{"is_sleeping": 1}', b'{"sleeping": true}', b"<html>"):
        assert api.asleep(body) is None, body


def _safetensors(path: Path, shapes: dict[str, tuple[str, list[int], int]]) -> int:
    """A safetensors file with these tensors (dtype, shape, bytes per element); returns the data bytes."""
    header, offset = {}, 0
    for name, (dtype, shape, size) in shapes.items():
        n = size
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return offset


def test_sleep_ram_gb(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    data = _safetensors(folder / "model.safetensors", {"w": ("BF16", [512, 1024], 2), "b": ("F32", [1024], 4)})
    local = {"model": str(folder)}
    assert sleep_ram_gb(spec(**local, sleep={"level": 1})) == pytest.approx(data / 1024**3)
    assert sleep_ram_gb(spec(**local, sleep={"level": 1, "ram_gb": 7.5})) == 7.5  # the config's word wins
    assert sleep_ram_gb(spec(**local, sleep={"level": 2})) == 0.0  # weights discarded
    assert sleep_ram_gb(spec(**local, sleep={"level": 2, "ram_gb": 1})) == 1.0
    assert sleep_ram_gb(spec(**local)) == 0.0  # no sleep: nothing held
    assert sleep_ram_gb(spec(model="org/hub-model", sleep={"level": 1})) == 0.0  # unknown
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sleep_ram_gb(spec(model=str(empty), sleep={"level": 1})) == 0.0  # no weights to read
    (empty / "model.safetensors").write_bytes(b"\x05")
    assert sleep_ram_gb(spec(model=str(empty), sleep={"level": 1})) == 0.0  # a broken file
