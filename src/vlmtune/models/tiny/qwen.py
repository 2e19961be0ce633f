"""The Qwen-VL lineage: ChatML turns, `<|image_pad|>` between vision markers, multimodal RoPE."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3_5Config,
    Qwen3_5MoeConfig,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
    Qwen3VLProcessor,
)

from .common import HEAD_DIM, HIDDEN, TinyRecipe

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

# Qwen3-VL: the same ChatML turns, without a default system message.
QWEN3_TEMPLATE = QWEN_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "",
)

# Multimodal RoPE: the sections (temporal, height, width) must sum to head_dim / 2.
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
assert sum(MROPE["mrope_section"]) == HEAD_DIM // 2


def image_processor_kwargs(patch: int) -> dict:
    """Qwen2-VL's image processor at a size giving 4 to 16 merged (2x2 patch) image tokens."""
    unit = patch * 2
    return dict(size={"shortest_edge": (2 * unit) ** 2, "longest_edge": (4 * unit) ** 2}, patch_size=patch)


QWEN2_VL = TinyRecipe(
    config_cls=Qwen2VLConfig,
    processor_cls=Qwen2VLProcessor,
    image_processor_cls=Qwen2VLImageProcessorPil,
    image_processor_kwargs=image_processor_kwargs(14),
    special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},  # no BOS
    extra_tokens=("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    chat_template=QWEN_TEMPLATE,
    text_config=dict(rope_parameters=MROPE),
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
    ids=dict(
        image_token_id="<|image_pad|>",
        video_token_id="<|video_pad|>",
        vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>",
    ),
)

TEMPLATES = Path(__file__).parent / "templates"
# Qwen3.5's own template (thinking, earlier turns' reasoning dropped); its source: tests/fixtures/chat_templates.
QWEN3_5_TEMPLATE = (TEMPLATES / "qwen3_5.jinja").read_text()

# Qwen3.5's hybrid language model: one full-attention layer, one Gated DeltaNet (linear-attention) layer
# (the real ones start with three linear-attention layers; in a random 2-layer model one in front all but
# drowns the image's signal, and LoRA then barely learns the colour); rotary embedding on a quarter of each
# head (16 / 4 = 4 dims: mrope sections sum to 2).
QWEN3_5_TEXT = dict(
    head_dim=HEAD_DIM,
    layer_types=["full_attention", "linear_attention"],
    linear_key_head_dim=HEAD_DIM,
    linear_value_head_dim=HEAD_DIM,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    rope_parameters={**MROPE, "mrope_section": [1, 1, 0], "mrope_interleaved": True, "partial_rotary_factor": 0.25},
)

_QWEN_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=HIDDEN,
    spatial_merge_size=2,
    temporal_patch_size=2,
)

RECIPES = {
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl": replace(
        QWEN2_VL,
        config_cls=Qwen2_5_VLConfig,
        processor_cls=Qwen2_5_VLProcessor,
        vision_config=dict(
            _QWEN_VISION,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[1],  # the real ones (7, 15, ...) do not exist in a 2-block tower
        ),
    ),
    "qwen3_vl": replace(
        QWEN2_VL,
        config_cls=Qwen3VLConfig,
        processor_cls=Qwen3VLProcessor,
        image_processor_kwargs=image_processor_kwargs(16),
        chat_template=QWEN3_TEMPLATE,
        text_config=dict(head_dim=HEAD_DIM, rope_parameters={**MROPE, "mrope_interleaved": True}),
        vision_config=dict(_QWEN_VISION, patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0]),
    ),
}
RECIPES["qwen3_5"] = replace(
    RECIPES["qwen3_vl"],
    config_cls=Qwen3_5Config,
    chat_template=QWEN3_5_TEMPLATE,
    extra_tokens=(*QWEN2_VL.extra_tokens, "<think>", "</think>"),
    text_config=QWEN3_5_TEXT,
    vision_config=dict(_QWEN_VISION, patch_size=16, num_position_embeddings=64),
)
# Qwen3.5-MoE: the same with a sparse MLP (routed experts as fused 3-D parameters, a router, a gated shared expert).
RECIPES["qwen3_5_moe"] = replace(
    RECIPES["qwen3_5"],
    config_cls=Qwen3_5MoeConfig,
    text_config=dict(
        QWEN3_5_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
)
# Qwen3-VL-MoE: Qwen3-VL with a sparse MLP (routed experts as fused 3-D parameters, a router; no shared
# expert), on the Qwen3-VL-Instruct template its Instruct checkpoints ship (no thinking; source in the fixtures).
RECIPES["qwen3_vl_moe"] = replace(
    RECIPES["qwen3_vl"],
    config_cls=Qwen3VLMoeConfig,
    chat_template=(TEMPLATES / "qwen3_vl.jinja").read_text(),
    text_config=dict(RECIPES["qwen3_vl"].text_config, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
)
