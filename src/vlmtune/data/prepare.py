"""Raw rows → conversations with their images, fitted to what the model family accepts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from PIL import Image

from .conversation import Conversation
from .encode import EncodingFacts
from .images import ImageOptions
from .schema import Schema, cut_prompt

logger = logging.getLogger(__name__)

# Row field set by the length check: characters to cut from the start of the prompt.
CUT = "__cut__"
# Column the pre-training check adds: the most tokens each row can take (packing, length-grouped batches).
LENGTH = "__length__"


@dataclass
class Preparer:
    """Turns raw rows into conversations with loaded images, fitted to what the family accepts."""

    schema: Schema
    facts: EncodingFacts
    images: ImageOptions = field(default_factory=ImageOptions)
    _warned: bool = False

    def conversation(self, row: dict, index: int) -> Conversation:
        """The row as the model sees it: one image for single-image families, prompt shortened if the
        length check said so (`__cut__` characters)."""
        conv = self.schema.to_conversation(row, index)
        if not self.facts.multi_image and len(conv.images) > 1:
            if not self._warned:
                logger.warning("%s takes one image per sample; using the first image of each sample.", self.facts.name)
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

    def image_sizes(self, conv: Conversation) -> list[tuple[int, int]]:
        """(width, height) of each image as the processor will receive it, from file headers only."""
        return self.images.sizes(conv.images, self.where(conv), conv.meta.get("source"))


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
