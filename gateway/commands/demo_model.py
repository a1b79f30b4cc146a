"""Tiny random-weight models for the CPU demo engine (``transformers serve``), made offline in seconds.

* ``make_chat_model``: a Qwen2-shaped causal LM (hidden 256, 2 layers, 4 heads of 64, 2 KV heads,
  intermediate 512, ~1.3M parameters; vLLM's CPU attention needs head_dim >= 32) with a byte-level BPE
  tokenizer trained on a few sentences and a ChatML chat template.
* ``make_vl_model``: a LLaVA model (CLIP vision tower, 28 px images in 14 px patches, so 4 image tokens;
  Llama text model) with ``LlavaProcessor`` over the PIL CLIP image processor (no torchvision needed).

The weights are random (fixed seeds, so the same bytes every time): the answers are noise, and tests check
shape, routing, usage and that an image reached the engine, not the words. ``transformers serve`` raises
any ``max_new_tokens`` below 1024 to 1024, so clients should send ``max_tokens``.

torch, transformers and tokenizers are imported inside the functions: the gateway package is imported
in slim images that have none of them.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypedDict

if TYPE_CHECKING:
    from os import PathLike

    from tokenizers import Tokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

SEED = 0
EOS = "<|im_end|>"
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IMAGE = "<image>"
MAX_NEW_TOKENS = 16  # for generate(); `transformers serve` lifts any default below 1024 to 1024
# Wider than the usual 0.02, so that greedy decoding of random weights varies with the prompt instead of
# repeating one token.
INIT_RANGE = 0.2

_CORPUS = [
    "Hello! How can I help you today?",
    "The quick brown fox jumps over the lazy dog.",
    "An inference gateway routes OpenAI-compatible requests to engines such as vLLM and LMDeploy.",
    "This tiny model has random weights, so its answers are noise.",
    "What is in this image? A small red square on a white background.",
    "Streaming responses arrive as server-sent events, one chunk at a time.",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" @ # $ % & _",
    "system user assistant tool",
]

# ChatML. Content is a string or a list of parts (text parts are kept, other parts dropped); ``None``
# (an assistant turn that only calls tools) renders as empty.
CHAT_TEMPLATE = (
    r"{%- for message in messages -%}"
    r"{{ '<|im_start|>' + message['role'] + '\n' }}"
    r"{%- if message['content'] is string -%}{{ message['content'] }}"
    r"{%- elif message['content'] is not none -%}"
    r"{%- for part in message['content'] -%}"
    r"{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- endif -%}"
    r"{{ '<|im_end|>\n' }}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# The same, with image parts (``image`` as ``transformers serve`` hands them to the processor,
# ``image_url`` as OpenAI clients send them) rendered as the ``<image>`` token that the processor
# expands to the image's patch tokens.
VL_CHAT_TEMPLATE = (
    r"{%- for message in messages -%}"
    r"{{ '<|im_start|>' + message['role'] + '\n' }}"
    r"{%- if message['content'] is string -%}{{ message['content'] }}"
    r"{%- elif message['content'] is not none -%}"
    r"{%- for part in message['content'] -%}"
    r"{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    r"{%- elif part['type'] in ['image', 'image_url'] -%}{{ '<image>\n' }}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- endif -%}"
    r"{{ '<|im_end|>\n' }}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def _train_tokenizer(special: list[str], vocab_size: int = 384) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


class _Pretrained(Protocol):
    """A model, tokenizer or processor: what ``_save`` writes."""

    def save_pretrained(self, save_directory: str | PathLike[str], /) -> object: ...


class _TextShape(TypedDict):
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    initializer_range: float
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


def _fast_tokenizer(special: list[str], chat_template: str) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(special),
        eos_token=EOS,
        pad_token=PAD,
        chat_template=chat_template,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy (so answers repeat exactly), a short default, and only printable ASCII or the end token.

    Suppressing the other tokens keeps random output readable and free of half UTF-8 sequences, which a
    streamed answer would otherwise decode differently from the same answer in one piece.
    """
    from transformers import GenerationConfig

    eos_id = _token_id(tokenizer, EOS)
    suppress = [i for i in range(len(tokenizer)) if i != eos_id and not _printable(_token_text(tokenizer, i))]
    return GenerationConfig(
        eos_token_id=eos_id,
        pad_token_id=_token_id(tokenizer, PAD),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        suppress_tokens=suppress,
    )


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(found, int)  # typed ``int | list[int]``: one token in, one id out
    return found


