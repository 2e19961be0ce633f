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
    Gemma3Config,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GenerationConfig,
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MllamaConfig,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PaliGemmaConfig,
    PaliGemmaProcessor,
    PretrainedConfig,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    SiglipImageProcessorPil,
    SmolVLMConfig,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)

from ...errors import UsageError
from ..loading import part_of
from ..processors import image_only
from ..registry import get_family
from ..tokenizer import build_tokenizer

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


# Multimodal RoPE: the sections (temporal, height, width) must sum to head_dim / 2 = 8.
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
assert sum(_QWEN_ROPE["mrope_section"]) == HIDDEN // _TEXT["num_attention_heads"] // 2


def _text(tok, **overrides) -> dict:
    """The tiny language model's config: shared sizes, the tokenizer's vocabulary and special ids."""
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return {**_TEXT, "vocab_size": len(tok), **ids, **overrides}


def _qwen_text(tok) -> dict:
    """Qwen2-VL / Qwen2.5-VL language model: multimodal RoPE, no BOS token."""
    return _text(tok, rope_parameters=dict(_QWEN_ROPE), bos_token_id=None)


def _ids(tokenizer, **names: str) -> dict[str, int]:
    return {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in names.items()}


def _qwen2_vl() -> tuple[PretrainedConfig, ProcessorMixin]:
    tok, processor, ids = _qwen_vl_processor(Qwen2VLProcessor, 14, QWEN_TEMPLATE)
    config = Qwen2VLConfig(
        text_config=_qwen_text(tok),
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
        text_config=_text(
            tok,
            model_type="llama",
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return config, processor


# Qwen3-VL: the same ChatML turns as Qwen2-VL, without a default system message.
QWEN3_TEMPLATE = QWEN_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "",
)

# Mistral-instruct turns, as llava-v1.6-mistral ships them: "[INST] <image>\nQ [/INST] A</s>"; a system
# message is folded into the first user turn.
LLAVA_NEXT_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{% set ns.system = ns.system + part['text'] + '\n\n' %}{% endfor %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system }}{% set ns.system = '' %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

# Gemma 3: "<start_of_turn>user ... <end_of_turn>" with the assistant called "model"; the system text
# opens the first user turn; each image is its begin-of-image marker (the processor expands it).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{% set ns.system = ns.system + part['text'] + '\n\n' %}{% endfor %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' + ns.system }}"
    "{% set ns.system = '' %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '<end_of_turn>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Llama 3 header format (Llama 3.2 Vision): each turn "<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>".
MLLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image|>' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _idefics_template(begin: str) -> str:
    """Idefics3 / SmolVLM turns: "User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n"."""
    return (
        "{{ '" + begin + "' }}"
        "{% for message in messages %}"
        "{{ message['role'].capitalize() }}"
        "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{{ '<end_of_utterance>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


IDEFICS3_TEMPLATE = _idefics_template("<|begin_of_text|>")
SMOLVLM_TEMPLATE = _idefics_template("<|im_start|>")

_VISION_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _qwen_vl_processor(processor_cls, patch: int, template: str):
    """ChatML tokenizer and a Qwen2-VL image processor giving 4 to 16 merged image tokens."""
    tokens = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = build_tokenizer({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, tokens, chat_template=template)
    unit = patch * 2
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": (2 * unit) ** 2, "longest_edge": (4 * unit) ** 2}, patch_size=patch
    )
    processor = image_only(processor_cls)(image_processor, tok, chat_template=template)
    ids = _ids(
        tok,
        image_token_id="<|image_pad|>",
        video_token_id="<|video_pad|>",
        vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>",
    )
    return tok, processor, ids


def _qwen2_5_vl() -> tuple[PretrainedConfig, ProcessorMixin]:
    tok, processor, ids = _qwen_vl_processor(Qwen2_5_VLProcessor, 14, QWEN_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(tok),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=HIDDEN,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],  # the real ones (7, 15, ...) do not exist in a 2-block tower
        ),
        **ids,
    )
    return config, processor


