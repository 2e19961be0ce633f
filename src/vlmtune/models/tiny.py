"""Tiny, randomly initialised models of real VLM architectures, built offline.

Each builder returns a real transformers config and a real processor (tokenizer + image processor +
chat template) for one family, sized so a model trains in seconds on a CPU. `build_tiny_model` writes
them with `save_pretrained`, so the result loads with `from_pretrained` exactly like a hub checkpoint.
Tests and the demo use these; users can use them to try vlmtune without a GPU or a download.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    GenerationConfig,
    LlavaConfig,
    LlavaProcessor,
    PretrainedConfig,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from .processors import image_only
from .tokenizer import build_tokenizer

HIDDEN = 64
# A larger init than the default keeps a LoRA-only tiny model from stalling: with 0.02 the frozen
# output layer caps the logits and loss plateaus near ln(vocab).
INIT_RANGE = 0.2

_TEXT = dict(
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=INIT_RANGE,
)

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-1.5 ("USER: <image>\n... ASSISTANT: ...") as llava-hf ships it: images first, no end-of-turn
# token after the answer (vlmtune appends EOS to trained turns when a template has none).
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _ids(tokenizer, **names: str) -> dict[str, int]:
    return {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in names.items()}


def _qwen2_vl() -> tuple[PretrainedConfig, ProcessorMixin]:
    tokens = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = build_tokenizer(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, tokens, chat_template=QWEN_TEMPLATE
    )
    # 56x56 to 112x112 pixels: 4 to 16 image tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
    processor = image_only(Qwen2VLProcessor)(image_processor, tok, chat_template=QWEN_TEMPLATE)
    ids = _ids(
        tok,
        image_token_id="<|image_pad|>",
        video_token_id="<|video_pad|>",
        vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>",
    )
    head_dim = HIDDEN // _TEXT["num_attention_heads"]
    config = Qwen2VLConfig(
        text_config=dict(
            _TEXT,
            vocab_size=len(tok),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=HIDDEN,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **ids,
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    return config, processor


def _llava() -> tuple[PretrainedConfig, ProcessorMixin]:
    tok = build_tokenizer(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        ["<image>"],
        chat_template=LLAVA_TEMPLATE,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = LlavaProcessor(
        image_processor,
        tok,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            projection_dim=32,
        ),
        text_config=dict(
            _TEXT,
            model_type="llama",
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return config, processor


BUILDERS: dict[str, Callable[[], tuple[PretrainedConfig, ProcessorMixin]]] = {
    "qwen2_vl": _qwen2_vl,
    "llava": _llava,
}


def build_tiny_model(family: str, output_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model of `family` with its processor to `output_dir` and return the path."""
    if family not in BUILDERS:
        raise ValueError(f"No tiny builder for family {family!r}; choose one of: {', '.join(sorted(BUILDERS))}")
    torch.manual_seed(seed)
    config, processor = BUILDERS[family]()
    model = AutoModelForImageTextToText.from_config(config)
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
