"""Detect a dataset's shape and turn each row into one canonical conversation.

Whatever the user's columns, every row becomes a `Conversation`: OpenAI-style messages whose content is
a list of ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` parts, the images in the order their
placeholders appear, and the remaining columns as metadata (for per-group evaluation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .conversation import Conversation, text_of  # noqa: F401 - re-exported: the hand-off type's old home

# Column names tried in order when the user does not name them.
IMAGE_COLUMNS = ("image_path", "image", "images", "img", "image_url", "file_name")
PROMPT_COLUMNS = ("prompt", "question", "query", "instruction", "input")
RESPONSE_COLUMNS = ("response", "answer", "label", "output", "answers", "target")
MESSAGES_COLUMNS = ("messages", "conversations", "conversation")
# ShareGPT-style role names, mapped to OpenAI's.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
SCALARS = (str, int, float, bool)


# Where LLaVA-format data marks an image inside the text.
IMAGE_LITERAL = "<image>"


@dataclass
class Context:
    """External knowledge joined by key (the VizSage workflow), e.g. a painting's description.

    The matched text goes before the first user turn's text as a ``Context: ...`` line, so the question
    stays last, next to the answer; when a sample is too long, prompt shortening removes context first.
    """

    table: dict[str, str]
    data_column: str
    file: str

    def lookup(self, value: Any) -> str | None:
        """The text for `value`, matched exactly or, for file paths, by file name."""
        if value is None:
            return None
        key = str(value)
        return self.table.get(key) or self.table.get(Path(key).name)


def _as_text(value: Any, name: str, where: str) -> str:
    """`value` as non-empty text; numbers are fine (answers like 42), structures are not.

    Text files arrive as the exact text written (see `sources`); a typed boolean (JSON, Parquet) is
    written the JSON way, `true`/`false`, not Python's `True`.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}, field {name!r}: empty (a required field; fill it in or drop the row)")
    if not isinstance(value, SCALARS):
        raise DataError(f"{where}, field {name!r}: expected text, got {type(value).__name__}")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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
    meta_columns: tuple[str, ...] = ()
    context: Context | None = None
    # A single-image family takes the first of several images given for one placeholder (fms-hf-tuning's rule).
    single_image: bool = False
    # The model's own image placeholder tokens (from its family): typed into the text, one would stand for
    # an image that is not there, so a row whose text holds one is refused, naming the field and the text.
    image_markers: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "messages":
            text = f"Detected schema: messages ({self.messages_column}); image column: {self.image_column}"
        else:
            text = (
                f"Detected schema: prompt/response ({self.prompt_column}/{self.response_column}); "
                f"image column: {self.image_column}"
            )
        if self.meta_columns:
            text += f"; kept as metadata: {', '.join(self.meta_columns)}"
        if self.context:
            text += f"; context from {self.context.file} joined on {self.context.data_column}"
        return text

    def used_columns(self) -> set[str]:
        cols = (self.image_column, self.prompt_column, self.response_column, self.messages_column)
        return {c for c in cols if c}

    def to_conversation(self, row: dict, index: int) -> Conversation:
        """Turn one raw row into a `Conversation`, or raise `DataError` naming the file, row and field."""
        source = row.get("__source__") or self.source
        where = f"{source}, row {index}"
        if self.kind == "messages":
            conv = self._from_messages(row, where)
        else:
            conv = self._from_prompt_response(row, where)
        used = self.used_columns()
        conv.meta.update({k: v for k, v in row.items() if k not in used and not k.startswith("__")})
        conv.meta.update(row=index, source=source)
        if self.context:
            add_context(conv, self.context.lookup(row.get(self.context.data_column)))
        if self.system_prompt and conv.messages[0]["role"] != "system":
            conv.messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return conv

    def _refuse_markers(self, text: str, where: str, fix: str) -> None:
        """Refuse `text` holding one of the model's image tokens; `fix` says what to do instead."""
        marker = next((m for m in self.image_markers if m and m in text), None)
        if marker:
            raise DataError(
                f"{where}: the text contains {marker!r}, one of the model's image placeholder tokens; "
                f"remove {marker!r} {fix}"
            )

    def _images(self, row: dict, where: str, required: bool = True) -> list[Any]:
        """The row's images; `required` False lets conversations be text-only (placeholders still checked)."""
        if not self.image_column:
            return []
        value = row.get(self.image_column)
        if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value):
            if not required:
                return []
            raise DataError(f"{where}, field {self.image_column!r}: empty (expected an image)")
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def _from_prompt_response(self, row: dict, where: str) -> Conversation:
        response = row.get(self.response_column)
        references = None
        if isinstance(response, (list, tuple)):  # e.g. ChartQA's `label`: several acceptable answers
            references = [_as_text(r, self.response_column, where) for r in response]
            response = references[0] if references else None
        prompt = _as_text(row.get(self.prompt_column), self.prompt_column, where)
        response = _as_text(response, self.response_column, where)
        fix = "from it"
        if self.image_column:
            fix += f": vlmtune puts in the token for the image of field {self.image_column!r} itself"
        self._refuse_markers(prompt, f"{where}, field {self.prompt_column!r}", fix)
        self._refuse_markers(response, f"{where}, field {self.response_column!r}", "from it")
        images = self._images(row, where)
        user = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": response}]},
        ]
        meta = {"references": references} if references else {}
        return Conversation(messages=messages, images=images, meta=meta)

    def _from_messages(self, row: dict, where: str) -> Conversation:
        name = self.messages_column
        raw = row.get(name)
        if isinstance(raw, str) and raw.lstrip().startswith("["):  # messages stored as JSON text (CSV)
            try:
                raw = json.loads(raw, parse_float=str, parse_int=str, parse_constant=str)  # numbers as written
            except json.JSONDecodeError as err:
                raise DataError(f"{where}, field {name!r}: not valid JSON: {err}") from err
        if not isinstance(raw, (list, tuple)) or not raw:
            raise DataError(f"{where}, field {name!r}: must be a non-empty list of messages")
        messages, inline_images = [], []
        for turn, message in enumerate(raw):
            messages.append(_message(message, f"{where}, field {name!r}, message {turn}", inline_images))
        if messages[-1]["role"] != "assistant" or not text_of(messages[-1]).strip():
            raise DataError(f"{where}, field {name!r}: the last message must be a non-empty assistant turn")
        images = inline_images + self._images(row, where, required=False)
        placeholders = sum(p["type"] == "image" for m in messages for p in m["content"])
        if placeholders == 0:
            placeholders = _split_image_literals(messages)
        if placeholders == 0 and images:
            _put_images_first(messages, len(images))
        elif placeholders != len(images) and not (self.single_image and placeholders == 1):
            raise DataError(
                f"{where}, field {name!r}: {placeholders} image placeholder(s) but {len(images)} image(s); "
                f"give each image one placeholder ({IMAGE_LITERAL} in the text, or an image part), in order"
            )
        for turn, message in enumerate(messages):
            self._refuse_markers(
                text_of(message),
                f"{where}, field {name!r}, message {turn}",
                f"from the text (mark each image with an image part, or {IMAGE_LITERAL} in conversations without them)",
            )
        return Conversation(messages=messages, images=images)


