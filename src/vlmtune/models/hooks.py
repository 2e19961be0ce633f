"""Text and behaviour some families need beyond plain registry fields, named by their registry entries."""

from __future__ import annotations

import torch
from transformers.masking_utils import (
    and_masks,
    blockwise_overlay,
    create_causal_mask,
    find_packed_sequence_indices,
    packed_sequence_mask_function,
    sliding_window_overlay,
)
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from ..errors import RunError

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


def _packed_mask_arguments(model: torch.nn.Module, batch: dict) -> tuple[object, dict, torch.Tensor]:
    """The text config, the arguments every `create_causal_mask` call of a packed batch shares, and each
    token's sample index in its row."""
    positions = batch["position_ids"]
    samples = find_packed_sequence_indices(positions)
    if samples is None:  # one sample per row
        samples = torch.zeros_like(positions)
    # The mask functions need only the shape, dtype and device of the embeddings.
    dtype = model.get_input_embeddings().weight.dtype
    shape = torch.empty(*positions.shape, 0, dtype=dtype, device=positions.device)
    common = dict(config=model.config.get_text_config(), inputs_embeds=shape, attention_mask=None, past_key_values=None)
    return common["config"], common, samples


def image_block_packed_masks(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Gemma 3's attention masks for a packed batch, built with transformers' own mask functions.

    Gemma 3 lets each image's tokens attend to each other both ways (`token_type_ids` == 1). For its
    full-attention layers transformers 5.23 adds those image blocks to the per-sample mask correctly;
    for its sliding-window layers it looks the blocks up at each sample's own positions instead of the
    row's, so the second sample of a row gets the first one's image layout. Here the sliding mask is
    built on the row's indices: (causal or same image block) and within the window and same sample.
    The model takes this mapping as it takes one prepared by `generate`.
    """
    config, common, samples = _packed_mask_arguments(model, batch)
    positions = batch["position_ids"]
    blocks = get_block_sequence_ids_for_mask(batch["token_type_ids"], device=positions.device)
    return {
        "full_attention": create_causal_mask(**common, position_ids=positions, block_sequence_ids=blocks),
        "sliding_attention": create_causal_mask(
            **common,
            position_ids=None,
            or_mask_function=blockwise_overlay(blocks),
            and_mask_function=and_masks(
                sliding_window_overlay(config.sliding_window), packed_sequence_mask_function(samples)
            ),
        ),
    }


def prefix_packed_mask(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """PaliGemma's attention mask for a packed batch: each sample's prefix (image and prompt,
    `token_type_ids` == 0) attends both ways within itself, its answer causally, never across samples.

    transformers 5.23 gives every prefix token of a row the same block, so packed samples' prefixes (and
    the padding tail) would see each other; here each sample's prefix is a block of its own. (5.24 builds
    the same mask by itself; this hook goes when 5.23 leaves the tested range, docs/dependencies.md.) The model
    takes a ready 4-D mask as it is, in every layer: PaliGemma 2's sliding-window layers too, which is
    exact only while no sample is longer than the window, so longer samples are refused.
    """
    config, common, samples = _packed_mask_arguments(model, batch)
    window = getattr(config, "sliding_window", None)
    longest = max(int(torch.unique_consecutive(row, return_counts=True)[1].max()) for row in samples)
    if window is not None and longest > window:
        raise RunError(
            f"--packing: a packed sample has {longest} tokens, more than {model.config.model_type}'s sliding window "
            f"({window}), which packed batches cannot apply; train without --packing, or set --max_seq_length "
            f"to {window} or less"
        )
    blocks = torch.where(batch["token_type_ids"] == 0, samples, -1)
    return create_causal_mask(**common, position_ids=batch["position_ids"], block_sequence_ids=blocks)
