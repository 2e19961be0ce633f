"""KTO's rows: one prompt (with its images), one completion and a label, desirable or not.

Two shapes are read, detected from the columns:

- unpaired rows: ``image_path, prompt, completion, label`` (any table format; the label true/false, 1/0 or
  desirable/undesirable), or TRL's conversational form with ``prompt`` and ``completion`` as message lists;
- preference pairs, every shape `vlmtune dpo` reads (`data/preference.py`): each pair becomes two rows, its
  chosen answer desirable and its rejected one undesirable, after both sides are checked as for DPO.

A row is the prompt joined with its completion (`UnpairedSchema`, the completion read as a pair's side is),
encoded by the one encoding path, so only the completion and its end of turn are scored. KTO also scores
each prompt with another row's completion (its KL estimate, TRL's `KL_*` inputs): the collator pairs row i
with row i-1's completion within the batch, as TRL does, on the same images. The rows are read in one
seeded shuffled order (TRL's KL estimate needs a fixed order, so it reads them in sequence), so a pair's two
rows are rarely neighbours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import BatchFeature

from ..errors import DataError
from .collate import SEQUENCE_KEYS, pad_rows
from .conversation import Conversation
from .encode import IGNORE_INDEX, EncodingFacts, encode
from .preference import (
    SIDES,
    PreferenceSplits,
    SideSchema,
    _sides,
    as_conversational,
    check_sides,
    embedded_image_column,
    is_conversational,
    load_preference_rows,
)
from .prepare import Preparer
from .schema import IMAGE_COLUMNS, PROMPT_COLUMNS, _pick
from .sources import INDEX, Rows, column_names
from .validate import CheckReport

COMPLETION, LABEL = "completion", "label"
# The label spellings taken (True == 1 and False == 0 as keys, so 1/0 are taken too).
DESIRABLE = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}
DESIRABLE |= {"desirable": True, "undesirable": False}


def desirable(value, where: str, column: str = LABEL) -> bool:
    """A row's label as a bool; anything but the accepted spellings is a mistake naming the row and field."""
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, float) and key in (0.0, 1.0):
        key = int(key)
    if isinstance(key, (str, bool, int)) and key in DESIRABLE:
        return DESIRABLE[key]
    raise DataError(
        f"{where}, field {column!r}: {value!r} is not a label; use true for a desirable completion and false for "
        "an undesirable one (or 1/0, desirable/undesirable)"
    )


@dataclass
class UnpairedSchema(SideSchema):
    """One unpaired row: the prompt joined with its completion (read as a pair's side is), and its label."""

    label_column: str = LABEL

    def to_conversation(self, row: dict, index: int) -> Conversation:
        desirable(row.get(self.label_column), f"{row.get('__source__') or self.source}, row {index}", self.label_column)
        return super().to_conversation(row, index)

    @property
    def completion_column(self) -> str:
        return self.messages_column if self.kind == "messages" else self.response_column


def _unpaired_schema(side: SideSchema, completion: str, label: str, columns: list[str]) -> UnpairedSchema:
    """`side`'s schema reading `completion` as the answer and `label` as the label."""
    values = {f.name: getattr(side, f.name) for f in dataclasses.fields(side)}
    values.update(side=COMPLETION, pair_columns=(completion, label), label_column=label)
    values["messages_column" if side.kind == "messages" else "response_column"] = completion
    schema = UnpairedSchema(**values)
    schema.meta_columns = tuple(c for c in columns if c not in schema.used_columns() and not c.startswith("__"))
    return schema


def detect_unpaired_schema(data_args, first: Rows, facts: EncodingFacts, completion: str, label: str):
    """The schema of unpaired rows (`completion` and `label` columns), detected as a pair's side is."""
    columns = [c for c in column_names(first) if not c.startswith("__")]
    source = data_args.dataset_name
    prompt = _pick(columns, data_args.prompt_column, PROMPT_COLUMNS, "prompt", source)
    if prompt is None:
        raise DataError(
            f"{source}: cannot tell which column holds the prompt; columns are: {', '.join(columns)}. "
            "Name it with --prompt_column"
        )
    row = next(iter(first))
    image = data_args.image_column or data_args.dataset_image_field or embedded_image_column(row)
    side = SideSchema(
        "prompt_response",
        image_column=_pick(columns, image, IMAGE_COLUMNS, "image", source),
        prompt_column=prompt,
        response_column=completion,
        system_prompt=data_args.system_prompt,
        source=source,
    )
    sides = {COMPLETION: side}
    if is_conversational(row, prompt):
        as_conversational(sides)
    side.single_image = not facts.multi_image
    side.image_markers = (facts.image_placeholder, *facts.image_tokens)
    return _unpaired_schema(side, completion, label, columns)


def _unpair(batch: dict, chosen: str, rejected: str) -> dict:
    """A batch of pairs as twice as many unpaired rows: each pair's chosen answer (desirable), then its
    rejected one (undesirable); the other columns (image, prompt, row number, source) repeated."""
    out = {k: [v for v in values for _ in SIDES] for k, values in batch.items() if k not in (chosen, rejected)}
    out[COMPLETION] = [answer for pair in zip(batch[chosen], batch[rejected]) for answer in pair]
    out[LABEL] = [True, False] * len(batch[chosen])
    return out


