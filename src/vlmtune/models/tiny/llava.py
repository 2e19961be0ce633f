"""The LLaVA lineage: a ViT tower, a projector and a Llama-style language model, one `<image>` per image."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    SiglipImageProcessorPil,
)

from .common import INIT_RANGE, VISION, TinyRecipe

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

LLAMA_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

# A CLS token on top of the patches: the "default" strategy drops it, so the processor counts one extra.
_CLS_KEPT_OUT = dict(vision_feature_select_strategy="default", vision_feature_layer=-1)

LLAVA = TinyRecipe(
    config_cls=LlavaConfig,
    processor_cls=LlavaProcessor,
    image_processor_cls=CLIPImageProcessorPil,
    image_processor_kwargs=dict(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
    special_tokens=LLAMA_SPECIAL_TOKENS,
    extra_tokens=("<image>",),
    chat_template=LLAVA_TEMPLATE,
    processor_kwargs=dict(patch_size=16, vision_feature_select_strategy="default", num_additional_image_tokens=1),
    text_config=dict(model_type="llama"),
    vision_config=dict(model_type="clip_vision_model", image_size=64, patch_size=16, projection_dim=32, **VISION),
    config_kwargs=_CLS_KEPT_OUT,
    ids=dict(image_token_id="<image>"),
)

# LLaVA-Next: the grid pinpoints must be the same in processor and config.
_PINPOINTS = [[32, 64], [64, 32], [64, 64]]

# LLaVA-OneVision's template, as transformers' conversion script writes it into the llava-hf checkpoints;
# its source: tests/fixtures/chat_templates.
LLAVA_ONEVISION_TEMPLATE = (Path(__file__).parent / "templates" / "llava_onevision.jinja").read_text()

# OneVision counts a base image's tokens as `num_image_tokens` = (tower side / patch)^2 (SigLIP: no CLS
# token, every patch kept): a 32-pixel tower of 8-pixel patches gives 16; a 64-pixel image then adds its
# 2x2 grid of 32-pixel crops (unpadded, a newline per row), as the real anyres processor does.
_OV_SIDE, _OV_PATCH = 32, 8

RECIPES = {
    "llava": LLAVA,
    # The LLaVA-1.5 layout with a SigLIP tower: no CLS token, so every patch feature is kept ("full"),
    # in processor and config alike, or image features and image tokens do not match.
    "llava_siglip": replace(
        LLAVA,
        image_processor_cls=SiglipImageProcessorPil,
        image_processor_kwargs=dict(size={"height": 64, "width": 64}),
        processor_kwargs=dict(patch_size=16, vision_feature_select_strategy="full", num_additional_image_tokens=0),
        vision_config=dict(model_type="siglip_vision_model", image_size=64, patch_size=16, **VISION),
        config_kwargs=dict(vision_feature_select_strategy="full", vision_feature_layer=-1),
    ),
    "llava_next": replace(
        LLAVA,
        config_cls=LlavaNextConfig,
        processor_cls=LlavaNextProcessor,
        image_processor_cls=LlavaNextImageProcessorPil,
        image_processor_kwargs=dict(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS
        ),
        extra_tokens=("<image>", "[INST]", "[/INST]"),
        chat_template=LLAVA_NEXT_TEMPLATE,
        text_config=dict(model_type="mistral"),
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=16, projection_dim=32, **VISION),
        config_kwargs=dict(_CLS_KEPT_OUT, image_grid_pinpoints=_PINPOINTS),
    ),    "llava_onevision": replace(
        LLAVA,
        config_cls=LlavaOnevisionConfig,
        processor_cls=LlavaOnevisionProcessor,
        image_processor_cls=LlavaOnevisionImageProcessorPil,
        image_processor_kwargs=dict(size={"height": _OV_SIDE, "width": _OV_SIDE}, image_grid_pinpoints=_PINPOINTS),
        special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},  # no BOS (a Qwen2 tokenizer)
        extra_tokens=("<|im_start|>", "<|im_end|>", "<image>", "<video>"),
        chat_template=LLAVA_ONEVISION_TEMPLATE,
        processor_kwargs=dict(num_image_tokens=(_OV_SIDE // _OV_PATCH) ** 2, vision_feature_select_strategy="full"),
        text_config=dict(model_type="qwen2"),
        vision_config=dict(
            VISION,
            model_type="siglip_vision_model",
            image_size=_OV_SIDE,
            patch_size=_OV_PATCH,
            vision_use_head=False,
            # As the text side's: with the default 0.02 a random tower's features barely vary with the image.
            initializer_range=INIT_RANGE,
        ),
        config_kwargs=dict(
            vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=_PINPOINTS
        ),
        ids=dict(image_token_id="<image>", video_token_id="<video>"),
    ),
}