def _message(message: Any, where: str, inline_images: list) -> dict:
    """One OpenAI- (or ShareGPT-) style message as ``{role, content: [parts]}``; inline images collected."""
    if not isinstance(message, dict):
        raise DataError(f"{where}: expected a {{role, content}} object, got {type(message).__name__}")
    role = ROLES.get(message.get("role") or message.get("from") or "")
    if role is None:
        raise DataError(f"{where}: role {message.get('role') or message.get('from')!r} is not system/user/assistant")
    content = message.get("content", message.get("value"))
    if isinstance(content, str):
        return {"role": role, "content": [{"type": "text", "text": content}]}
    if not isinstance(content, (list, tuple)):
        raise DataError(f"{where}: content must be text or a list of parts, got {type(content).__name__}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text") or ""})
        elif kind in ("image", "image_url"):
            ref = part.get("image") or part.get("image_url")
            if isinstance(ref, dict) and "url" in ref:  # OpenAI: {"image_url": {"url": ...}}
                ref = ref["url"]
            if ref is not None:
                inline_images.append(ref)
            parts.append({"type": "image"})
        else:
            raise DataError(f"{where}: content part {part!r:.80} is not a text or image part")
    return {"role": role, "content": parts}


def _split_image_literals(messages: list[dict]) -> int:
    """Turn each literal ``<image>`` in message text (LLaVA's own data format, ``"<image>\nWhat is..."``)
    into an image placeholder, dropping one newline right after it; return how many there were.

    Left in the text, the literal would reach the tokenizer as the image token itself, and the count of
    image tokens would no longer match the images.
    """
    found = 0
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] != "text" or IMAGE_LITERAL not in part["text"]:
                parts.append(part)
                continue
            pieces = part["text"].split(IMAGE_LITERAL)
            for i, piece in enumerate(pieces):
                if i > 0:
                    parts.append({"type": "image"})
                    found += 1
                    piece = piece.removeprefix("\n")
                if piece:
                    parts.append({"type": "text", "text": piece})
        message["content"] = parts
    return found


