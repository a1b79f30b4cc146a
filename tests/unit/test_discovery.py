"""models_dir discovery: kinds told from the model's own files, broken folders skipped with a reason,
explicit entries winning, re-scans on every load, and what `gateway check` and /v1/models say."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from engines.discovery import DiscoveryPolicy, GiB, GpuSlot, discover, read_weights, sanitize
from gateway.config.loader import ConfigError, build_config, load_config

FOUR_GPUS = [GpuSlot(i, 80 * GiB, "H100") for i in range(4)]
EIGHT_GPUS = [GpuSlot(i, 80 * GiB, "H100") for i in range(8)]

QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_attention_heads": 4}
LLAVA = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "vision_config": {"model_type": "clip_vision_model"},
    "text_config": {"num_attention_heads": 4},
}
BERT = {"architectures": ["BertModel"], "model_type": "bert", "num_attention_heads": 12}
RERANKER = {
    "architectures": ["XLMRobertaForSequenceClassification"],
    "model_type": "xlm-roberta",
    "id2label": {"0": "LABEL_0"},
    "num_attention_heads": 16,
}


def save_safetensors(path: Path, tensors: dict[str, tuple[list[int], str]], *, sparse_bytes: int = 0) -> None:
    """Small real weights through the safetensors library; a big one (``sparse_bytes``) as a valid file
    whose data is a hole, so a "70B" model costs no disk."""
    if not sparse_bytes:
        try:
            import numpy as np
            from safetensors.numpy import save_file
        except ImportError:  # slim environments: the same bytes, by hand
            pass
        else:
            dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
            save_file({k: np.zeros(shape, dtypes[d]) for k, (shape, d) in tensors.items()}, str(path))
            return
    header: dict[str, Any] = {}
    offset = 0
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}
    for name, (shape, dtype) in tensors.items():
        n = sizes[dtype]
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if sparse_bytes:
        header["big"] = {"dtype": "BF16", "shape": [sparse_bytes // 2], "data_offsets": [offset, offset + sparse_bytes]}
        offset += sparse_bytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def make_model(
    root: Path,
    folder: str,
    config: dict[str, Any] | str,
    *,
    weights_gib: float = 0,
    files: dict[str, Any] | None = None,
    weights: bool = True,
) -> Path:
    """A model folder: config.json, side files (JSON values, or None for a folder), one weight file."""
    path = root / folder
    path.mkdir(parents=True)
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for name, value in (files or {}).items():
        if value is None:
            (path / name).mkdir()
        else:
            (path / name).write_text(value if isinstance(value, str) else json.dumps(value))
    if weights:  # a big model holds only its hole, so its size is exactly weights_gib
        save_safetensors(
            path / "model.safetensors",
            {} if weights_gib else {"embed.weight": ([16, 8], "F32")},
            sparse_bytes=int(weights_gib * GiB),
        )
    return path


def by_name(result: Any) -> dict[str, Any]:
    return {s.name: s for s in result.specs}


def test_each_kind_is_told_from_the_files_not_the_name(tmp_path: Path) -> None:
    make_model(tmp_path, "chat", QWEN)
    make_model(tmp_path, "vl", LLAVA)
    # No vision_config, but an image processor beside a generative head.
    make_model(
        tmp_path,
        "vl-by-processor",
        {"architectures": ["FooForConditionalGeneration"]},
        files={"preprocessor_config.json": {"image_processor_type": "FooImageProcessor", "image_mean": [0.5]}},
    )
    # Named like a chat model, holds a sentence-transformers embedder.
    pooling = {"modules.json": [{"type": "sentence_transformers.models.Pooling"}], "1_Pooling": None}
    make_model(tmp_path, "llama-3-chat", BERT, files=pooling)
    # An LM shipped as an embedder (Qwen3-Embedding): pooling files win over the causal-LM head.
    make_model(
        tmp_path,
        "lm-embedder",
        {**QWEN, "architectures": ["Qwen3ForCausalLM"]},
        files={"config_sentence_transformers.json": {"prompts": {}}, "1_Pooling": None},
    )
    make_model(tmp_path, "rerank", RERANKER)
    result = discover(tmp_path, gpus=EIGHT_GPUS)  # one GPU each
    assert result.skipped == ()
    kinds = {p.name: (p.kind, p.engine) for p in result.plan}
    assert kinds == {
        "chat": ("chat", "vllm"),
        "vl": ("vision", "lmdeploy"),
        "vl-by-processor": ("vision", "lmdeploy"),
        "llama-3-chat": ("embedding", "vllm"),
        "lm-embedder": ("embedding", "vllm"),
        "rerank": ("rerank", "vllm"),
    }
    specs = by_name(result)
    assert specs["llama-3-chat"].args == {"runner": "pooling"}
    assert specs["lm-embedder"].args == {"runner": "pooling", "convert": "embed"}
    assert specs["rerank"].args == {"runner": "pooling"} and specs["rerank"].kind == "rerank"
    assert specs["chat"].args == {} and specs["chat"].source == "discovered"
    assert specs["chat"].model == str(tmp_path / "chat")


def test_cpu_host_runs_chat_and_vision_on_transformers_and_skips_pooling_kinds(tmp_path: Path) -> None:
    make_model(tmp_path, "chat", QWEN)
    make_model(tmp_path, "vl", LLAVA)
    make_model(tmp_path, "embed", BERT, files={"sentence_bert_config.json": {"max_seq_length": 512}})
    make_model(tmp_path, "rerank", RERANKER)
    result = discover(tmp_path, gpus=[])
    assert {s.name: (s.engine, s.gpus) for s in result.specs} == {
        "chat": ("transformers", ()),
        "vl": ("transformers", ()),
    }
    reasons = {s.folder: s.reason for s in result.skipped}
    assert "embedding model: no engine serves it on a host without GPUs" in reasons["embed"]
    assert "discovery.cpu_engines.rerank" in reasons["rerank"]
    # The table is overridable per kind and host, and per-engine commands and args follow the model.
    policy = DiscoveryPolicy(
        cpu_engines={"embedding": "vllm"}, command={"vllm": ("/opt/vllm/bin/vllm",)}, args={"vllm": {"device": "cpu"}}
    )
    spec = by_name(discover(tmp_path, policy, gpus=[]))["embed"]
    assert spec.engine == "vllm" and spec.command == ("/opt/vllm/bin/vllm",) and spec.gpus == ()
    assert spec.args == {"runner": "pooling", "device": "cpu"}


@pytest.mark.parametrize(
    ("folder", "config", "files", "weights", "reason"),
    [
        ("bad-json", "{not json", {}, True, "config.json is not valid JSON"),
        ("list-json", "[1, 2]", {}, True, "config.json is not a JSON object"),
        ("no-weights", QWEN, {}, False, "no weight files"),
        (
            "unknown",
            {"architectures": ["FrobnicatorForTimeTravel"]},
            {},
            True,
            "unknown architecture 'FrobnicatorForTimeTravel'",
        ),
        ("bare-encoder", BERT, {}, True, "bare encoder without pooling files"),
        (
            "classifier",
            {**RERANKER, "id2label": {"0": "neg", "1": "neu", "2": "pos"}},
            {},
            True,
            "with 3 labels is a classifier",
        ),
        (
            "seq2seq",
            {"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True},
            {},
            True,
            "encoder-decoder",
        ),
        ("clip", {"architectures": ["CLIPModel"], "vision_config": {}}, {}, True, "no language-model head"),
        ("no-arch", {"model_type": "frobnicator"}, {}, True, "model_type 'frobnicator' is not a known"),
        (
            "bad-side-file",
            QWEN,
            {"preprocessor_config.json": "{oops"},
            True,
            "preprocessor_config.json is not valid JSON",
        ),
        (
            "missing-shard",
            QWEN,
            {"model.safetensors.index.json": {"weight_map": {"a": "model-00002-of-00002.safetensors"}}},
            True,
            "lists shards that are missing: model-00002-of-00002.safetensors",
        ),
    ],
)
def test_broken_or_unknown_folders_are_skipped_with_a_reason(
    tmp_path: Path, folder: str, config: Any, files: dict[str, Any], weights: bool, reason: str
) -> None:
    make_model(tmp_path, "good", QWEN)
    make_model(tmp_path, folder, config, files=files, weights=weights)
    result = discover(tmp_path, gpus=FOUR_GPUS)
    assert [s.name for s in result.specs] == ["good"]
    [skipped] = result.skipped
    assert skipped.folder == folder and reason in skipped.reason


def test_damaged_weight_files_and_stray_folders(tmp_path: Path) -> None:
    truncated = make_model(tmp_path, "truncated", QWEN)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-16])
    garbage = make_model(tmp_path, "garbage", QWEN, weights=False)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "notes").mkdir()  # no config.json
    (tmp_path / ".cache").mkdir()  # hidden: ignored quietly
    (tmp_path / "README.md").write_text("not a folder")
    reasons = {s.folder: s.reason for s in discover(tmp_path, gpus=FOUR_GPUS).skipped}
    assert "lies outside the file (truncated download?)" in reasons["truncated"]
    assert "does not fit the file" in reasons["garbage"]
    assert "no config.json" in reasons["notes"]
    assert set(reasons) == {"truncated", "garbage", "notes"}


def test_weights_come_from_safetensors_headers_and_the_index(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.mkdir()
    save_safetensors(path / "model-00001-of-00002.safetensors", {"a": ([1000, 10], "F32")})
    save_safetensors(path / "model-00002-of-00002.safetensors", {"b": ([500], "F16"), "c": ([3], "I64")})
    save_safetensors(path / "consolidated.safetensors", {"a": ([1000, 10], "F32"), "b": ([500], "F16")})
    (path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                    "c": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    weights = read_weights(path)
    # The consolidated copy is not counted: only the shards the index names.
    assert weights.bytes == 40_000 + 1_000 + 24
    assert weights.dtypes == ("F32", "F16", "I64")
    assert weights.files == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def test_folder_names_become_valid_served_names(tmp_path: Path) -> None:
    assert sanitize("My Model\tv2") == "My-Model-v2"
    make_model(tmp_path, "My Model v2", QWEN)
    make_model(tmp_path, "My-Model-v2", QWEN)  # the same served name: the first folder (by name) keeps it
    result = discover(tmp_path, gpus=FOUR_GPUS)
    [spec] = result.specs
    assert spec.name == "My-Model-v2" and spec.display_name == "My Model v2"
    assert "already taken by folder 'My Model v2'" in result.skipped[0].reason


def test_explicit_entries_win_on_name_and_on_path(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_model(models, "qwen", QWEN)
    make_model(models, "other", QWEN)
    make_model(models, "free", QWEN)
    config = build_config(
        {
            "models_dir": str(models),
            "models": {
                "qwen": {"engine": "vllm", "model": "/elsewhere/qwen", "gpus": [0, 1]},  # same served name
                "mine": {"engine": "sglang", "model": str(models / "other") + "/", "gpus": [2]},  # same folder
            },
        },
        gpus=FOUR_GPUS,
    )
    assert [(m.name, m.source) for m in config.models] == [
        ("qwen", "config"),
        ("mine", "config"),
        ("free", "discovered"),
    ]
    assert config.model("free").gpus == (3,)  # GPUs 0-2 belong to the explicit entries
    assert config.model("qwen").model == "/elsewhere/qwen"
    assert config.discovered is not None
    assert {o.folder: o.reason for o in config.discovered.overridden} == {
        "qwen": "served by the explicit models: entry 'qwen'",
        "other": "served by the explicit models: entry 'mine'",
    }


def test_a_folder_added_before_a_reload_is_served_after_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_model(models, "b-first", QWEN, weights_gib=10)
    path = tmp_path / "gateway.yaml"
    path.write_text(f"models_dir: {models}\n")
    first = load_config(path, gpus=FOUR_GPUS)
    assert [(m.name, m.gpus) for m in first.models] == [("b-first", (0,))]
    # A bigger model sorts first and would take GPU 0; the running one keeps its GPU across the reload.
    make_model(models, "a-new", QWEN, weights_gib=30)
    second = load_config(path, gpus=FOUR_GPUS, previous=first)
    assert {m.name: m.gpus for m in second.models} == {"a-new": (1,), "b-first": (0,)}
    assert second.model("b-first") == first.model("b-first")  # unchanged spec: a reload need not restart it
    fresh = load_config(path, gpus=FOUR_GPUS)
    assert {m.name: m.gpus for m in fresh.models} == {"a-new": (0,), "b-first": (1,)}


def test_models_dir_from_the_environment_and_a_missing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_model(tmp_path / "env-models", "chat", QWEN)
    monkeypatch.setenv("GATEWAY_MODELS_DIR", str(tmp_path / "env-models"))
    config = build_config({"models_dir": str(tmp_path / "file-models")}, gpus=[])
    assert config.models_dir == str(tmp_path / "env-models") and [m.name for m in config.models] == ["chat"]
    monkeypatch.delenv("GATEWAY_MODELS_DIR")
    missing = build_config({"models_dir": str(tmp_path / "nowhere")}, gpus=[])
    assert missing.models == () and missing.discovered is not None
    assert missing.discovered.skipped[0].reason == "models_dir is not a folder"
    assert build_config({}).discovered is None


def test_discovery_block_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"discovery\.engines: .*embedding: engine 'transformers' cannot serve"):
        build_config({"models_dir": str(tmp_path), "discovery": {"engines": {"embedding": "transformers"}}})
    with pytest.raises(ConfigError, match=r"discovery\.engines\.poetry"):
        build_config({"discovery": {"engines": {"poetry": "vllm"}}})
    with pytest.raises(ConfigError, match=r"models\.x\.source"):
        build_config({"models": {"x": {"engine": "vllm", "model": "/m", "source": "discovered"}}})
    # Config GPUs with their memory: NVML is not needed, and placement uses them.
    make_model(tmp_path, "chat", QWEN, weights_gib=50)
    config = build_config(
        {
            "models_dir": str(tmp_path),
            "discovery": {"gpus": [{"index": 6, "memory_gib": 48}, {"index": 7, "memory_gib": 48}]},
        }
    )
    assert config.model("chat").gpus == (6, 7)
    assert not DiscoveryPolicy(gpus=[{"index": 0, "memory_gib": 8}]).needs_nvml


def test_check_prints_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.cli import main

    models = tmp_path / "models"
    make_model(models, "chat", QWEN, weights_gib=100)
    make_model(models, "broken", "{")
    config = tmp_path / "c.yaml"
    config.write_text(f"""
