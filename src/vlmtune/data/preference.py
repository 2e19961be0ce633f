"""Preference pairs: one prompt (with its images), a chosen and a rejected answer, as two conversations.

Two shapes are read, detected from the columns:

- a table: ``image_path, prompt, chosen, rejected`` (CSV/TSV/JSON/JSONL/Parquet; the image and prompt
  columns detected or named as for `vlmtune train`, e.g. RLAIF-V's ``image, question, chosen, rejected``);
- TRL's conversational form: ``images``, and ``prompt`` / ``chosen`` / ``rejected`` as message lists
  (the prompt's user turn holds the image parts; chosen and rejected hold one assistant turn each).

Each side is a `Schema` of its own (`side_schema`), so a pair is the prompt joined with the chosen answer
and the same prompt joined with the rejected one: both encode through the one encoding path with the same
prompt text and images, and every error names the file, the row and the field (``prompt``, ``chosen``...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from PIL import Image
from transformers import BatchFeature

from ..errors import DataError
from .collate import pad_rows
from .conversation import Conversation
from .encode import IGNORE_INDEX, Encoded, EncodingFacts, encode
from .images import ImageOptions
from .prepare import LENGTH, Preparer
from .schema import IMAGE_COLUMNS, IMAGE_LITERAL, PROMPT_COLUMNS, ROLES, Schema, _message, _pick
from .sources import INDEX, Rows, column_names, load_sources
from .splits import _hold_out, _image_root, _limit
from .validate import Checker, CheckReport, check_rows

SIDES = ("chosen", "rejected")


def _messages(value, where: str, name: str, answer: bool) -> list:
    """A message list (JSON text from a CSV cell is parsed); an `answer` given as plain text is one
    assistant turn."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value, parse_float=str, parse_int=str, parse_constant=str)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}, field {name!r}: not valid JSON: {err}") from err
    if isinstance(value, str) and answer and value.strip():
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}, field {name!r}: must be a non-empty list of messages")
    for turn, message in enumerate(value):
        _message(message, f"{where}, field {name!r}, message {turn}", [])  # its own field named in errors
    return list(value)


@dataclass
class SideSchema(Schema):
    """The schema of one side of a pair: the conversation is the prompt plus this side's answer.

    A table reads `response_column` (the side's column) as the answer; the conversational form joins the
    `prompt_column` messages with the side's messages (held in `messages_column`)."""

    side: str = "chosen"
    pair_columns: tuple[str, ...] = ()

    def to_conversation(self, row: dict, index: int) -> Conversation:
        if self.kind == "messages":
            where = f"{row.get('__source__') or self.source}, row {index}"
            prompt = _messages(row.get(self.prompt_column), where, self.prompt_column, answer=False)
            if ROLES.get(prompt[-1].get("role") or prompt[-1].get("from") or "") == "assistant":
                raise DataError(
                    f"{where}, field {self.prompt_column!r}: ends with an assistant turn; the prompt holds the "
                    f"turns before the answer, and {', '.join(SIDES)} the answers"
                )
            answer = _messages(row.get(self.messages_column), where, self.messages_column, answer=True)
            row = {**row, self.messages_column: prompt + answer}
        elif IMAGE_LITERAL in str(row.get(self.prompt_column) or ""):
            return self._with_image_literals(row, index)
        return super().to_conversation(row, index)

    def _with_image_literals(self, row: dict, index: int) -> Conversation:
        """A text prompt with ``<image>`` typed in it (LLaVA-RLHF's pairs) read as ShareGPT rows are: each
        ``<image>`` is where one of the row's images goes, and the counts must agree."""
        turns = [{"role": "user", "content": row[self.prompt_column]}]
        turns.append({"role": "assistant", "content": row.get(self.response_column)})
        as_messages = dataclasses.replace(self, kind="messages", messages_column=self.prompt_column)
        return Schema.to_conversation(as_messages, {**row, self.prompt_column: turns}, index)

    def used_columns(self) -> set[str]:
        return super().used_columns() | {self.prompt_column} | set(self.pair_columns)


