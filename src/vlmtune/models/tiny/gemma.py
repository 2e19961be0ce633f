"""Google's Gemma lineage: a SigLIP tower before a Gemma language model (Gemma 3, PaliGemma); Gemma 4's
own vision tower (2-D RoPE, pooled patches, linears inside clipping wrappers) and turn markers."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Gemma3Config,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma4Config,
    Gemma4ImageProcessorPil,
    Gemma4Processor,
    PaliGemmaConfig,
    PaliGemmaProcessor,
    PretrainedConfig,
    ProcessorMixin,
    SiglipImageProcessorPil,
)
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

from .common import HEAD_DIM, HIDDEN, INIT_RANGE, VISION, TinyRecipe

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

GEMMA_SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}

_SIGLIP = dict(model_type="siglip_vision_model", image_size=64, patch_size=16, **VISION)


# Gemma 4's own template (turns `<|turn>role ... <turn|>`, a thinking channel, tools); its source:
# tests/fixtures/chat_templates/README.md.
GEMMA4_TEMPLATE = (Path(__file__).parent / "templates" / "gemma4.jinja").read_text()

# The checkpoints' named markers (the processor reads them off the tokenizer, audio ones even for images).
GEMMA4_NAMED_TOKENS = {
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}
# Turn, thinking-channel and tool-calling markers, each one token in the real vocabulary.
GEMMA4_TOKENS = (
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
)


def _paligemma_vocab(config: PretrainedConfig, processor: ProcessorMixin) -> None:
    """PaliGemma's composite config keeps a vocabulary size of its own (the hub's 257152 by default)."""
    config.vocab_size = len(processor.tokenizer)


def _gemma4_vocab(config: PretrainedConfig, processor: ProcessorMixin) -> None:
    """Gemma 4's per-layer input embeddings keep a vocabulary size of their own (262144 by default)."""
    config.text_config.vocab_size_per_layer_input = len(processor.tokenizer)


RECIPES = {
    "gemma3": TinyRecipe(
        config_cls=Gemma3Config,
        processor_cls=Gemma3Processor,
        image_processor_cls=Gemma3ImageProcessorPil,
        image_processor_kwargs=dict(size={"height": 64, "width": 64}),
        special_tokens=GEMMA_SPECIAL_TOKENS,
        extra_tokens=("<start_of_turn>", "<end_of_turn>"),
        # The processor reads its image markers off the tokenizer.
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        chat_template=GEMMA3_TEMPLATE,
        # 64x64 pixels, 16x16 patches (4x4), pooled 2x2: 4 soft tokens per image.
        processor_kwargs=dict(image_seq_length=4),
        text_config=dict(
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
        ),
        vision_config=_SIGLIP,
        config_kwargs=dict(mm_tokens_per_image=4),
        ids=dict(
            boi_token_index="<start_of_image>",
            eoi_token_index="<end_of_image>",
            image_token_index="<image_soft_token>",
        ),
        stop_tokens=("<end_of_turn>",),
    ),
    # Like the real checkpoints, no chat template: vlmtune supplies the registry's default on loading.
    # The processor adds 1152 <loc>/<seg> tokens, which the config's vocabulary counts (built after it).
    "paligemma": TinyRecipe(
        config_cls=PaliGemmaConfig,
        processor_cls=PaliGemmaProcessor,
        image_processor_cls=SiglipImageProcessorPil,
        image_processor_kwargs=dict(size={"height": 64, "width": 64}, image_seq_length=16),  # (64 / 16) ** 2
        special_tokens=GEMMA_SPECIAL_TOKENS,
        extra_tokens=("<image>",),
        text_config=dict(model_type="gemma", head_dim=HEAD_DIM),
        vision_config=dict(_SIGLIP, projection_dim=HIDDEN),
        config_kwargs=dict(projection_dim=HIDDEN),
        ids=dict(image_token_index="<image>"),
        finish=_paligemma_vocab,
    ),
    # Gemma 4 (the E2B/E4B layout: per-layer input embeddings, vision linears wrapped in clipping modules;
    # no audio tower, though its model still lists the audio block among those to keep whole).
    "gemma4": TinyRecipe(
        config_cls=Gemma4Config,
        processor_cls=Gemma4Processor,
        # 70 soft tokens (the fewest it supports): 630 16x16 patches, pooled 3x3, whatever the image's size.
        image_processor_cls=Gemma4ImageProcessorPil,
        image_processor_kwargs=dict(max_soft_tokens=70),
        feature_extractor_cls=Gemma4AudioFeatureExtractor,
        special_tokens=GEMMA_SPECIAL_TOKENS,
        extra_tokens=GEMMA4_TOKENS,
        named_tokens=GEMMA4_NAMED_TOKENS,
        chat_template=GEMMA4_TEMPLATE,
        processor_kwargs=dict(image_seq_length=70),
        text_config=dict(
            head_dim=HEAD_DIM,
            global_head_dim=HEAD_DIM,
            # Wide enough for an image's 70 tokens and the question: the sliding layer sees the image too.
            sliding_window=256,
            layer_types=["sliding_attention", "full_attention"],
            hidden_size_per_layer_input=16,
        ),
        # The tower initialises from its own range: at Gemma 4's default (0.02) a random tower's features
        # barely vary with the image, and the tiny model learnt the shapes task only to ~36%.
        vision_config=dict(
            VISION, head_dim=16, num_key_value_heads=2, use_clipped_linears=True, initializer_range=INIT_RANGE
        ),
        # The projector and language model initialise from the composite config's range.
        config_kwargs=dict(audio_config=None, initializer_range=INIT_RANGE),
        ids=dict(
            boi_token_id="<|image>",
            eoi_token_id="<image|>",
            image_token_id="<|image|>",
            boa_token_id="<|audio>",
            eoa_token_index="<audio|>",
            audio_token_id="<|audio|>",
            video_token_id="<|video|>",  # added to the tokenizer by the processor itself
        ),
        stop_tokens=("<turn|>",),
        finish=_gemma4_vocab,
    ),
}