def _qwen3_vl() -> tuple[PretrainedConfig, ProcessorMixin]:
    tok, processor, ids = _qwen_vl_processor(Qwen3VLProcessor, 16, QWEN3_TEMPLATE)
    config = Qwen3VLConfig(
        text_config=_text(
            tok,
            head_dim=HIDDEN // _TEXT["num_attention_heads"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=HIDDEN,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        **ids,
    )
    config.text_config.eos_token_id = tok.eos_token_id
    return config, processor


def _llava_siglip() -> tuple[PretrainedConfig, ProcessorMixin]:
    """LLaVA-1.5 layout with a SigLIP tower: no CLS token, so every patch feature is kept ("full")."""
    config, clip_processor = _llava()
    tok = clip_processor.tokenizer
    image_processor = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    processor = LlavaProcessor(
        image_processor,
        tok,
        patch_size=16,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=64, patch_size=16, **_VISION_TINY),
        text_config=config.text_config.to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return config, processor


def _llava_next() -> tuple[PretrainedConfig, ProcessorMixin]:
    tok = build_tokenizer(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        ["<image>", "[INST]", "[/INST]"],
        chat_template=LLAVA_NEXT_TEMPLATE,
    )
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor,
        tok,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=dict(
            model_type="clip_vision_model", image_size=32, patch_size=16, projection_dim=32, **_VISION_TINY
        ),
        text_config=_text(
            tok,
            model_type="mistral",
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return config, processor


def _gemma3() -> tuple[PretrainedConfig, ProcessorMixin]:
    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = build_tokenizer(
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
        ["<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA3_TEMPLATE,
        named_tokens=image_tokens,
    )
    # 64x64 pixels, 16x16 patches (4x4), pooled 2x2: 4 soft tokens per image.
    image_processor = Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    processor = Gemma3Processor(image_processor, tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    head_dim = HIDDEN // _TEXT["num_attention_heads"]
    config = Gemma3Config(
        text_config=_text(
            tok,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
        ),
        vision_config=dict(model_type="siglip_vision_model", image_size=64, patch_size=16, **_VISION_TINY),
        mm_tokens_per_image=4,
        **_ids(
            tok,
            boi_token_index="<start_of_image>",
            eoi_token_index="<end_of_image>",
            image_token_index="<image_soft_token>",
        ),
    )
    return config, processor


def _mllama() -> tuple[PretrainedConfig, ProcessorMixin]:
    tok = build_tokenizer(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"},
        ["<|start_header_id|>", "<|end_header_id|>", "<|image|>", "<|python_tag|>"],
        chat_template=MLLAMA_TEMPLATE,
    )
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor, tok, chat_template=MLLAMA_TEMPLATE)
    vision_hidden = 32
    config = MllamaConfig(
        vision_config=dict(
            hidden_size=vision_hidden,
            attention_heads=2,
            num_hidden_layers=2,
            num_global_layers=1,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
            max_num_tiles=2,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
            intermediate_layers_indices=[0],
            vision_output_dim=vision_hidden * 2,  # last layer + one intermediate layer, concatenated
        ),
        text_config=_text(
            tok,
            cross_attention_layers=[1],
        ),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    return config, processor


_IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]


def _idefics3() -> tuple[PretrainedConfig, ProcessorMixin]:
    tok = build_tokenizer(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<end_of_utterance>", "pad_token": "<|end_of_text|>"},
        _IDEFICS_TOKENS,
        chat_template=IDEFICS3_TEMPLATE,
    )
    # One 64x64 image, 16x16 patches, pixel-shuffled by 2: 4 image tokens (no tiling in the tiny model).
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 64}, do_image_splitting=False
    )
    processor = Idefics3Processor(image_processor, tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        vision_config=dict(image_size=64, patch_size=16, **_VISION_TINY),
        text_config=_text(
            tok,
            model_type="llama",
        ),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return config, processor


def _smolvlm() -> tuple[PretrainedConfig, ProcessorMixin]:
    tok = build_tokenizer(
        {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>"},
        _IDEFICS_TOKENS,
        chat_template=SMOLVLM_TEMPLATE,
    )
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 64}, do_image_splitting=False
    )
    processor = image_only(SmolVLMProcessor)(image_processor, tok, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)
    config = SmolVLMConfig(
        vision_config=dict(image_size=64, patch_size=16, **_VISION_TINY),
        text_config=_text(
            tok,
            model_type="llama",
        ),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return config, processor


def _paligemma() -> tuple[PretrainedConfig, ProcessorMixin]:
    tok = build_tokenizer(
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
        ["<image>"],
    )
    image_processor = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    image_processor.image_seq_length = 16  # (64 / 16) ** 2 patches, one token each
    # Like the real checkpoints, no chat template: vlmtune supplies the registry's default on loading.
    processor = PaliGemmaProcessor(image_processor, tok)
    # The processor adds 1152 <loc>/<seg> tokens: size the model after it.
    head_dim = HIDDEN // _TEXT["num_attention_heads"]
    config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model", image_size=64, patch_size=16, projection_dim=HIDDEN, **_VISION_TINY
        ),
        text_config=_text(
            tok,
            model_type="gemma",
            head_dim=head_dim,
        ),
        projection_dim=HIDDEN,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    config.vocab_size = len(tok)
    return config, processor


BUILDERS: dict[str, Callable[[], tuple[PretrainedConfig, ProcessorMixin]]] = {
    "qwen2_vl": _qwen2_vl,
    "llava": _llava,
    "llava_siglip": _llava_siglip,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "llava_next": _llava_next,
    "gemma3": _gemma3,
    "mllama": _mllama,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "paligemma": _paligemma,
}


def _open_zero_paths(model: torch.nn.Module, spec) -> None:
    """Open the image paths that transformers initialises shut, as trained checkpoints have them open:
    zero projector matrices (Gemma 3's) get random values, zero tanh gates (Mllama's cross-attention)
    get 1. Otherwise a random tiny model could not see its images at all."""
    for name, param in model.named_parameters():
        if param.any():
            continue
        with torch.no_grad():
            if param.dim() >= 2 and part_of(name, spec) == "projector":
                param.normal_(0.0, INIT_RANGE)
            elif name.rsplit(".", 1)[-1].endswith("_gate"):
                param.fill_(1.0)


def build_tiny_model(family: str, output_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model of `family` with its processor to `output_dir` and return the path."""
    if family not in BUILDERS:
        raise UsageError(f"--family {family!r}: no tiny builder for it; choose one of: {', '.join(sorted(BUILDERS))}")
    torch.manual_seed(seed)
    config, processor = BUILDERS[family]()
    model = AutoModelForImageTextToText.from_config(config)
    _open_zero_paths(model, get_family(config.model_type))
    tok = processor.tokenizer
    # The text config may list several stop tokens (Gemma 3's <eos> and <end_of_turn>).
    eos = config.get_text_config().eos_token_id
    model.generation_config = GenerationConfig(
        eos_token_id=eos if isinstance(eos, list) else tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
