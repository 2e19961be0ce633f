"""Behaviour some families need beyond data, named by their registry entries.

Each hook is a plain function a `FamilySpec` field points at; generic code calls the spec's hook when it
is set and never asks which family it has.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# PaliGemma is not a chat model: it reads a prefix (the prompt) and continues with the answer. Its
# checkpoints ship no chat template; this one renders what generation starts from: an <image> per image,
# then the user text. (The processor expands each <image> and puts BOS after them and "\n" at the end.)
PALIGEMMA_TEMPLATE = (
    "{% for message in messages if message['role'] == 'user' and message['content'] is not string %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% endfor %}"
    "{% for message in messages if message['role'] == 'user' %}"
    "{% if not loop.first %}{{ ' ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{% endfor %}"
)

_warned_multi_turn = False


def prefix_suffix_batch(processor, conversations, images: list[list], train_on_prompt: bool = False):
    """Encode a training batch the PaliGemma way: prompt as prefix text, last answer as ``suffix=``.

    The processor marks the suffix (answer + EOS) with ``token_type_ids`` 1; those are the trained
    tokens (the prefix attends bidirectionally, the suffix causally). With `train_on_prompt` the prefix
    text is trained too, never the image tokens or padding.
    """
    global _warned_multi_turn
    prefixes, suffixes = [], []
    for conv in conversations:
        prompt = conv.prompt_messages()
        if not _warned_multi_turn and any(m["role"] == "assistant" for m in prompt):
            logger.warning("PaliGemma trains on the last answer of each conversation; earlier answers are ignored.")
            _warned_multi_turn = True
        prefixes.append(processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        suffixes.append(conv.answer)
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        kwargs = {"images": images} if any(images) else {}
        batch = processor(text=prefixes, suffix=suffixes, padding=True, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = side
    trained = batch["attention_mask"].bool()
    if not train_on_prompt:
        trained &= batch["token_type_ids"] == 1
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    trained &= batch["input_ids"] != image_id
    batch["labels"] = torch.where(trained, batch["input_ids"], torch.full_like(batch["input_ids"], IGNORE_INDEX))
    return batch
