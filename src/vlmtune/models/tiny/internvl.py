"""OpenGVLab's InternVL lineage (InternVL3 / 3.5 `-hf` checkpoints): an InternViT tower, pixel shuffle, an MLP
projector and a Qwen language model; ChatML turns, `<IMG_CONTEXT>` per image, expanded between `<img>` and `</img>`."""

from __future__ import annotations

from pathlib import Path

from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLProcessor

from .common import VISION, TinyRecipe

# The template the -hf checkpoints ship (transformers' conversion script writes it); its source:
# tests/fixtures/chat_templates.
INTERNVL_TEMPLATE = (Path(__file__).parent / "templates" / "internvl.jinja").read_text()

# The sizes must agree three ways: a 64-pixel tile of 8-pixel patches is an 8x8 grid (the tower drops its CLS
# token), pixel shuffle at ratio 0.5 folds it to 4x4 = 16 features, and the processor writes
# image_seq_length = (image_size / patch_size)^2 * ratio^2 = 16 `<IMG_CONTEXT>` per tile.
_SIDE, _PATCH, _RATIO = 64, 8, 0.5
_SEQ = int((_SIDE // _PATCH) ** 2 * _RATIO**2)

RECIPES = {
    "internvl": TinyRecipe(
        config_cls=InternVLConfig,
        processor_cls=InternVLProcessor,
        image_processor_cls=GotOcr2ImageProcessorPil,
        # Up to two tiles (a wide image: two tiles and a thumbnail), as the real processor crops to patches.
        image_processor_kwargs=dict(size={"height": _SIDE, "width": _SIDE}, max_patches=2),
        special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},  # no BOS (a Qwen tokenizer)
        extra_tokens=("<|im_start|>", "<|im_end|>"),
        named_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        chat_template=INTERNVL_TEMPLATE,
        processor_kwargs=dict(image_seq_length=_SEQ),
        text_config=dict(model_type="qwen2"),
        vision_config=dict(VISION, image_size=_SIDE, patch_size=_PATCH),
        config_kwargs=dict(downsample_ratio=_RATIO),
        ids=dict(image_token_id="<IMG_CONTEXT>"),
    ),
}
