"""Detect a dataset's shape and turn each row into one canonical conversation.

Whatever the user's columns, every row becomes a `Conversation`: OpenAI-style messages whose content is
a list of ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` parts, the images in the order their
placeholders appear, and the remaining columns as metadata (for per-group evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Column names tried in order when the user does not name them.
IMAGE_COLUMNS = ("image_path", "image", "images", "img", "image_url", "file_name")
PROMPT_COLUMNS = ("prompt", "question", "query", "instruction", "input")
RESPONSE_COLUMNS = ("response", "answer", "label", "output", "answers", "target")
MESSAGES_COLUMNS = ("messages", "conversations", "conversation")


class DataError(ValueError):
    """Bad input data; the message names the file, row and field."""


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

    def prompt_messages(self) -> list[dict]:
        """The conversation up to (not including) the last assistant turn: what generation starts from."""
        return self.messages[:-1] if self.messages and self.messages[-1]["role"] == "assistant" else self.messages


def text_of(message: dict) -> str:
    """Concatenated text parts of one message."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


@dataclass
class Schema:
    """Which columns hold what. `kind` is "prompt_response" or "messages"."""

    kind: str
    image_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    system_prompt: str | None = None
    source: str = "dataset"

    def describe(self) -> str:
        if self.kind == "messages":
            return f"Detected schema: messages ({self.messages_column}); image column: {self.image_column}"
        return (
            f"Detected schema: prompt/response ({self.prompt_column}/{self.response_column}); "
            f"image column: {self.image_column}"
        )

    def used_columns(self) -> set[str]:
        cols = (self.image_column, self.prompt_column, self.response_column, self.messages_column)
        return {c for c in cols if c}

    def to_conversation(self, row: dict, index: int) -> Conversation:
        """Turn one raw row into a `Conversation`, or raise `DataError` naming the row and field."""
        where = f"{self.source}, row {index}"
        if self.kind == "messages":
            conv = self._from_messages(row, where)
        else:
            conv = self._from_prompt_response(row, where)
        conv.meta.update({k: v for k, v in row.items() if k not in self.used_columns()})
        conv.meta.setdefault("row", index)
        if self.system_prompt and conv.messages[0]["role"] != "system":
            conv.messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return conv

    def _images(self, row: dict, where: str) -> list[Any]:
        if not self.image_column:
            return []
        value = row.get(self.image_column)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: field {self.image_column!r} is empty (expected an image)")
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def _from_prompt_response(self, row: dict, where: str) -> Conversation:
        prompt = row.get(self.prompt_column)
        response = row.get(self.response_column)
        references = None
        if isinstance(response, (list, tuple)):  # e.g. ChartQA's `label`: several acceptable answers
            references = [str(r) for r in response]
            response = references[0] if references else None
        for name, value in ((self.prompt_column, prompt), (self.response_column, response)):
            if value is None or not str(value).strip():
                raise DataError(f"{where}: field {name!r} is empty")
        images = self._images(row, where)
        user = [{"type": "image"} for _ in images] + [{"type": "text", "text": str(prompt)}]
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": str(response)}]},
        ]
        meta = {"references": references} if references else {}
        return Conversation(messages=messages, images=images, meta=meta)

    def _from_messages(self, row: dict, where: str) -> Conversation:
        raw = row.get(self.messages_column)
        if not isinstance(raw, (list, tuple)) or not raw:
            raise DataError(f"{where}: field {self.messages_column!r} must be a non-empty list of messages")
        column_images = self._images(row, where) if self.image_column else []
        messages, inline_images = [], []
        for turn, message in enumerate(raw):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("system", "user", "assistant"):
                raise DataError(f"{where}: {self.messages_column}[{turn}] has role {role!r}")
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
            for part in content if isinstance(content, (list, tuple)) else []:
                kind = part.get("type")
                if kind == "text":
                    parts.append({"type": "text", "text": part.get("text") or ""})
                elif kind in ("image", "image_url"):
                    ref = part.get("image") or part.get("image_url")
                    if isinstance(ref, dict):  # OpenAI: {"image_url": {"url": ...}}
                        ref = ref.get("url")
                    if ref is not None:
                        inline_images.append(ref)
                    parts.append({"type": "image"})
            messages.append({"role": role, "content": parts})
        if messages[-1]["role"] != "assistant" or not text_of(messages[-1]).strip():
            raise DataError(f"{where}: the last message of {self.messages_column!r} must be a non-empty assistant turn")
        images = inline_images + column_images
        placeholders = sum(p["type"] == "image" for m in messages for p in m["content"])
        if placeholders != len(images):
            raise DataError(
                f"{where}: {placeholders} image placeholder(s) in {self.messages_column!r} but {len(images)} image(s)"
            )
        return Conversation(messages=messages, images=images)


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: str) -> str | None:
    if wanted:
        if wanted not in columns:
            raise DataError(f"{source}: {what} column {wanted!r} not found; columns are: {', '.join(columns)}")
        return wanted
    return next((c for c in candidates if c in columns), None)


def detect_schema(
    columns: list[str],
    source: str = "dataset",
    image_column: str | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    messages_column: str | None = None,
    system_prompt: str | None = None,
) -> Schema:
    """Work out which columns hold the image, prompt and answer (or messages); names override guesses."""
    columns = list(columns)
    messages = _pick(columns, messages_column, MESSAGES_COLUMNS, "messages", source)
    image = _pick(columns, image_column, IMAGE_COLUMNS, "image", source)
    if messages:
        return Schema(
            "messages", image_column=image, messages_column=messages, system_prompt=system_prompt, source=source
        )
    prompt = _pick(columns, prompt_column, PROMPT_COLUMNS, "prompt", source)
    response = _pick(columns, response_column, RESPONSE_COLUMNS, "response", source)
    if not (prompt and response):
        raise DataError(
            f"{source}: cannot tell which columns hold the prompt and the answer; columns are: "
            f"{', '.join(columns)}. Name them with --prompt_column/--response_column (and --image_column), "
            f"or provide a {'/'.join(MESSAGES_COLUMNS)} column."
        )
    return Schema(
        "prompt_response",
        image_column=image,
        prompt_column=prompt,
        response_column=response,
        system_prompt=system_prompt,
        source=source,
    )
