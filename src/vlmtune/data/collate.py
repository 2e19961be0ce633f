"""Raw rows → a padded training batch, using the model's own processor.

Conversion happens here, per batch, rather than in a preprocessing pass: images are decoded only when
needed, streaming datasets take the same path, and nothing large is cached to disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.registry import FamilySpec
from .encode import IGNORE_INDEX, label_ids, render_conversation
from .images import fit_pixels, load_image
from .schema import Conversation, DataError, Schema

logger = logging.getLogger(__name__)


@dataclass
class ImageOptions:
    """Where relative image paths are looked up and the pixel budget applied before the processor."""

    base_dirs: tuple[Path, ...] = ()
    max_pixels: int | None = None
    min_pixels: int | None = None

    def load(self, refs: list, where: str) -> list:
        """Load and fit each image; errors name `where` (file and row) and the image's position."""
        loaded = []
        for i, ref in enumerate(refs):
            try:
                image = load_image(ref, self.base_dirs)
            except ValueError as err:
                raise DataError(f"{where}, image {i}: {err}") from err
            loaded.append(fit_pixels(image, self.max_pixels, self.min_pixels))
        return loaded


@dataclass
class Preparer:
    """Turns raw rows into conversations with loaded images, fitted to what the family accepts."""

    schema: Schema
    spec: FamilySpec
    images: ImageOptions = field(default_factory=ImageOptions)
    _warned: bool = False

    def conversation(self, row: dict, index: int) -> Conversation:
        conv = self.schema.to_conversation(row, index)
        if not self.spec.multi_image and len(conv.images) > 1:
            if not self._warned:
                logger.warning(
                    "%s takes one image per sample; using the first image of each sample.", self.spec.model_type
                )
                self._warned = True
            conv = drop_extra_images(conv, keep=1)
        return conv

    def load_images(self, conv: Conversation) -> list:
        return self.images.load(conv.images, f"{self.schema.source}, row {conv.meta.get('row')}")


def drop_extra_images(conv: Conversation, keep: int) -> Conversation:
    """Keep the first `keep` images and their placeholders; drop later ones."""
    seen, messages = 0, []
    for message in conv.messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                seen += 1
                if seen > keep:
                    continue
            parts.append(part)
        messages.append({**message, "content": parts})
    return Conversation(messages=messages, images=conv.images[:keep], meta=conv.meta)


def processor_inputs(processor, texts: list[str], images: list[list], add_special_tokens: bool = True, **kwargs):
    """Call the processor on a batch; images nested per sample, omitted when the batch has none."""
    if any(images):
        kwargs["images"] = images
    return processor(text=texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens, **kwargs)


@dataclass
class VlmCollator:
    """Data collator for `transformers.Trainer`: rows in, `input_ids`/pixels/`labels` out.

    Rows must carry their index in the `__index__` field (added by `train`), so errors name the row.
    """

    processor: object
    preparer: Preparer
    train_on_prompt: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        convs = [self.preparer.conversation(row, row.get("__index__", -1)) for row in rows]
        images = [self.preparer.load_images(c) for c in convs]
        if self.preparer.spec.encode_batch is not None:  # a family that is not chat-template driven
            return self.preparer.spec.encode_batch(self.processor, convs, images, self.train_on_prompt)
        rendered = [render_conversation(self.processor, c.messages, self.train_on_prompt) for c in convs]
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            batch = processor_inputs(self.processor, [r.text for r in rendered], images, rendered[0].add_special_tokens)
        finally:
            tokenizer.padding_side = side
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for i, r in enumerate(rendered):
            length = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i, :length].tolist()
            labels[i, :length] = torch.tensor(label_ids(self.processor, r, ids))
        batch["labels"] = labels
        return batch