models_dir: {models}
discovery:
  gpus: [{{index: 0, memory_gib: 80}}, {{index: 1, memory_gib: 80}}]
  command: {{vllm: [/opt/vllm/bin/vllm]}}
""")
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"models_dir {models}: 1 model(s) found, 1 skipped; GPUs: 0 from config 80.0 GiB" in out
    assert (
        "discovered: chat → chat → vllm → GPUs 0,1 (tp 2), plans 61.0 GiB per GPU; weights 100.0 GiB "
        "(Qwen2ForCausalLM is a generative architecture)"
    ) in out
    assert (
        f"CUDA_VISIBLE_DEVICES=0,1 VLLM_MEDIA_URL_ALLOW_REDIRECTS=0 /opt/vllm/bin/vllm serve {models}/chat "
        "--served-model-name chat --host 127.0.0.1 --port '<free port>' --tensor-parallel-size 2"
    ) in out
    assert "skipped: broken: config.json is not valid JSON" in out
    assert "config OK: 1 model(s)" in out


def test_v1_models_lists_discovered_models_and_skipped_folders(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from gateway.app import create_app

    make_model(tmp_path, "chat", QWEN)
    make_model(tmp_path, "broken", QWEN, weights=False)
    # on_demand: listed, never started by this test.
    config = build_config({"models_dir": str(tmp_path), "discovery": {"load": "on_demand"}}, gpus=[])
    with TestClient(create_app(config)) as client:
        body = client.get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == "chat" and card["engine"] == "transformers"
    assert card["kind"] == "chat" and card["source"] == "discovered"
    assert body["skipped"] == [{"folder": "broken", "reason": "no weight files (*.safetensors, pytorch_model*.bin)"}]
