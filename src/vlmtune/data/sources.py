"""Rows from anywhere: local files and folders, `save_to_disk` folders and hub datasets.

Everything becomes a `datasets.Dataset` (or `IterableDataset` when streaming) of raw rows per split. Each
row carries two private columns: `__source__`, the file (or folder/hub split) it came from, and
`__index__`, its 0-based position there. Error messages name both, and relative image paths resolve
against the row's own file's folder, so data spread over several files and folders just works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import datasets

from .schema import DataError

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "eval": "validation",
    "test": "test",
}
INDEX = "__index__"
SOURCE = "__source__"

Rows = datasets.Dataset | datasets.IterableDataset


@dataclass
class Loaded:
    """The splits of one `--dataset_name` (split name as found → rows) and each source's own folder."""

    splits: dict[str, Rows]
    folders: dict[str, Path] = field(default_factory=dict)

    def pick(self, wanted: str | None, role: str, what: str) -> Rows | None:
        """The split named `wanted`, or else the one whose name means `role` (e.g. `val` → validation)."""
        if wanted:
            if wanted in self.splits:
                return self.splits[wanted]
            raise DataError(f"{what}: no split {wanted!r}; splits found: {', '.join(self.splits)}")
        return next((rows for name, rows in self.splits.items() if SPLIT_ALIASES.get(name.lower()) == role), None)


def split_of(path: Path) -> str:
    """Guess a split from a file name such as ``val.json`` or ``chartqa_train.parquet``."""
    stem = path.stem.lower()
    for token in reversed(stem.replace("-", "_").split("_")):
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return "train"


def _labelled(rows: Rows, label: str) -> Rows:
    """Add `__index__` (position in its source) and `__source__` (the source's name) to every row."""
    if isinstance(rows, datasets.IterableDataset):
        return rows.map(lambda _, i: {INDEX: i, SOURCE: label}, with_indices=True)
    return rows.add_column(INDEX, list(range(len(rows)))).add_column(SOURCE, [label] * len(rows))


def _load_file(path: Path, streaming: bool) -> Rows:
    suffix = path.suffix.lower()
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        rows = datasets.load_dataset(
            BUILDERS[suffix], data_files=str(path), split="train", streaming=streaming, **kwargs
        )
    except Exception as err:  # datasets wraps parser errors in several types
        raise DataError(f"{path}: cannot read this {suffix} file: {err}") from err
    return _labelled(rows, str(path))


def _load_folder_of_files(path: Path, streaming: bool) -> Loaded:
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in BUILDERS and f.is_file())
    if not files:
        raise DataError(f"{path}: no {', '.join(BUILDERS)} files in this folder")
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(split_of(f), []).append(f)
    splits = {}
    for split, group in by_split.items():
        parts = [_load_file(f, streaming) for f in group]
        try:
            splits[split] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        except ValueError as err:
            names = ", ".join(str(f) for f in group)
            raise DataError(f"{path}: the {split} files ({names}) do not have the same columns: {err}") from err
    return Loaded(splits, {str(f): f.parent for f in files})


def _load_saved(path: Path, streaming: bool) -> Loaded:
    loaded = datasets.load_from_disk(str(path))
    raw = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    splits, folders = {}, {}
    for split, rows in raw.items():
        label = f"{path} [{split}]"
        rows = rows.to_iterable_dataset() if streaming else rows
        splits[split] = _labelled(rows, label)
        folders[label] = path
    return Loaded(splits, folders)


def load_hub(name: str, config: str | None = None, streaming: bool = False) -> Loaded:
    """A dataset `datasets.load_dataset` understands by name (hub id, or a local dataset folder)."""
    loaded = datasets.load_dataset(name, config, streaming=streaming)
    return Loaded({split: _labelled(rows, f"{name} [{split}]") for split, rows in dict(loaded).items()})


def load_splits(name: str, config: str | None = None, streaming: bool = False) -> Loaded:
    """Load every split `name` offers: a file, a folder of files, a `save_to_disk` folder or a hub id."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(BUILDERS)}")
        # A single file is the user's training data whatever its name says.
        return Loaded({"train": _load_file(path, streaming)}, {str(path): path.parent})
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return _load_saved(path, streaming)
        return _load_folder_of_files(path, streaming)
    if path.suffix.lower() in BUILDERS or name.startswith((".", "/", "~")):
        raise DataError(f"{name}: no such file or folder")  # a path, not a hub id: say so, not "not on the hub"
    return load_hub(name, config, streaming)
