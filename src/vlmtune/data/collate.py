"""Raw rows → a padded training batch: each row encoded by `encode.encode`, then padded here.

Conversion happens per batch, rather than in a stored preprocessing pass: streaming datasets take the
same path and nothing large is cached to disk. (The check in `validate.py` renders every sample once
before training but keeps only a verdict per row.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional
from transformers import BatchFeature

from .encode import IGNORE_INDEX, Encoded, encode
from .pack import PADDING_FREE, Pack
from .prepare import LENGTH, Preparer

# Per-token tensors (batch, length, ...): right-padded along the length. Everything else the processor
# returns (pixel values, image grids, aspect ratios) is per image or per row: concatenated along its
# first dimension, trailing dimensions zero-padded to the largest (as the processors pad a batch).
SEQUENCE_KEYS = ("attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")


def _pad_to(tensor: torch.Tensor, shape: tuple[int, ...], value: float | int = 0) -> torch.Tensor:
    """`tensor` zero-padded (or `value`-padded) at the end of each dimension up to `shape`."""
    pad = []
    for have, want in zip(reversed(tensor.shape), reversed(shape)):
        pad += [0, want - have]
    return functional.pad(tensor, pad, value=value) if any(pad) else tensor


def _stack(tensors: list[torch.Tensor], value: float | int = 0) -> torch.Tensor:
    shape = tuple(max(sizes) for sizes in zip(*(t.shape for t in tensors)))
    return torch.cat([_pad_to(t, (t.shape[0], *shape[1:]), value) for t in tensors])


def pad_rows(rows: list[Encoded], pad_token_id: int, row_inputs: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A right-padded batch of encoded rows: `input_ids`, `labels`, the per-token masks and image inputs.

    Image inputs are per image (concatenated for the rows that have images) except the `row_inputs` keys,
    laid out one entry per row (Mllama's `pixel_values`: rows x images x tiles): there, and in the per-token
    masks (Mllama's `cross_attention_mask`), a text-only row gets zeros, meaning no image to attend to."""
    length = max(row.length for row in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : row.length] = torch.tensor(row.input_ids)
        labels[i, : row.length] = torch.tensor(row.labels)
    batch = {"input_ids": ids}
    for key in dict.fromkeys(k for row in rows for k in row.inputs):
        like = next(row.inputs[key] for row in rows if key in row.inputs)
        if key in SEQUENCE_KEYS:
            tensors = [
                row.inputs[key] if key in row.inputs else like.new_zeros((1, 1, *like.shape[2:])) for row in rows
            ]
            batch[key] = torch.cat([_pad_to(t, (1, length, *t.shape[2:])) for t in tensors])
        elif key in row_inputs:
            batch[key] = _stack([row.inputs[key] if key in row.inputs else like.new_zeros(like.shape) for row in rows])
        else:
            batch[key] = _stack([row.inputs[key] for row in rows if key in row.inputs])
    batch["labels"] = labels
    return batch


def pack_rows(
    packs: list[list[Encoded]], pad_token_id: int, row_inputs: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """A batch of packed rows: each pack's samples concatenated into one row, then right-padded.

    The interface a model needs for padding-free training: no `attention_mask`, and `position_ids`
    restarting at 0 at each sample (and for the padding tail), from which transformers builds
    per-sample attention (a block-diagonal mask, or variable-length flash attention). The first token of
    each sample is never a target, so no label crosses a sample boundary. Per-token inputs
    (`token_type_ids`, ...) are concatenated like the ids; per-image inputs are concatenated in order, as
    in `pad_rows`. Families whose positions are not plain counts (Qwen's multimodal rotary positions)
    derive them per sample from these text positions on the model side.
    """
    rows = []
    for pack in packs:
        ids = [i for row in pack for i in row.input_ids]
        labels = [label for row in pack for label in [IGNORE_INDEX, *row.labels[1:]]]
        inputs: dict[str, torch.Tensor] = {}
        for key in dict.fromkeys(k for row in pack for k in row.inputs if k != "attention_mask"):
            tensors = [row.inputs[key] for row in pack if key in row.inputs]
            inputs[key] = torch.cat(tensors, dim=1) if key in SEQUENCE_KEYS else _stack(tensors)
        rows.append(Encoded(ids, labels, inputs))
    batch = pad_rows(rows, pad_token_id, row_inputs)
    positions = torch.zeros_like(batch["input_ids"])
    for i, pack in enumerate(packs):
        start = 0
        for length in [row.length for row in pack] + [positions.shape[1] - rows[i].length]:
            positions[i, start : start + length] = torch.arange(length)
            start += length
    batch["position_ids"] = positions
    return batch


@dataclass
class VlmCollator:
    """Data collator for `transformers.Trainer`: rows in, `input_ids`/pixels/`labels` out.

    Rows must carry their index in the `__index__` field (added by `train`), so errors name the row.
    Items that are packs (`pack.Pack`, from `--packing`) become one packed row each; a batch of rows
    marked `PADDING_FREE` (`--padding_free`) becomes one packed row; anything else (evaluation) is padded,
    one sample per row. `pack_capacity` (`--max_seq_length` with `--packing`) is what a packed row was
    planned to hold.
    """

    processor: object
    preparer: Preparer
    train_on_prompt: bool = False
    pack_capacity: int | None = None

    def encode(self, row: dict) -> Encoded:
        """One raw row through the one encoding path."""
        conv = self.preparer.conversation(row, row.get("__index__", -1))
        return encode(self.processor, conv, self.preparer.load_images(conv), self.preparer.facts, self.train_on_prompt)

    def __call__(self, items: list) -> BatchFeature:
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        packs = packs_of(items)
        if packs is None:
            return BatchFeature(pad_rows([self.encode(row) for row in items], pad, self.preparer.facts.row_inputs))
        encoded = [[self.encode(row) for row in pack] for pack in packs]
        if self.pack_capacity is not None and isinstance(items[0], Pack):  # a padding-free batch has no plan
            check_capacity(packs, encoded, self.pack_capacity)
        return BatchFeature(pack_rows(encoded, pad, self.preparer.facts.row_inputs))


def packs_of(items: list) -> list[tuple[dict, ...]] | None:
    """The batch's packs of raw rows, or None for an ordinary (padded) batch."""
    if isinstance(items[0], Pack):
        return [item.rows for item in items]
    if items[0].get(PADDING_FREE):
        return [tuple(items)]
    return None


def check_capacity(packs: list[tuple[dict, ...]], encoded: list[list[Encoded]], capacity: int) -> None:
    """A packed row longer than planned means a token bound was below a sample's real length: a bug in the
    bounds, stopped here rather than training on a row longer than `--max_seq_length` (never cut: that
    would drop image or answer tokens)."""
    for pack, rows in zip(packs, encoded):
        length = sum(row.length for row in rows)
        if length > capacity:
            detail = ", ".join(
                f"row {raw.get('__index__')}: {row.length} tokens (bound {raw.get(LENGTH)})"
                for raw, row in zip(pack, rows)
            )
            raise RuntimeError(
                f"a packed row encodes to {length} tokens, more than the {capacity} (--max_seq_length) its "
                f"samples' token bounds promised ({detail}). This is a vlmtune bug: please report it with these "
                "numbers; meanwhile train without --packing (or with --padding_free)"
            )
