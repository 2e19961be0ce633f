"""Mistral's vision lineage: Mistral 3 (Mistral Small 3.1), a Pixtral tower, a patch-merging projector and a
Mistral language model; `[SYSTEM_PROMPT]`, `[INST] ... [/INST]` turns, `[IMG]` per image."""

from __future__ import annotations

from pathlib import Path

from transformers import Mistral3Config, PixtralImageProcessorPil

from ..processors import torchvision_free
from .common import HEAD_DIM, VISION, TinyRecipe

# Mistral Small 3.1's own template (default system message, tools); its source: tests/fixtures/chat_templates.
MISTRAL3_TEMPLATE = (Path(__file__).parent / "templates" / "mistral3.jinja").read_text()

_PATCH = 8  # a 64x64 image: 8x8 patches, merged 2x2 into 4x4 image tokens (plus a break per row)

RECIPES = {
    "mistral3": TinyRecipe(
        config_cls=Mistral3Config,
        processor_cls=torchvision_free("PixtralProcessor"),
        image_processor_cls=PixtralImageProcessorPil,
        image_processor_kwargs=dict(size={"longest_edge": 64}, patch_size={"height": _PATCH, "width": _PATCH}),
        special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        extra_tokens=("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
        chat_template=MISTRAL3_TEMPLATE,
        processor_kwargs=dict(patch_size=_PATCH, spatial_merge_size=2),
        text_config=dict(model_type="mistral", head_dim=HEAD_DIM, sliding_window=None),
        vision_config=dict(VISION, model_type="pixtral", head_dim=16, patch_size=_PATCH, image_size=64),
        config_kwargs=dict(spatial_merge_size=2, vision_feature_layer=-1),
        ids=dict(image_token_index="[IMG]"),
    ),
}
