"""The hand-off type between reading data and encoding it: one example as a conversation.

Whatever the user's columns, every row becomes a `Conversation`: OpenAI-style messages whose content is
a list of ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` parts, the images in the order their
placeholders appear, and the remaining columns as metadata (for per-group evaluation and for error
messages: ``meta["source"]`` and ``meta["row"]`` name where the example came from).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Conversation:
    """One training or evaluation example, independent of where it came from."""

    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def references(self) -> list[str]:
        """All acceptable answers for the last assistant turn (several when a `label` is a list)."""
        return self.meta.get("references") or [self.answer]

    @property
    def answer(self) -> str:
        """Text of the last assistant turn."""
        return text_of(self.messages[-1]) if self.messages and self.messages[-1]["role"] == "assistant" else ""

    @property
    def where(self) -> str:
        """File and row, for error messages."""
        return f"{self.meta.get('source', 'dataset')}, row {self.meta.get('row')}"

    def prompt_messages(self) -> list[dict]:
        """The conversation up to (not including) the last assistant turn: what generation starts from."""
        return self.messages[:-1] if self.messages and self.messages[-1]["role"] == "assistant" else self.messages


def text_of(message: dict) -> str:
    """Concatenated text parts of one message."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")
