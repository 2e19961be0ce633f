"""Packed batches on the model side: what each family needs so packed samples stay independent.

A packed batch (`data.collate.pack_rows`) holds several samples per row, no `attention_mask`, and
`position_ids` that restart at 0 at each sample. From those positions transformers confines attention
to each sample (`masking_utils.find_packed_sequence_indices` builds a block-diagonal mask for sdpa and
eager; FlashAttention-2 runs variable-length attention from them), so for most families the batch
goes to the model unchanged (`FamilySpec.packing_positions == "text"`). FlashAttention-2 reads the
samples off the positions only in a one-row batch, so for it the rows are laid end to end (`one_row`).

Qwen2-VL, Qwen2.5-VL and Qwen3-VL ("mrope") rotate queries and keys by 3-D positions (time, height,
width of each image token) that their own `get_rope_index` derives from the ids and the image grids.
Given plain positions instead, they rotate image tokens as text, and Qwen2/2.5-VL also build no
per-sample mask from them. So here each sample's 3-D positions come from the model's own function
(called on the samples as a batch of their own, so it pairs images with samples as it always does),
and the model gets the `(4, batch, length)` form its forward documents for packing: row 0 the text
positions (from which the mask or variable-length attention still finds the samples), rows 1-3 the
multimodal ones.

Gemma 3's image tokens and PaliGemma's prefix attend both ways; transformers' own mask code lets that
reach across packed samples (or misplace it), so their registry entries name a hook
(`FamilySpec.packing_masks`) that builds the masks with transformers' own mask functions. Families
whose packing cannot be made correct carry a `packing_refusal`, raised by `check_packing`.
"""

from __future__ import annotations

import inspect

import torch
from transformers.utils.generic import is_flash_attention_requested

from ..data.collate import SEQUENCE_KEYS
from ..errors import UsageError
from .registry import FamilySpec

# Arguments of `get_rope_index` that are laid out per token (batch, length): cut per sample like the ids.
_PER_TOKEN = ("input_ids", "mm_token_type_ids")
# Everything in a packed batch laid out per token (batch, length, ...).
_TOKEN_KEYS = ("input_ids", "labels", "position_ids", *SEQUENCE_KEYS)


def check_packing(refusal: str | None, flag: str = "--packing", model_type: str = "these") -> None:
    """Raise a usage error when packed samples of this family could not be kept apart (`refusal`: the
    family's `packing_refusal`, the reason)."""
    if refusal:
        raise UsageError(
            f"{flag}: {model_type} models cannot be trained on packed samples: {refusal}. Train without {flag}."
        )


def is_packed(batch: dict) -> bool:
    """Whether `batch` is a packed batch: positions given and no padding mask (`pack_rows`' contract)."""
    return batch.get("position_ids") is not None and batch.get("attention_mask") is None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / FSDP / PEFT wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "get_base_model", lambda: None)()
        if inner is None or inner is model:
            return model
        model = inner


def packed_inputs(model: torch.nn.Module, spec: FamilySpec, batch: dict) -> dict:
    """`batch` (packed) as `model` must receive it: one row for FlashAttention, the family's positions and
    masks filled in (registry), ids, labels and images unchanged. Refused families raise their reason."""
    check_packing(spec.packing_refusal, model_type=spec.model_type)
    if is_flash_attention_requested(unwrap(model).config.get_text_config()):
        batch = one_row(batch)
    if spec.packing_positions == "mrope":
        batch = {**batch, "position_ids": multimodal_positions(unwrap(model), batch)}
    if spec.packing_masks is not None:
        batch = {**batch, "attention_mask": spec.packing_masks(unwrap(model), batch)}
    return batch


def one_row(batch: dict) -> dict:
    """The packed rows of `batch` laid end to end as a single row.

    FlashAttention-2 (and 3, and the kernels' versions) finds the samples from the positions only in a
    batch of one row; given several rows it attends across the samples of each. One row is exact: each
    row's first token starts a sample, and no label crosses a sample (`pack_rows`); images stay in order.
    """
    return {k: v.reshape(1, -1, *v.shape[2:]) if k in _TOKEN_KEYS else v for k, v in batch.items()}


def sample_spans(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """`(row, start, end)` of each sample in packed rows: a sample starts wherever the text position does
    not follow on from the previous one (the rule transformers' packed-sequence detection uses)."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    rows, columns = (t.tolist() for t in starts.nonzero(as_tuple=True))
    spans = []
    for i, (row, start) in enumerate(zip(rows, columns)):
        next_in_row = i + 1 < len(rows) and rows[i + 1] == row
        spans.append((row, start, columns[i + 1] if next_in_row else positions.shape[1]))
    return spans


def _rope_index_owner(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if callable(getattr(module, "get_rope_index", None)):
            return module
    raise TypeError(f"{type(model).__name__} has no get_rope_index: its family cannot take 'mrope' packing")


def multimodal_positions(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """`(4, batch, length)` positions for a packed Qwen-style batch: the text positions, then each sample's
    3-D rotary positions as the model's own `get_rope_index` computes them for that sample alone."""
    owner = _rope_index_owner(model)
    text = batch["position_ids"]
    spans = sample_spans(text)
    longest = max(end - start for _, start, end in spans)
    accepted = inspect.signature(owner.get_rope_index).parameters
    # The samples as a right-padded batch of their own (attention_mask marks each one's tokens).
    per_sample = {"attention_mask": torch.zeros(len(spans), longest, dtype=torch.long, device=text.device)}
    for key in _PER_TOKEN:
        if key in batch:
            per_sample[key] = batch[key].new_zeros(len(spans), longest)
    for i, (row, start, end) in enumerate(spans):
        per_sample["attention_mask"][i, : end - start] = 1
        for key in _PER_TOKEN:
            if key in batch:
                per_sample[key][i, : end - start] = batch[key][row, start:end]
    # Per-image inputs (grids, seconds per grid) stay whole: images are in sample order already.
    images = {k: v for k, v in batch.items() if k in accepted and k not in per_sample and k != "position_ids"}
    rope, _ = owner.get_rope_index(**per_sample, **images)
    positions = text.new_zeros(4, *text.shape)
    positions[0] = text
    for i, (row, start, end) in enumerate(spans):
        positions[1:, row, start:end] = rope[:, i, : end - start]
    return positions
