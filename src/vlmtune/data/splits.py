"""From `DataArguments` to checked train, eval and test rows plus the `Preparer` that reads them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from .context import load_context
from .encode import EncodingFacts
from .images import ImageOptions
from .prepare import Preparer
from .schema import DataError, Schema, detect_schema
from .sources import Rows, column_names, load_sources
from .validate import Checker, CheckReport, check_rows

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    train: Rows | None
    eval: Rows | None
    preparer: Preparer
    test: Rows | None = None
    reports: dict[str, CheckReport] = field(default_factory=dict)

    @property
    def schema(self) -> Schema:
        return self.preparer.schema

    def summary(self) -> str:
        """One paragraph per checked split (for streaming data, counts so far)."""
        return "\n".join(report.summary() for report in self.reports.values())


def _hold_out(train: Rows | None, eval_rows: Rows | None, data_args, seed: int) -> tuple[Rows | None, Rows | None]:
    """Split validation rows off the training rows when the data has none (seeded)."""
    if eval_rows is not None or train is None or data_args.val_split_ratio <= 0:
        return train, eval_rows
    if isinstance(train, datasets.IterableDataset):
        if not data_args.max_eval_samples:
            logger.info("Streaming data without a validation split: pass --max_eval_samples N to hold out N rows.")
            return train, None
        n = data_args.max_eval_samples
        return train.skip(n), train.take(n)
    if len(train) < 2:
        return train, None
    parts = train.train_test_split(test_size=data_args.val_split_ratio, seed=seed)
    logger.info("No validation split: held out %d of %d rows (seed %d).", len(parts["test"]), len(train), seed)
    return parts["train"], parts["test"]


def _limit(rows: Rows | None, n: int | None) -> Rows | None:
    if rows is None or not n:
        return rows
    if isinstance(rows, datasets.IterableDataset):
        return rows.take(n)
    return rows.select(range(min(n, len(rows))))


def _image_root(data_args) -> tuple[Path, ...]:
    """`--image_root` as the first folder relative image paths are tried in; a mistyped one is said up
    front, not as every row's missing image."""
    if not data_args.image_root:
        return ()
    root = Path(data_args.image_root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "no such folder"
        raise DataError(
            f"--image_root {data_args.image_root}: {what}; give the folder that the data's relative image "
            "paths start from, or leave the flag out to resolve them against each data file's folder"
        )
    return (root,)


def _schema(data_args, rows: Rows, facts: EncodingFacts) -> Schema:
    """The schema read from `rows`' columns, fitted to what the model family takes."""
    columns = column_names(rows)
    schema = detect_schema(
        columns,
        source=data_args.dataset_name,
        image_column=data_args.image_column or data_args.dataset_image_field,
        prompt_column=data_args.prompt_column,
        response_column=data_args.response_column,
        messages_column=data_args.dataset_text_field,
        system_prompt=data_args.system_prompt,
    )
    if data_args.context_file:
        schema.context = load_context(data_args.context_file, data_args.context_join_on, data_args.context_column)
        if schema.context.data_column not in columns:
            raise DataError(
                f"{data_args.dataset_name}: --context_join_on column {schema.context.data_column!r} not found; "
                f"columns are: {', '.join(c for c in columns if not c.startswith('__'))}"
            )
    schema.single_image = not facts.multi_image
    schema.image_markers = (facts.image_placeholder, *facts.image_tokens)
    return schema


def build_splits(
    data_args, facts: EncodingFacts, seed: int = 42, need_train: bool = True, processor=None
) -> Splits:
    """Load the named splits, hold out validation rows when there are none, apply the sample limits,
    detect the schema and check every row.

    With `processor`, each sample is also rendered with the chat template (and, with `--max_seq_length`,
    encoded by the processor to measure it); `facts` come from the family's registry entry
    (`FamilySpec.encoding`).
    """
    base_dirs = _image_root(data_args)
    sources = load_sources(
        data_args.dataset_name,
        eval_dataset=data_args.eval_dataset_name,
        test_dataset=data_args.test_dataset_name,
        train_split=data_args.train_split,
        eval_split=data_args.eval_split,
        test_split=data_args.test_split,
        config=data_args.dataset_config,
        streaming=data_args.streaming,
        need_train=need_train,
    )
    train, eval_rows = _hold_out(sources.train, sources.eval, data_args, seed)
    train = _limit(train, data_args.max_train_samples)
    eval_rows = _limit(eval_rows, data_args.max_eval_samples)
    if isinstance(train, datasets.IterableDataset):
        train = train.shuffle(seed=seed, buffer_size=data_args.stream_buffer_size)

    schema = _schema(data_args, sources.first(), facts)
    images = ImageOptions(base_dirs, data_args.image_max_pixels, data_args.image_min_pixels, sources.folders)
    preparer = Preparer(schema=schema, facts=facts, images=images)
    checker = Checker(preparer, processor, data_args.max_seq_length, data_args.on_bad_sample, data_args.train_on_prompt)
    checked, reports = {}, {}
    for split, rows in (("train", train), ("eval", eval_rows), ("test", sources.test)):
        if rows is not None:
            checked[split], reports[split] = check_rows(rows, checker, split)
    return Splits(checked.get("train"), checked.get("eval"), preparer, checked.get("test"), reports)
