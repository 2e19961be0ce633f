"""The Idefics lineage (Hugging Face's): a SigLIP-style tower, a connector (Idefics2: a perceiver resampler;
Idefics3, SmolVLM: pixel shuffle), Mistral- or Llama-style text."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from transformers import (
    Idefics2Config,
    Idefics2ImageProcessorPil,
    Idefics2Processor,
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)

from .common import HIDDEN, INIT_RANGE, VISION, TinyRecipe


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
# HuggingFaceM4/idefics2-8b's own template; its source: tests/fixtures/chat_templates.
IDEFICS2_TEMPLATE = (Path(__file__).parent / "templates" / "idefics2.jinja").read_text()
_LATENTS = 8  # the perceiver's latents per image (the real checkpoints: 64)
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
    ),    # Idefics2: "User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n" with no BOS in the template
    # (the tokenizer adds it). Each image is the perceiver's latents: the processor writes `image_seq_len`
    # <image> tokens between <fake_token_around_image>s, so it must equal `resampler_n_latents`.
    "idefics2": replace(
        IDEFICS3,
        config_cls=Idefics2Config,
        processor_cls=Idefics2Processor,
        image_processor_cls=Idefics2ImageProcessorPil,
        image_processor_kwargs=dict(size={"shortest_edge": 64, "longest_edge": 64}, do_image_splitting=False),
        special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"},
        extra_tokens=("<fake_token_around_image>", "<image>", "<end_of_utterance>"),
        chat_template=IDEFICS2_TEMPLATE,
        processor_kwargs=dict(image_seq_len=_LATENTS),
        text_config=dict(model_type="mistral", sliding_window=None),
        # Generation stops at the template's turn end too (EOS is </s>). The real checkpoints' own
        # generation_config.json was not seen here: where it lacks <end_of_utterance>, loading warns.
        stop_tokens=("<end_of_utterance>",),
        vision_config=dict(image_size=64, patch_size=16, **VISION, initializer_range=INIT_RANGE),
        config_kwargs=dict(
            perceiver_config=dict(
                hidden_size=HIDDEN,
                resampler_n_latents=_LATENTS,
                resampler_depth=1,
                resampler_n_heads=2,
                resampler_head_dim=16,
                num_key_value_heads=1,
                initializer_range=INIT_RANGE,
            )
        ),
    ),
}
