"""Conversation → model inputs with labels on the assistant's tokens only.

Where the assistant's turns lie is read off the model's own chat template, not per-family strings:
rendering the conversation up to turn k with the generation prompt, and again through turn k, brackets
turn k's answer in the rendered text. The processor then tokenises the text with the images (expanding
each image placeholder to however many tokens that image needs), and a sequence alignment between the
plain tokenisation (placeholders unexpanded, character offsets known) and the processor's ids carries the
character spans over to token positions. Everything else (system text, prompts, image tokens, padding)
gets the label -100.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import DataError

IGNORE_INDEX = -100


class TemplateError(DataError):
    """The chat template renders a conversation in a way vlmtune cannot split into turns."""


@dataclass
class Rendered:
    """A conversation as chat-template text, with the character spans that are trained."""

    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool


def _render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ends_turn(processor, text: str) -> bool:
    """True when `text` ends with a special token (an end-of-turn marker such as ``<|im_end|>``)."""
    tokenizer = processor.tokenizer
    return any(text.endswith(tok) for tok in tokenizer.all_special_tokens if tok)


def _assistant_spans(processor, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn in `full`, from the end of its generation prompt to
    the end of the turn (end-of-turn token included, trailing whitespace excluded)."""
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if k == 0:
            raise TemplateError("a conversation cannot start with an assistant turn")
        before = _render(processor, messages[:k], add_generation_prompt=True)
        through = _render(processor, messages[: k + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                f"the chat template does not render turn {k} as a prefix of the whole conversation; "
                "cannot locate the assistant's answer"
            )
        spans.append((len(before), len(through.rstrip())))
    return spans


def render_conversation(processor, messages: list[dict], train_on_prompt: bool = False) -> Rendered:
    """Render `messages` with the chat template and find the character spans to train on.

    A template that closes assistant turns with no special token (LLaVA-1.5's) gets the tokenizer's
    EOS appended inside each span, so the model learns to stop. With `train_on_prompt` everything but
    trailing whitespace is trained.
    """
    full = _render(processor, messages)
    eos = processor.tokenizer.eos_token or ""
    pieces, spans, cursor, shift = [], [], 0, 0
    for start, end in _assistant_spans(processor, messages, full):
        added = "" if _ends_turn(processor, full[start:end]) else eos
        pieces += [full[cursor:end], added]
        spans.append((start + shift, end + shift + len(added)))
        shift, cursor = shift + len(added), end
    text = "".join(pieces) + full[cursor:]
    if train_on_prompt:
        spans = [(0, len(text.rstrip()))]
    bos = processor.tokenizer.bos_token
    return Rendered(text=text, spans=spans, add_special_tokens=not (bos and text.startswith(bos)))


def label_ids(processor, rendered: Rendered, input_ids: list[int]) -> list[int]:
    """Labels for the processor's `input_ids` of `rendered.text`: ids inside the spans, -100 elsewhere.

    The plain tokenisation (image placeholders unexpanded) has character offsets; the processor's ids
    differ from it only where image placeholders were expanded. Matching blocks of the two sequences map
    each plain token to its position in `input_ids`; a trained token without a match is an error, never
    a silent mislabel.
    """
    plain = processor.tokenizer(
        rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True
    )
    plain_ids, offsets = plain["input_ids"], plain["offset_mapping"]
    position: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(None, plain_ids, input_ids, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        for i in range(size):
            position[a + i] = b + i
    labels = [IGNORE_INDEX] * len(input_ids)
    never = _image_token_ids(processor)
    for i, (start, end) in enumerate(offsets):
        if end <= start or not any(s <= start < e for s, e in rendered.spans):
            continue
        if i not in position:
            raise TemplateError(
                f"token {processor.tokenizer.convert_ids_to_tokens(plain_ids[i])!r} of an assistant turn "
                "could not be found in the processor's output"
            )
        if input_ids[position[i]] not in never:
            labels[position[i]] = input_ids[position[i]]
    return labels


def _image_token_ids(processor) -> set[int]:
    """Ids of the processor's image placeholder tokens: inputs, never targets."""
    tokens = [getattr(processor, name, None) for name in ("image_token", "boi_token", "eoi_token")]
    ids = {processor.tokenizer.convert_tokens_to_ids(t) for t in tokens if isinstance(t, str)}
    return ids - {processor.tokenizer.unk_token_id, None}
