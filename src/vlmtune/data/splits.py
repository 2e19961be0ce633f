"""From `DataArguments` to checked train and eval rows plus the `Preparer` that reads them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..models.registry import FamilySpec
from .collate import ImageOptions, Preparer
from .schema import DataError, Schema, detect_schema
from .sources import load_splits

logger = logging.getLogger(__name__)

INDEX = "__index__"


@dataclass
class Splits:
    train: datasets.Dataset | None
    eval: datasets.Dataset | None
    preparer: Preparer

    @property
    def schema(self) -> Schema:
        return self.preparer.schema


def _with_index(rows: datasets.Dataset) -> datasets.Dataset:
    """Number rows as the user sees them (0-based, in file order), so errors can name them."""
    if INDEX in rows.column_names:
        return rows
    return rows.add_column(INDEX, list(range(len(rows))))


def check_rows(rows: datasets.Dataset, schema: Schema) -> None:
    """Convert every row once (images not decoded) so bad rows fail before any training starts."""
    for row in rows:
        schema.to_conversation(row, row[INDEX])


def _limit(rows: datasets.Dataset | None, n: int | None) -> datasets.Dataset | None:
    return rows.select(range(min(n, len(rows)))) if rows is not None and n else rows


def build_splits(data_args, spec: FamilySpec, seed: int = 42, need_train: bool = True) -> Splits:
    """Load, detect the schema, split off validation data when there is none, number and check rows."""
    if not data_args.dataset_name:
        raise DataError("--dataset_name is required")
    splits, base_dir = load_splits(data_args.dataset_name, data_args.dataset_config)
    train = splits.get("train")
    if need_train and train is None:
        raise DataError(f"{data_args.dataset_name}: no training split (found: {', '.join(splits)})")
    eval_rows = splits.get("validation")
    if data_args.eval_dataset_name:
        eval_splits, _ = load_splits(data_args.eval_dataset_name, data_args.dataset_config)
        eval_rows = eval_splits.get("validation") or eval_splits.get("test") or next(iter(eval_splits.values()))
    train = _with_index(train) if train is not None else None
    if eval_rows is None and train is not None and data_args.val_split_ratio > 0 and len(train) > 1:
        parts = train.train_test_split(test_size=data_args.val_split_ratio, seed=seed)
        train, eval_rows = parts["train"], parts["test"]
        logger.info(
            "No validation split: held out %d of %d rows (seed %d).", len(eval_rows), len(train) + len(eval_rows), seed
        )
    eval_rows = _with_index(eval_rows) if eval_rows is not None else None
    train = _limit(train, data_args.max_train_samples)
    eval_rows = _limit(eval_rows, data_args.max_eval_samples)

    columns = (train if train is not None else eval_rows).column_names
    schema = detect_schema(
        [c for c in columns if c != INDEX],
        source=data_args.dataset_name,
        image_column=data_args.image_column or data_args.dataset_image_field,
        prompt_column=data_args.prompt_column,
        response_column=data_args.response_column,
        messages_column=data_args.dataset_text_field,
        system_prompt=data_args.system_prompt,
    )
    logger.info(schema.describe())
    for rows in (train, eval_rows):
        if rows is not None:
            check_rows(rows, schema)
    base_dirs = tuple(Path(p) for p in (data_args.image_root, base_dir) if p)
    images = ImageOptions(
        base_dirs=base_dirs, max_pixels=data_args.image_max_pixels, min_pixels=data_args.image_min_pixels
    )
    return Splits(train=train, eval=eval_rows, preparer=Preparer(schema=schema, spec=spec, images=images))