def _token_text(tokenizer: PreTrainedTokenizerFast, token_id: int) -> str:
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    assert isinstance(text, str)  # typed ``str | list[str]``: one sequence in, one text out
    return text


def _printable(text: str) -> bool:
    return bool(text) and all(" " <= c <= "~" for c in text) and text not in (PAD, IM_START, IMAGE)


def _save(path: Path, *parts: _Pretrained) -> None:
    """Replace ``path`` with the ``save_pretrained`` output of ``parts``: whole or not at all, quietly,
    world-readable. A folder that holds something other than a model is never removed."""
    from transformers.utils import logging as hf_logging

    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise FileExistsError(f"{path} is not empty and holds no model; not overwriting it")
    partial = path.parent / f".{path.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars are noise for a 400 KB file
    try:
        for part in parts:
            part.save_pretrained(partial)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for file in partial.iterdir():
        file.chmod(0o644)  # the weights are written 0600; an engine may run as another user
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)  # config.json appears only with everything else (`make` keys on it)


def _text_shape(pad_id: int, eos_id: int) -> _TextShape:
    """The tiny decoder both demo models share: ~1.3M parameters, fast on one CPU core.

    head_dim 64 (256 / 4): vLLM's CPU attention supports 32, 64, 80, ... 512 and its engine dies on the first
    request with 16 (docs/real-vllm/README.md); ``transformers serve`` takes any.
    """
    return {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "initializer_range": INIT_RANGE,
        "tie_word_embeddings": True,
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def make_chat_model(path: Path) -> None:
    """Write a tiny Qwen2-shaped chat model (safetensors, tokenizer, chat template) into ``path``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = _fast_tokenizer([PAD, IM_START, EOS], CHAT_TEMPLATE)
    eos_id = _token_id(tokenizer, EOS)
    pad_id = _token_id(tokenizer, PAD)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        **_text_shape(pad_id, eos_id),
        dtype="float32",
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = _generation_config(tokenizer)
    _save(path, model, tokenizer)
    log.info("tiny chat model (%d parameters) written to %s", model.num_parameters(), path)


def make_vl_model(path: Path) -> None:
    """Write a tiny LLaVA vision-language model (CLIP tower, Llama text model, processor) into ``path``."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    image_size, patch_size = 28, 14
    tokenizer = _fast_tokenizer([PAD, IM_START, EOS, IMAGE], VL_CHAT_TEMPLATE)
    eos_id = _token_id(tokenizer, EOS)
    pad_id = _token_id(tokenizer, PAD)
    image_id = _token_id(tokenizer, IMAGE)
    vision = CLIPVisionConfig(  # head_dim 64 here too (vLLM runs the tower with --model-impl transformers)
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        **_text_shape(pad_id, eos_id),
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        vision_feature_select_strategy="default",  # drop CLS: (28/14)^2 = 4 tokens per image
        vision_feature_layer=-1,
        tie_word_embeddings=True,
        dtype="float32",
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=VL_CHAT_TEMPLATE,
        image_token=IMAGE,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tokenizer)
    _save(path, model, processor)
    log.info("tiny vision-language model (%d parameters) written to %s", model.num_parameters(), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gateway demo-model",
        description="Make the tiny random-weight models that the CPU demo engine serves (offline, seconds).",
    )
    parser.add_argument("--path", type=Path, help="folder for the chat model")
    parser.add_argument("--vl-path", type=Path, help="folder for the vision-language model")
    parser.add_argument("--force", action="store_true", help="rebuild a model whose folder already has one")
    args = parser.parse_args(argv)
    if args.path is None and args.vl_path is None:
        parser.error("give --path, --vl-path or both")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    for target, make in ((args.path, make_chat_model), (args.vl_path, make_vl_model)):
        if target is None:
            continue
        if (target / "config.json").is_file() and not args.force:
            log.info("%s already has a model; --force rebuilds it", target)
            continue
        try:
            make(target)
        except FileExistsError as exc:
            log.error("gateway demo-model: %s", exc)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
