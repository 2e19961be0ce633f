"""Zhipu's GLM-V lineage: GLM-4.1V-Thinking (`glm4v`) and GLM-4.5V (`glm4v_moe`), a Qwen2-VL-style tower with a
patch merger and a GLM-4 language model with multimodal RoPE; `[gMASK]<sop>`, then `<|system|>`, `<|user|>` and
`<|assistant|>` turns with no closing token (the next turn's marker, or the end, closes an answer); each image
`<|begin_of_image|><|image|><|end_of_image|>`, its `<|image|>` expanded to the merged patches."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from transformers import Glm4vConfig, Glm4vImageProcessorPil, Glm4vMoeConfig, Glm4vProcessor

from .common import HEAD_DIM, HIDDEN, INIT_RANGE, TinyRecipe
from .qwen import image_processor_kwargs

# GLM-4.1V-9B-Thinking's own template (no think handling of its own); its source: tests/fixtures/chat_templates.
GLM4V_TEMPLATE = (Path(__file__).parent / "templates" / "glm4v.jinja").read_text()

# Rotary embedding on half of each head, as the real configs have it: the (temporal, height, width) sections
# must sum to head_dim * partial_rotary_factor / 2 (the real 8 + 12 + 12 = 128 * 0.5 / 2; here 16 * 0.5 / 2).
_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2]}
assert sum(_ROPE["mrope_section"]) == int(HEAD_DIM * _ROPE["partial_rotary_factor"]) // 2

_TOKENS = (
    *("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>"),
    *("<|begin_of_image|>", "<|image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|video|>", "<|end_of_video|>"),
)
_PATCH = 8  # 64-pixel images: 8x8 patches, merged 2x2 into 16 image tokens

RECIPES = {
    "glm4v": TinyRecipe(
        config_cls=Glm4vConfig,
        processor_cls=Glm4vProcessor,
        image_processor_cls=Glm4vImageProcessorPil,
        image_processor_kwargs=image_processor_kwargs(_PATCH),
        # No BOS (the template writes [gMASK]<sop>); pad and EOS are one token, as in the real tokenizer.
        special_tokens={"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        extra_tokens=_TOKENS,
        chat_template=GLM4V_TEMPLATE,
        text_config=dict(rope_parameters=_ROPE),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=HIDDEN,
            image_size=64,
            patch_size=_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            # As the text side's: with the default 0.02 the random tower's features barely tell the colours
            # apart and LoRA learns the shapes task to ~67% (82% with this).
            initializer_range=INIT_RANGE,
        ),
        ids=dict(
            image_token_id="<|image|>",
            video_token_id="<|video|>",
            image_start_token_id="<|begin_of_image|>",
            image_end_token_id="<|end_of_image|>",
            video_start_token_id="<|begin_of_video|>",
            video_end_token_id="<|end_of_video|>",
        ),
        # The real generation configs stop on <|user|> and <|observation|> too: the turn a model would start next.
        stop_tokens=("<|user|>", "<|observation|>"),
    ),
}

# GLM-4.5V: the same with a sparse language model (a dense first layer, then routed experts as fused 3-D
# parameters, a router and a shared expert). Its own template was not found in any public copy here, so the
# tiny model ships GLM-4.1V's (the same turn and image markers; see tests/fixtures/chat_templates).
RECIPES["glm4v_moe"] = replace(
    RECIPES["glm4v"],
    config_cls=Glm4vMoeConfig,
    template_of="GLM-4.1V",
    text_config=dict(
        rope_parameters=_ROPE,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
    ),
)