def _put_images_first(messages: list[dict], n: int) -> None:
    """Images given beside messages that have no placeholders go before the first user text."""
    first_user = next(m for m in messages if m["role"] == "user")
    first_user["content"] = [{"type": "image"} for _ in range(n)] + first_user["content"]


def add_context(conv: Conversation, context: str | None) -> None:
    """Put ``Context: <text>`` on its own line before the first user turn's text."""
    if not context:
        return
    user = next(m for m in conv.messages if m["role"] == "user")
    line = {"type": "text", "text": f"Context: {context}\n"}
    texts = [i for i, p in enumerate(user["content"]) if p["type"] == "text"]
    at = texts[0] if texts else len(user["content"])
    user["content"] = user["content"][:at] + [line] + user["content"][at:]
    conv.meta["context"] = True


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
    columns = [c for c in columns if not c.startswith("__")]
    messages = _pick(columns, messages_column, MESSAGES_COLUMNS, "messages", source)
    image = _pick(columns, image_column, IMAGE_COLUMNS, "image", source)
    if messages:
        schema = Schema("messages", image_column=image, messages_column=messages)
    else:
        prompt = _pick(columns, prompt_column, PROMPT_COLUMNS, "prompt", source)
        response = _pick(columns, response_column, RESPONSE_COLUMNS, "response", source)
        if not (prompt and response):
            raise DataError(
                f"{source}: cannot tell which columns hold the prompt and the answer; columns are: "
                f"{', '.join(columns)}. Name them with --prompt_column/--response_column (and --image_column), "
                f"or provide a {'/'.join(MESSAGES_COLUMNS)} column (--dataset_text_field)."
            )
        schema = Schema("prompt_response", image_column=image, prompt_column=prompt, response_column=response)
    schema.system_prompt, schema.source = system_prompt, source
    schema.meta_columns = tuple(c for c in columns if c not in schema.used_columns())
    return schema


def cut_prompt(conv: Conversation, n_chars: int) -> Conversation:
    """Remove the first `n_chars` characters of user text (turn by turn), leaving images and answers intact.

    This is how over-long samples are shortened: from the start of the prompt, where context and
    earlier turns sit, keeping the question that the answer follows.
    """
    messages, left = [], n_chars
    for message in conv.messages:
        parts = []
        for part in message["content"]:
            if left and message["role"] == "user" and part["type"] == "text":
                cut = min(left, len(part["text"]))
                part, left = {**part, "text": part["text"][cut:]}, left - cut
            parts.append(part)
        messages.append({**message, "content": parts})
    return Conversation(messages=messages, images=conv.images, meta={**conv.meta, "shortened_chars": n_chars})


def user_text(conv: Conversation) -> str:
    """All user text in order: what `cut_prompt` cuts from."""
    return "".join(p["text"] for m in conv.messages if m["role"] == "user" for p in m["content"] if p["type"] == "text")