def _column(columns: list[str], wanted: str | None, default: str, source: str) -> str:
    name = wanted or default
    if name not in columns:
        flag = f"--{default}_column"
        raise DataError(
            f"{source}: no {default} column {name!r}; columns are: {', '.join(columns)}. A preference dataset needs "
            f"a prompt, a chosen and a rejected answer (name the columns with --prompt_column, {flag}...)"
        )
    return name


def detect_preference_schema(
    columns: list[str],
    source: str,
    image_column: str | None = None,
    prompt_column: str | None = None,
    chosen_column: str | None = None,
    rejected_column: str | None = None,
    system_prompt: str | None = None,
) -> dict[str, SideSchema]:
    """The chosen and the rejected side's schema, from the columns (names given override the guesses).

    The form is conversational when the first row's prompt is a message list (`conversational`)."""
    columns = [c for c in columns if not c.startswith("__")]
    chosen = _column(columns, chosen_column, "chosen", source)
    rejected = _column(columns, rejected_column, "rejected", source)
    prompt = _pick(columns, prompt_column, PROMPT_COLUMNS, "prompt", source)
    if prompt is None:
        raise DataError(
            f"{source}: cannot tell which column holds the prompt; columns are: {', '.join(columns)}. "
            "Name it with --prompt_column"
        )
    image = _pick(columns, image_column, IMAGE_COLUMNS, "image", source)
    sides = {}
    for side, column in (("chosen", chosen), ("rejected", rejected)):
        schema = SideSchema(
            "prompt_response",
            image_column=image,
            prompt_column=prompt,
            response_column=column,
            system_prompt=system_prompt,
            source=source,
            side=side,
            pair_columns=(chosen, rejected),
        )
        schema.meta_columns = tuple(c for c in columns if c not in schema.used_columns())
        sides[side] = schema
    return sides


def as_conversational(sides: dict[str, SideSchema]) -> None:
    """Switch both sides to TRL's conversational form (prompt and answers as message lists)."""
    for schema in sides.values():
        schema.kind, schema.messages_column, schema.response_column = "messages", schema.response_column, None


def is_conversational(first_row: dict, prompt_column: str) -> bool:
    """Whether the prompt is a message list (TRL's conversational form) rather than text."""
    value = first_row.get(prompt_column)
    if isinstance(value, str):
        return value.lstrip().startswith("[")
    return isinstance(value, (list, tuple))


@dataclass
class PreferenceSplits:
    """Checked train and eval pairs, and the `Preparer` of each side (same images, own answer)."""

    train: Rows | None
    eval: Rows | None
    preparers: dict[str, Preparer]
    reports: dict[str, CheckReport] = field(default_factory=dict)

    def describe(self) -> str:
        schema = self.preparers["chosen"].schema
        form = "conversational (message lists)" if schema.kind == "messages" else "table"
        answers = "/".join(schema.pair_columns)
        return (
            f"Detected schema: preference pairs, {form}: prompt {schema.prompt_column!r}, answers {answers}; "
            f"image column: {schema.image_column}"
        )

    def summary(self) -> str:
        return "\n".join(report.summary() for report in self.reports.values())


def embedded_image_column(first_row: dict) -> str | None:
    """The first image column whose value is the picture itself (bytes, datasets' ``{bytes, path}`` struct, a
    PIL image): RLAIF-V rows carry both ``image`` (the picture) and ``image_path`` (a path in its authors'
    tree, absent here), and the picture is the one to read."""
    for name in IMAGE_COLUMNS:
        value = first_row.get(name)
        if isinstance(value, (bytes, Image.Image)) or (isinstance(value, dict) and value.get("bytes")):
            return name
    return None


def _sides(data_args, rows: Rows, facts: EncodingFacts, chosen: str | None, rejected: str | None):
    first = next(iter(rows))
    sides = detect_preference_schema(
        column_names(rows),
        data_args.dataset_name,
        image_column=data_args.image_column or data_args.dataset_image_field or embedded_image_column(first),
        prompt_column=data_args.prompt_column,
        chosen_column=chosen,
        rejected_column=rejected,
        system_prompt=data_args.system_prompt,
    )
    if is_conversational(first, sides["chosen"].prompt_column):
        as_conversational(sides)
    for schema in sides.values():
        schema.single_image = not facts.multi_image
        schema.image_markers = (facts.image_placeholder, *facts.image_tokens)
    return sides


