"""The Idefics lineage (Hugging Face's): a SigLIP-style tower, a pixel-shuffle connector, Llama-style text."""

from __future__ import annotations

from dataclasses import replace

from transformers import (
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)

from .common import VISION, TinyRecipe


def _template(begin: str) -> str:
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


IDEFICS3_TEMPLATE = _template("<|begin_of_text|>")
SMOLVLM_TEMPLATE = _template("<|im_start|>")

# One 64x64 image, 16x16 patches, pixel-shuffled by 2: 4 image tokens (no tiling in the tiny model).
_ONE_TILE = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 64}, do_image_splitting=False)

IDEFICS3 = TinyRecipe(
    config_cls=Idefics3Config,
    processor_cls=Idefics3Processor,
    image_processor_cls=Idefics3ImageProcessorPil,
    image_processor_kwargs=_ONE_TILE,
    special_tokens={
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<end_of_utterance>",
        "pad_token": "<|end_of_text|>",
    },
    extra_tokens=("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"),
    chat_template=IDEFICS3_TEMPLATE,
    processor_kwargs=dict(image_seq_len=4),
    text_config=dict(model_type="llama"),
    vision_config=dict(image_size=64, patch_size=16, **VISION),
    config_kwargs=dict(scale_factor=2),
    ids=dict(image_token_id="<image>"),
)

RECIPES = {
    "idefics3": IDEFICS3,
    "smolvlm": replace(
        IDEFICS3,
        config_cls=SmolVLMConfig,
        processor_cls=SmolVLMProcessor,
        image_processor_cls=SmolVLMImageProcessorPil,
        special_tokens={"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>"},
        chat_template=SMOLVLM_TEMPLATE,
    ),
}
