"""What kind of model a folder holds, read from its own files, never from its name.

Evidence, in the order it is weighed (the first that applies decides):

1. ``config.json`` must be a JSON object (else: broken).
2. ``*ForSequenceClassification`` with one label (a relevance score), or a sentence-transformers
   CrossEncoder config: **rerank**. With more labels it is a classifier, which the gateway does not serve.
3. sentence-transformers files (``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/``,
   ``config_sentence_transformers.json``) or an ``*EmbeddingModel`` / ``*ForTextEncoding`` architecture:
   **embedding**. This comes before the LM check: embedders built on LMs (Qwen3-Embedding) say
   ``*ForCausalLM`` but ship pooling files.
4. an image tower (``vision_config``, ``vision_tower``) or an image processor
   (``preprocessor_config.json`` / ``processor_config.json`` with image settings) on a generative
   architecture: **vision** (vision-language chat).
5. a generative architecture (``*ForCausalLM``, ``*LMHeadModel``, ``*ForConditionalGeneration``, ...): **chat**.
6. no ``architectures``: the ``model_type`` of a known decoder or VL family; anything else is unknown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.spec import ModelKind

GENERATIVE_SUFFIXES = (
    "ForCausalLM",
    "LMHeadModel",
    "ForConditionalGeneration",
    "ForImageTextToText",
    "ForVision2Seq",
    "VLChatModel",
    "ChatModel",
)
EMBEDDING_SUFFIXES = ("EmbeddingModel", "ForTextEncoding")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# Used only when config.json names no architectures (old or hand-written configs).
CHAT_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi",
        "phi3",
        "gpt2",
        "gpt_neox",
        "gptj",
        "falcon",
        "baichuan",
        "chatglm",
        "internlm",
        "internlm2",
        "deepseek",
        "deepseek_v2",
        "deepseek_v3",
        "yi",
        "starcoder2",
        "olmo",
        "olmo2",
        "cohere",
    }
)
VISION_MODEL_TYPES = frozenset(
    {
        "llava",
        "llava_next",
        "llava_onevision",
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "internvl_chat",
        "internvl",
        "mllama",
        "gemma3",
        "idefics3",
        "paligemma",
        "pixtral",
        "mistral3",
        "minicpmv",
        "phi3_v",
        "glm4v",
    }
)
_MAX_JSON_BYTES = 16 * 1024 * 1024  # a config bigger than this is not a config


class Unsupported(Exception):
    """The folder cannot be served as discovered; ``str()`` is the reason shown to the operator."""


@dataclass(frozen=True)
class Classified:
    kind: ModelKind
    evidence: str  # what decided the kind, for the plan
    architecture: str | None
    generative: bool  # an LM head: serving it as an embedder or reranker needs an engine-side conversion
    attention_heads: int | None  # tensor parallel must divide it
    notes: tuple[str, ...] = ()


def read_json(path: Path) -> object:
    """A JSON file's value; ``Unsupported`` naming the file when it is unreadable or not JSON."""
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise Unsupported(f"{path.name} is larger than {_MAX_JSON_BYTES >> 20} MiB")
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise Unsupported(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise Unsupported(f"{path.name} is not valid JSON: {exc}") from None


def _json_object(path: Path) -> dict[str, Any] | None:
    """An optional side file: None when absent; broken side files are broken models too."""
    if not path.is_file():
        return None
    value = read_json(path)
    if not isinstance(value, dict):
        raise Unsupported(f"{path.name} is not a JSON object")
    return value


def _has_image_settings(config: dict[str, Any] | None) -> bool:
    """An image processor, not an audio feature extractor (Whisper also ships preprocessor_config.json)."""
    if not config:
        return False
    if isinstance(config.get("image_processor"), dict):  # processor_config.json nests it
        return True
    return any("image" in key for key in config)


def _labels(config: dict[str, Any]) -> int:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    num = config.get("num_labels")
    return num if isinstance(num, int) else 2  # transformers' default


def _heads(config: dict[str, Any]) -> int | None:
    for sub in (config, config.get("text_config"), config.get("llm_config")):
        if isinstance(sub, dict) and isinstance(sub.get("num_attention_heads"), int):
            return int(sub["num_attention_heads"])
    return None


def classify(folder: Path) -> Classified:
    """The kind of the model in ``folder`` (which has a ``config.json``), or ``Unsupported`` with why."""
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise Unsupported("config.json is not a JSON object")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise Unsupported("config.json: 'architectures' is not a list of names")
    arch: str | None = archs[0] if archs else None
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    generative = bool(arch and arch.endswith(GENERATIVE_SUFFIXES))
    heads = _heads(config)
    notes = (
        ("config.json maps custom code (auto_map): the engine may need trust-remote-code, which discovery never sets",)
        if "auto_map" in config
        else ()
    )

    def found(kind: ModelKind, evidence: str) -> Classified:
        return Classified(kind, evidence, arch, generative, heads, notes)

    st_config = _json_object(folder / "config_sentence_transformers.json")
    cross_encoder = bool(st_config and st_config.get("model_type") == "CrossEncoder")
    if arch and arch.endswith("ForSequenceClassification"):
        labels = _labels(config)
        if labels == 1 or cross_encoder:
            return found("rerank", f"{arch} with one relevance label")
        raise Unsupported(
            f"{arch} with {labels} labels is a classifier, not a reranker (one relevance score); "
            "the gateway serves no classification endpoint"
        )
    st_files = [name for name in SENTENCE_TRANSFORMERS_FILES if (folder / name).is_file()]
    if (folder / "1_Pooling").is_dir():
        st_files.append("1_Pooling/")
    if st_files and not cross_encoder:
        return found("embedding", f"sentence-transformers files ({', '.join(st_files)})")
    if arch and arch.endswith(EMBEDDING_SUFFIXES):
        return found("embedding", f"{arch} is an embedding architecture")

    vision = _vision_evidence(folder, config)
    if config.get("is_encoder_decoder") is True and not vision:
        raise Unsupported(
            f"{arch or model_type or 'the model'} is an encoder-decoder (seq2seq) model, "
            "which the chat engines here do not serve"
        )
    if arch is None:
        if model_type in VISION_MODEL_TYPES:
            return found("vision", f"model_type {model_type!r} (a vision-language family)")
        if model_type in CHAT_MODEL_TYPES:
            return found("chat", f"model_type {model_type!r} (a decoder-only family)")
        raise Unsupported(
            f"config.json names no architectures and model_type {model_type!r} is not a known "
            "chat or vision-language family; add an explicit models: entry"
        )
    if vision and generative:
        return found("vision", f"{arch} with {vision}")
    if vision:
        raise Unsupported(f"{arch} has {vision} but no language-model head: an image encoder, not a chat model")
    if "audio_config" in config:
        raise Unsupported(f"{arch} is an audio model, which discovery does not serve")
    if generative:
        return found("chat", f"{arch} is a generative architecture")
    if arch.endswith("Model"):
        raise Unsupported(
            f"{arch} is a bare encoder without pooling files (modules.json, 1_Pooling/): not an "
            "embedding model discovery can vouch for; add an explicit models: entry"
        )
    raise Unsupported(f"unknown architecture {arch!r}; add an explicit models: entry to serve it")


def _vision_evidence(folder: Path, config: dict[str, Any]) -> str | None:
    for key in ("vision_config", "vision_tower", "mm_vision_tower"):
        if config.get(key) not in (None, "", False):  # an empty vision_config still declares a tower
            return f"{key} in config.json"
    for name in ("preprocessor_config.json", "processor_config.json"):
        if _has_image_settings(_json_object(folder / name)):
            return f"an image processor ({name})"
    return None