@dataclass
class KtoSplits:
    """Checked unpaired train and eval rows and their `Preparer`; with pairs as input, also the eval pairs and
    their sides' preparers (for the preference accuracy before and after)."""

    train: Rows | None
    eval: Rows | None
    preparer: Preparer
    pairs: PreferenceSplits | None = None
    reports: dict[str, CheckReport] = field(default_factory=dict)

    def describe(self) -> str:
        schema = self.preparer.schema
        form = "conversational (message lists)" if schema.kind == "messages" else "table"
        origin = "preference pairs split into desirable and undesirable rows, " if self.pairs else "unpaired rows, "
        return (
            f"Detected schema: {origin}{form}: prompt {schema.prompt_column!r}, completion "
            f"{schema.completion_column!r}, label {schema.label_column!r}; image column: {schema.image_column}"
        )

    def summary(self) -> str:
        return "\n".join(report.summary() for report in self.reports.values())


def build_kto_splits(data_args, facts: EncodingFacts, processor, kto_args, seed: int = 42) -> KtoSplits:
    """Load the rows `data_args` names (unpaired, or pairs split in two), hold out eval rows when there are
    none (seeded), check every row before training as `vlmtune dpo` checks pairs, and shuffle them once."""
    sources, splits, images = load_preference_rows(data_args, seed)
    columns = column_names(sources.first())
    completion, label = kto_args.completion_column or COMPLETION, kto_args.label_column or LABEL
    chosen, rejected = kto_args.chosen_column or "chosen", kto_args.rejected_column or "rejected"
    pairs = None
    if completion in columns and label in columns:
        schema = detect_unpaired_schema(data_args, sources.first(), facts, completion, label)
        preparer = Preparer(schema=schema, facts=facts, images=images)
        checked, reports = check_sides(splits, {COMPLETION: preparer}, processor, data_args.on_bad_sample)
    elif chosen in columns and rejected in columns:
        sides = _sides(data_args, sources.first(), facts, chosen, rejected)
        preparers = {side: Preparer(schema=s, facts=facts, images=images) for side, s in sides.items()}
        checked, reports = check_sides(splits, preparers, processor, data_args.on_bad_sample)
        pairs = PreferenceSplits(checked.get("train"), checked.get("eval"), preparers, reports)
        checked = {k: _unpaired_rows(rows, *sides["chosen"].pair_columns) for k, rows in checked.items()}
        schema = _unpaired_schema(sides["chosen"], COMPLETION, LABEL, column_names(next(iter(checked.values()))))
        preparer = Preparer(schema=schema, facts=facts, images=images)
    else:
        raise DataError(
            f"{data_args.dataset_name}: KTO needs unpaired rows (columns {completion!r} and {label!r}: a completion "
            f"and whether it is desirable) or preference pairs (columns {chosen!r} and {rejected!r}); columns are: "
            f"{', '.join(c for c in columns if not c.startswith('__'))}. Name them with --completion_column and "
            "--label_column, or --chosen_column and --rejected_column"
        )
    checked = {k: rows.shuffle(seed=seed) for k, rows in checked.items()}
    return KtoSplits(checked.get("train"), checked.get("eval"), preparer, pairs, reports)


def _unpaired_rows(rows: Rows, chosen: str, rejected: str) -> Rows:
    names = dict(chosen=chosen, rejected=rejected)
    return rows.map(_unpair, batched=True, remove_columns=[chosen, rejected], fn_kwargs=names)


@dataclass
class KtoCollator:
    """Unpaired rows in, TRL's KTO batch out: each row's prompt and completion (`input_ids`, `completion_mask`
    marking the completion and its end of turn), the same prompt with the previous row's completion
    (`KL_input_ids`, `KL_completion_mask`...: KTO's KL estimate), the rows' image inputs once (a KL sequence
    has its own row's images), and `label` (True: desirable). Both sequences of a row are padded to one
    length on the right, so every per-token input (token types, Mllama's cross-attention mask) has a KL
    counterpart `KL_<name>`."""

    processor: object
    preparer: Preparer

    def _encoded(self, rows: list[dict]) -> list:
        """Each row's sequence, then each row's KL sequence (its prompt, the previous row's completion)."""
        column = self.preparer.schema.completion_column
        mismatched = [{**row, column: rows[i - 1][column]} for i, row in enumerate(rows)]
        convs = [self.preparer.conversation(row, row.get(INDEX, -1)) for row in rows]
        images = [self.preparer.load_images(conv) for conv in convs]
        facts = self.preparer.facts
        own = [encode(self.processor, conv, imgs, facts) for conv, imgs in zip(convs, images)]
        kl_convs = [self.preparer.conversation(row, row.get(INDEX, -1)) for row in mismatched]
        return own + [encode(self.processor, conv, imgs, facts) for conv, imgs in zip(kl_convs, images)]

    def __call__(self, rows: list[dict]) -> BatchFeature:
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        both = pad_rows(self._encoded(rows), pad, self.preparer.facts.row_inputs)
        mask = (both.pop("labels") != IGNORE_INDEX).long()
        batch = {key: value.chunk(2)[0] for key, value in both.items()}  # image inputs: the KL half repeats them
        batch["completion_mask"] = mask.chunk(2)[0]
        for key in ("input_ids", *SEQUENCE_KEYS):
            if key in both:
                batch[f"KL_{key}"] = both[key].chunk(2)[1]
        batch["KL_completion_mask"] = mask.chunk(2)[1]
        schema = self.preparer.schema
        where = [f"{row.get('__source__') or schema.source}, row {row.get(INDEX, -1)}" for row in rows]
        labels = [desirable(row[schema.label_column], at, schema.label_column) for row, at in zip(rows, where)]
        batch["label"] = torch.tensor(labels)
        return BatchFeature(batch)