def load_preference_rows(data_args, seed: int):
    """The sources `data_args` names, the train and eval rows (eval held out when there is none, seeded),
    with the sample limits applied, and the image options: what pairs and unpaired rows share."""
    sources = load_sources(
        data_args.dataset_name,
        eval_dataset=data_args.eval_dataset_name,
        train_split=data_args.train_split,
        eval_split=data_args.eval_split,
        config=data_args.dataset_config,
    )
    train, eval_rows = _hold_out(sources.train, sources.eval, data_args, seed)
    train = _limit(train, data_args.max_train_samples)
    eval_rows = _limit(eval_rows, data_args.max_eval_samples)
    root = _image_root(data_args)
    images = ImageOptions(root, data_args.image_max_pixels, data_args.image_min_pixels, sources.folders)
    return sources, {"train": train, "eval": eval_rows}, images


def check_sides(splits: dict, preparers: dict[str, Preparer], processor, on_bad_sample: str):
    """Every row of each split checked through every side's preparer (a row is kept when all its sides are),
    each mistake naming file, row and field; the checked rows and the reports."""
    checked, reports = {}, {}
    for split, rows in splits.items():
        if rows is None:
            continue
        for side, preparer in preparers.items():
            checker = Checker(preparer, processor, None, on_bad_sample)
            if LENGTH in rows.column_names:  # the first side's token counts; the second side measures its own
                rows = rows.remove_columns(LENGTH)
            rows, reports[f"{split} ({side})"] = check_rows(rows, checker, f"{split} ({side})")
        checked[split] = rows
    return checked, reports


def build_preference_splits(
    data_args, facts: EncodingFacts, processor, chosen_column=None, rejected_column=None, seed: int = 42
) -> PreferenceSplits:
    """Load the pairs `data_args` names, hold out eval pairs when there are none (seeded), apply the sample
    limits and check every pair's both sides before training (template, images, placeholders), each
    mistake naming file, row and field (or, with ``--on_bad_sample skip``, the pair dropped)."""
    sources, splits, images = load_preference_rows(data_args, seed)
    sides = _sides(data_args, sources.first(), facts, chosen_column, rejected_column)
    preparers = {side: Preparer(schema=schema, facts=facts, images=images) for side, schema in sides.items()}
    checked, reports = check_sides(splits, preparers, processor, data_args.on_bad_sample)
    return PreferenceSplits(checked.get("train"), checked.get("eval"), preparers, reports)


@dataclass
class PreferenceCollator:
    """Pairs in, TRL's preference batch out: the chosen sequences, then the rejected ones, each encoded by
    the one encoding path, with `completion_mask` marking the trained tokens (the answer and its end of
    turn; never the system text, the prompt or image tokens).

    A pair's images are loaded once and go to the processor for both sides, so everything the processor
    returns per image (pixel values, grids, token types) is there for the chosen and the rejected sequence
    alike. Padding is on the right, as everywhere in vlmtune."""

    processor: object
    preparers: dict[str, Preparer]

    def encode_pair(self, row: dict) -> tuple[Encoded, Encoded]:
        """One pair's chosen and rejected sequences (same prompt, same image inputs)."""
        index = row.get(INDEX, -1)
        chosen, rejected = (self.preparers[side].conversation(row, index) for side in SIDES)
        images = self.preparers["chosen"].load_images(chosen)
        facts = self.preparers["chosen"].facts
        return encode(self.processor, chosen, images, facts), encode(self.processor, rejected, images, facts)

    def __call__(self, rows: list[dict]) -> BatchFeature:
        pairs = [self.encode_pair(row) for row in rows]
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        row_inputs = self.preparers["chosen"].facts.row_inputs
        batch = pad_rows([c for c, _ in pairs] + [r for _, r in pairs], pad, row_inputs)
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        return BatchFeature(batch)
