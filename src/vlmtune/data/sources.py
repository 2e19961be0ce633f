"""Rows from anywhere: local files and folders, `save_to_disk` folders and hub datasets.

Everything becomes a `datasets.Dataset` (or `IterableDataset` when streaming) of raw rows, plus the
folder that relative image paths are resolved against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets

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


@dataclass
class Source:
    """Raw rows of one split and where they came from (for error messages and relative paths)."""

    rows: datasets.Dataset | datasets.IterableDataset
    name: str
    base_dir: Path | None


def _split_of(path: Path) -> str:
    """Guess a split from a file name such as ``val.json`` or ``chartqa_train.parquet``."""
    stem = path.stem.lower()
    for token in reversed(stem.replace("-", "_").split("_")):
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return "train"


def _load_files(files: list[Path], streaming: bool) -> dict[str, datasets.Dataset]:
    builders = {BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) != 1:
        raise ValueError(f"mixed file types in one dataset: {', '.join(str(f) for f in files)}")
    builder = builders.pop()
    data_files: dict[str, list[str]] = {}
    for f in files:
        data_files.setdefault(_split_of(f), []).append(str(f))
    kwargs = {"delimiter": "\t"} if builder == "csv" and files[0].suffix.lower() == ".tsv" else {}
    return dict(datasets.load_dataset(builder, data_files=data_files, streaming=streaming, **kwargs))


def load_splits(
    name: str, config: str | None = None, streaming: bool = False
) -> tuple[dict[str, datasets.Dataset | datasets.IterableDataset], Path | None]:
    """Load every split `name` offers: a file, a folder of files, a `save_to_disk` folder or a hub id."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise ValueError(f"{path}: unsupported file type; use one of {', '.join(BUILDERS)}")
        splits = _load_files([path], streaming)
        # A single file is the user's training data whatever its name says.
        return {"train": next(iter(splits.values()))}, path.parent
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            splits = {SPLIT_ALIASES.get(k, k): v for k, v in splits.items()}
            if streaming:
                splits = {k: v.to_iterable_dataset() for k, v in splits.items()}
            return splits, path
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in BUILDERS and f.is_file())
        if not files:
            raise ValueError(f"{path}: no {', '.join(BUILDERS)} files in this folder")
        return _load_files(files, streaming), path
    # Not on disk: a hub dataset id (needs network; not exercised offline).
    loaded = datasets.load_dataset(name, config, streaming=streaming)
    return {SPLIT_ALIASES.get(k, k): v for k, v in dict(loaded).items()}, None
