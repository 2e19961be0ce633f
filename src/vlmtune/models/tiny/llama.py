"""Meta's Llama vision lineage: Llama 3 header turns (Llama 3.2 Vision, i.e. Mllama)."""

from __future__ import annotations

from transformers import MllamaConfig, MllamaImageProcessorPil, MllamaProcessor

from .common import TinyRecipe

# Llama 3 header format: each turn "<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>".
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image|>' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_VISION_HIDDEN = 32

RECIPES = {
    "mllama": TinyRecipe(
        config_cls=MllamaConfig,
        processor_cls=MllamaProcessor,
        image_processor_cls=MllamaImageProcessorPil,
        image_processor_kwargs=dict(size={"height": 32, "width": 32}, max_image_tiles=2),
        special_tokens={
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|finetune_right_pad_id|>",
        },
        extra_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|image|>", "<|python_tag|>"),
        chat_template=LLAMA3_TEMPLATE,
        text_config=dict(cross_attention_layers=[1]),
        vision_config=dict(
            hidden_size=_VISION_HIDDEN,
            attention_heads=2,
            num_hidden_layers=2,
            num_global_layers=1,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
            max_num_tiles=2,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
            intermediate_layers_indices=[0],
            vision_output_dim=_VISION_HIDDEN * 2,  # last layer + one intermediate layer, concatenated
        ),
        ids=dict(image_token_index="<|image|>"),
    ),
}
