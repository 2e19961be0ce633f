"""Raw rows → a padded training batch, using the model's own processor.

Conversion happens here, per batch, rather than in a stored preprocessing pass: streaming datasets take
the same path and nothing large is cached to disk. (The check in `validate.py` prepares every sample
once before training but keeps only a verdict per row.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..models.registry import FamilySpec
from .encode import IGNORE_INDEX, Rendered, label_ids, render_conversation
from .images import fit_pixels, load_image
from .schema import Conversation, DataError, Schema, cut_prompt

logger = logging.getLogger(__name__)

# Row field set by the length check: characters to cut from the start of the prompt.
CUT = "__cut__"


@dataclass
class ImageOptions:
    """Where relative image paths are looked up and the pixel budget applied before the processor.

    `base_dirs` (``--image_root``) are tried for every row, then the folder of the row's own data file
    (`folders`, keyed by the row's `__source__`), so eval data in another folder finds its images.
    """

    base_dirs: tuple[Path, ...] = ()
    max_pixels: int | None = None
    min_pixels: int | None = None
    folders: dict[str, Path] = field(default_factory=dict)

    def open(self, refs: list, where: str, source: str | None = None) -> list[Image.Image]:
        """Load each image as RGB, unresized; errors name `where` (file, row, field) and the image's position."""
        dirs = self.base_dirs + ((self.folders[source],) if source in self.folders else ())
        loaded = []
        for i, ref in enumerate(refs):
            try:
                loaded.append(load_image(ref, dirs))
            except ValueError as err:
                raise DataError(f"{where}, image {i}: {err}") from err
        return loaded

    def fit(self, image: Image.Image) -> Image.Image:
        return fit_pixels(image, self.max_pixels, self.min_pixels)

    def load(self, refs: list, where: str, source: str | None = None) -> list[Image.Image]:
        """Load and fit each image (what the processor receives)."""
        return [self.fit(image) for image in self.open(refs, where, source)]


@dataclass
class Preparer:
    """Turns raw rows into conversations with loaded images, fitted to what the family accepts."""

    schema: Schema
    spec: FamilySpec
    images: ImageOptions = field(default_factory=ImageOptions)
    _warned: bool = False

    def conversation(self, row: dict, index: int) -> Conversation:
        """The row as the model sees it: one image for single-image families, prompt shortened if the
        length check said so (`__cut__` characters)."""
        conv = self.schema.to_conversation(row, index)
        if not self.spec.multi_image and len(conv.images) > 1:
            if not self._warned:
                logger.warning(
                    "%s takes one image per sample; using the first image of each sample.", self.spec.model_type
                )
                self._warned = True
            conv = drop_extra_images(conv, keep=1)
        if row.get(CUT):
            conv = cut_prompt(conv, row[CUT])
        return conv

    def where(self, conv: Conversation) -> str:
        """File, row and image field of `conv`, for error messages."""
        column = self.schema.image_column or self.schema.messages_column
        return f"{conv.meta.get('source', self.schema.source)}, row {conv.meta.get('row')}, field {column!r}"

    def open_images(self, conv: Conversation) -> list[Image.Image]:
        return self.images.open(conv.images, self.where(conv), conv.meta.get("source"))

    def load_images(self, conv: Conversation) -> list[Image.Image]:
        return self.images.load(conv.images, self.where(conv), conv.meta.get("source"))


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


@dataclass
class Encoded:
    """One example as the model sees it: the rendered text with its trained spans, ids and labels."""

    rendered: Rendered
    input_ids: list[int]
    labels: list[int]


def encode_one(processor, conv: Conversation, images: list, train_on_prompt: bool = False) -> Encoded:
    """Encode a single example exactly as `VlmCollator` does (used by the length check and `data inspect`)."""
    rendered = render_conversation(processor, conv.messages, train_on_prompt)
    ids = processor_inputs(processor, [rendered.text], [images], rendered.add_special_tokens)["input_ids"][0].tolist()
    return Encoded(rendered, ids, label_ids(processor, rendered, ids))
