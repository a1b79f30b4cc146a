"""Placement of discovered models on a fake 4-GPU host: the default engine table, the smallest tensor
parallel size that fits, GPUs never shared, CPU offload where the engine has it, and "cannot place"."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.adapters import adapter_for
from engines.discovery import GiB, GpuSlot, Need, place
from engines.discovery.sizing import Fit, Limits, tp_sizes
from gateway.config.loader import Config, build_config, gpu_slots
from gateway.observability.gpu_probe import GpuProbe
from tests.unit.test_discovery import BERT, LLAVA, QWEN, make_model
from tests.unit.test_gpu import FakeGpu, FakeNvml, NVMLError_LibraryNotFound

VLLM = Limits(0.9, "cpu-offload-gb", 64)
LMDEPLOY = Limits(0.9, None, 64)


def four_h100s(used: int = 0) -> list[GpuSlot]:
    """The inventory as the gateway reads it: a fake NVML module through GpuProbe."""
    probe = GpuProbe(FakeNvml([FakeGpu(f"H100-{i}", 80 * GiB, used) for i in range(4)]))
    return gpu_slots(probe.read().devices)


def need(weights_gib: float) -> Need:
    return Need(int(weights_gib * GiB), 0.2, 1 * GiB)


def plan(config: Config) -> dict[str, tuple[str, str, tuple[int, ...], dict[str, object]]]:
    return {m.name: (m.kind or "", m.engine, m.gpus, m.args) for m in config.models if m.source == "discovered"}


def skipped(config: Config) -> dict[str, str]:
    assert config.discovered is not None
    return {s.folder: s.reason for s in config.discovered.skipped}


def test_rule_smallest_power_of_two_that_fits() -> None:
    gpus = four_h100s()
    assert [g.memory_total for g in gpus] == [80 * GiB] * 4  # 72 GiB each at gpu_memory_fraction 0.9
    assert place(need(7), gpus, VLLM) == Fit((0,))  # 8.4 + 1 GiB
    assert place(need(59), gpus, VLLM) == Fit((0,))  # 70.8 + 1 = 71.8 ≤ 72
    assert place(need(60), gpus, VLLM) == Fit((0, 1))  # 73 > 72: two GPUs
    assert place(need(140), gpus, VLLM) == Fit((0, 1, 2, 3))  # 85 per GPU on two: four (43 each)
    # Tensor parallel must divide the attention heads: with 6 heads, 4 is not a choice.
    assert tp_sizes(4, 6) == [1, 2] and tp_sizes(8, None) == [1, 2, 4, 8]
    assert place(need(140), gpus, VLLM, heads=6) == Fit((0, 1), offload_gib=13)  # 85 - 72 per GPU
    # Mixed memory: the first GPUs (by index) that each fit.
    mixed = [GpuSlot(0, 24 * GiB), GpuSlot(1, 80 * GiB), GpuSlot(2, 80 * GiB)]
    assert place(need(30), mixed, VLLM) == Fit((1,))


def test_offload_and_cannot_place() -> None:
    one = four_h100s()[3:]
    assert place(need(70), one, VLLM) == Fit((3,), offload_gib=13)  # 84 + 1 - 72
    reason = place(need(70), one, LMDEPLOY)
    assert isinstance(reason, str) and reason.endswith("and this engine has no CPU offload")
    assert "needs 85.0 GiB per GPU on 1 GPU(s)" in reason and "offer 72.0 GiB" in reason
    reason = place(need(300), four_h100s(), VLLM)  # 91 per GPU on 4: 19 GiB x 4 offloaded > 64
    assert isinstance(reason, str) and "76 GiB of CPU offload, over max_cpu_offload_gib (64)" in reason
    assert place(need(300), four_h100s(), Limits(0.9, "cpu-offload-gb", 100)) == Fit((0, 1, 2, 3), 19)
    # The KV cache never leaves the GPU: a GPU too small for it alone cannot be rescued by offload.
    reason = place(Need(10 * GiB, 10.0, GiB), [GpuSlot(0, 16 * GiB)], VLLM)
    assert isinstance(reason, str) and "offloading every weight would still not leave room" in reason
    assert "no free GPU" in str(place(need(1), [], VLLM))


def test_plan_for_a_four_gpu_host_follows_the_table(tmp_path: Path) -> None:
    make_model(tmp_path, "big-chat", QWEN, weights_gib=100)  # 121 on one, 61 on two GPUs
    make_model(tmp_path, "mid-chat", QWEN, weights_gib=40)  # 49: one GPU
    make_model(tmp_path, "vl", LLAVA, weights_gib=20)  # 25: one GPU, lmdeploy
    make_model(tmp_path, "embed", BERT, weights_gib=1, files={"modules.json": [], "1_Pooling": None})
    config = build_config({"models_dir": str(tmp_path)}, gpus=four_h100s())
    # Largest first: the 4 GPUs go to the three big models; the embedder finds none left.
    assert plan(config) == {
        "big-chat": ("chat", "vllm", (0, 1), {}),
        "mid-chat": ("chat", "vllm", (2,), {}),
        "vl": ("vision", "lmdeploy", (3,), {}),
    }
    assert config.model("big-chat").tp_size == 2
    assert skipped(config) == {
        "embed": "cannot be placed: no free GPU left (GPUs are given to one model each: "
        "0 → big-chat, 1 → big-chat, 2 → mid-chat, 3 → vl)"
    }


def test_offload_on_the_gpu_explicit_entries_left(tmp_path: Path) -> None:
    chat, vl = tmp_path / "chat", tmp_path / "vl"
    make_model(chat, "huge", QWEN, weights_gib=70)
    make_model(vl, "huge-vl", LLAVA, weights_gib=70)
    explicit = {"taken": {"engine": "vllm", "model": "/m/taken", "gpus": [0, 1, 2]}}
    config = build_config({"models_dir": str(chat), "models": explicit}, gpus=four_h100s())
    assert plan(config) == {"huge": ("chat", "vllm", (3,), {"cpu-offload-gb": 13})}
    assert "--cpu-offload-gb 13" in " ".join(adapter_for("vllm").argv(config.model("huge"), "h", 1))
    config = build_config({"models_dir": str(vl), "models": explicit}, gpus=four_h100s())
    assert plan(config) == {}
    assert skipped(config)["huge-vl"].endswith("and this engine has no CPU offload")


def test_an_explicit_gpu_engine_without_gpus_holds_gpu_0(tmp_path: Path) -> None:
    make_model(tmp_path, "chat", QWEN, weights_gib=1)
    config = build_config(
        {
            "models_dir": str(tmp_path),
            "models": {
                "implicit": {"engine": "vllm", "model": "/m/implicit", "tensor_parallel": 2},  # CUDA's GPUs 0 and 1
                "remote": {"engine": "openai", "url": "http://10.0.0.5:8000/v1"},
            },
        },
        gpus=four_h100s(),
    )
    assert plan(config) == {"chat": ("chat", "vllm", (2,), {})}
    assert config.discovered is not None
    assert "GPUs of explicit entries: 0 (implicit), 1 (implicit)" in config.discovered.notes


@pytest.mark.parametrize("nvml", [FakeNvml([], init_error=NVMLError_LibraryNotFound()), FakeNvml([])])
def test_no_gpu_from_nvml_means_the_cpu_table(tmp_path: Path, nvml: FakeNvml) -> None:
    make_model(tmp_path, "chat", QWEN)
    make_model(tmp_path, "vl", LLAVA)
    config = build_config({"models_dir": str(tmp_path)}, gpus=gpu_slots(GpuProbe(nvml).read().devices))
    assert plan(config) == {"chat": ("chat", "transformers", (), {}), "vl": ("vision", "transformers", (), {})}


def test_config_gpu_list_narrows_nvml(tmp_path: Path) -> None:
    make_model(tmp_path, "chat", QWEN, weights_gib=100)
    config = build_config({"models_dir": str(tmp_path), "discovery": {"gpus": [2, 3, 9]}}, gpus=four_h100s())
    assert plan(config) == {"chat": ("chat", "vllm", (2, 3), {})}
    assert config.discovered is not None
    assert "discovery.gpus lists GPU 9, which NVML does not see: not used" in config.discovered.notes
    # Engine overrides per kind, and a tighter memory rule, change the plan accordingly.
    config = build_config(
        {
            "models_dir": str(tmp_path),
            "discovery": {"engines": {"chat": "sglang"}, "kv_cache_headroom": 0.5, "gpu_memory_fraction": 0.5},
        },
        gpus=four_h100s(),
    )
    assert plan(config) == {"chat": ("chat", "sglang", (0, 1, 2, 3), {})}  # 150/4 + 1 = 38.5 ≤ 40
