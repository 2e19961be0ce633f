"""GRPO's rows: each SFT row as TRL's conversational prompt with its images, plus the answer rewards compare with.

The data is `vlmtune train`'s (``image_path, prompt, response`` tables or ``messages`` rows, loaded, split and
checked by `splits.build_splits`); what changes is what a row becomes. Instead of one encoded sequence, a
row is the conversation up to its last assistant turn (system text kept, folded into the first user turn
for templates without a system turn, as training renders it), the row's images loaded as training loads
them (`--image_max_pixels`...), and the last assistant turn as the reference answer. TRL's `GRPOTrainer`
renders the prompt with the processor's chat template and the generation prompt, samples completions
from it with the images, and hands every other column of the row to the reward functions.

Rows are turned on read (`datasets.Dataset.with_transform`), so images are opened per batch, not held
for the whole dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

from .conversation import Conversation, text_of
from .encode import template_messages
from .prepare import Preparer
from .schema import DataError
from .sources import INDEX, Rows

# The columns of a GRPO row besides TRL's `prompt` and `images` (every one reaches the reward functions).
ANSWER = "answer"  # the reference answer (the last assistant turn)
REFERENCES = "references"  # every acceptable answer (several when the row's answer is a list)
QUESTION = "question"  # the text of the last user turn
ROW, SOURCE = "row", "source"  # where the row came from, for messages about it


def question_of(conv: Conversation) -> str:
    """The text of the prompt's last user turn: what the completion answers."""
    users = [m for m in conv.prompt_messages() if m["role"] == "user"]
    return text_of(users[-1]) if users else ""


@dataclass
class PromptRows:
    """Raw rows in, GRPO rows out (a `with_transform` function: a batch of columns to a batch of columns)."""

    preparer: Preparer
    processor: object

    def row(self, raw: dict) -> dict:
        """One raw row as TRL's conversational prompt, its images, and its reference answer."""
        conv = self.preparer.conversation(raw, raw.get(INDEX, -1))
        if not conv.answer.strip():
            column = self.preparer.schema.response_column or self.preparer.schema.messages_column
            raise DataError(f"{conv.where}, field {column!r}: no reference answer for the rewards to compare with")
        return {
            "prompt": template_messages(self.processor, conv.prompt_messages()),
            "images": self.preparer.load_images(conv),
            ANSWER: conv.answer,
            REFERENCES: [str(r) for r in conv.references],
            QUESTION: question_of(conv),
            ROW: conv.meta.get("row"),
            SOURCE: conv.meta.get("source"),
        }

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rows = [self.row(dict(zip(batch, values))) for values in zip(*batch.values())]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def prompt_rows(rows: Rows | None, preparer: Preparer, processor) -> Rows | None:
    """`rows` (checked SFT rows) as GRPO rows, turned as they are read."""
    return None if rows is None else rows.with_transform(PromptRows(preparer, processor))
