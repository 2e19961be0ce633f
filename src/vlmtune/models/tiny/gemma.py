"""Google's Gemma lineage: a SigLIP tower before a Gemma language model (Gemma 3, PaliGemma)."""

from __future__ import annotations

from transformers import (
    Gemma3Config,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    PaliGemmaConfig,
    PaliGemmaProcessor,
    PretrainedConfig,
    ProcessorMixin,
    SiglipImageProcessorPil,
)

from .common import HEAD_DIM, HIDDEN, VISION, TinyRecipe

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


def _paligemma_vocab(config: PretrainedConfig, processor: ProcessorMixin) -> None:
    """PaliGemma's composite config keeps a vocabulary size of its own (the hub's 257152 by default)."""
    config.vocab_size = len(processor.tokenizer)


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
}
