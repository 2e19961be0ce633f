"""Rows from anywhere: local files and folders, `save_to_disk` folders and hub datasets.

One call, `load_sources`, loads everything the data arguments name (each source once) and picks the
train, eval and test rows from it. Rows are a `datasets.Dataset` (or `IterableDataset` when streaming);
each carries two private columns: `__source__`, the file (or folder/hub split) it came from, and
`__index__`, its 0-based position there. Error messages name both, and relative image paths resolve
against the row's own file's folder, so data spread over several files and folders just works.

CSV, TSV, JSON and JSON Lines files may be gzip'd (``train.jsonl.gz``): they are decompressed as read.
Text files are read as the user wrote them: every CSV/TSV cell is a string (no type or missing-value
guessing, so `007`, `1.50`, `NA` and `None` stay text), and JSON/JSONL are parsed here with each number
kept as its literal text (`1.50` stays "1.50"). A file that cannot be read is named with the reason and,
where there is one, the line.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.features.features import generate_from_arrow_type

from ..compat import is_network_error, offline_reason, offline_variables
from ..errors import UsageError
from .schema import DataError

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Text formats are also read gzip'd (`train.jsonl.gz`); Parquet compresses its own columns.
GZIP = ".gz"
GZIPPABLE = (".csv", ".tsv", ".json", ".jsonl")
ACCEPTED = f"{', '.join(BUILDERS)} (or gzip'd: {', '.join(s + GZIP for s in GZIPPABLE)})"
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


def file_format(path: Path) -> str | None:
    """The data format `path`'s name says (``.jsonl`` for ``d.jsonl`` and ``d.jsonl.gz``), None if none."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes[-1:] == [GZIP]:
        return suffixes[0] if len(suffixes) == 2 and suffixes[0] in GZIPPABLE else None
    return suffixes[-1] if suffixes and suffixes[-1] in BUILDERS else None


def _stem(path: Path) -> str:
    """The file name without its format suffixes: ``val`` for ``val.jsonl`` and ``val.jsonl.gz``."""
    kind, name = file_format(path), path.name.lower()
    if not kind:
        return path.stem.lower()
    return name.removesuffix(GZIP).removesuffix(kind) if name.endswith(GZIP) else name.removesuffix(kind)


def _open(path: Path, mode: str = "rb", **kwargs):
    """Open a data file for reading, decompressing it when gzip'd."""
    return (gzip.open if path.suffix.lower() == GZIP else open)(path, mode, **kwargs)


def split_of(path: Path) -> str:
    """Guess a split from a file name such as ``val.json`` or ``chartqa_train.parquet``."""
    stem = _stem(path)
    for token in reversed(stem.replace("-", "_").split("_")):
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return "train"


def _labelled(rows: Rows, label: str) -> Rows:
    """Add `__index__` (position in its source) and `__source__` (the source's name) to every row."""
    if isinstance(rows, datasets.IterableDataset):
        return rows.map(lambda _, i: {INDEX: i, SOURCE: label}, with_indices=True)
    return rows.add_column(INDEX, list(range(len(rows)))).add_column(SOURCE, [label] * len(rows))


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception: `datasets` wraps parser errors in "An error occurred while generating"."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    return err


def _check_text(path: Path) -> None:
    """Refuse an empty file, a damaged gzip file, and a file that is not UTF-8 with the line and byte
    where it stops being so."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    with _open(path) as f:
        try:
            while chunk := f.read(1 << 20):
                size += len(chunk)
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except (OSError, EOFError, zlib.error) as err:  # gzip's errors for a damaged or non-gzip file
            if path.suffix.lower() != GZIP:
                raise
            raise DataError(
                f"{path}: cannot decompress this gzip file ({err}); it may be damaged, or not gzip'd: "
                f"then drop {GZIP} from its name"
            ) from None
        except UnicodeDecodeError:
            with _open(path) as again:  # only on failure: find the exact place
                data = again.read()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as err:
                line = data.count(b"\n", 0, err.start) + 1
                column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
                raise DataError(
                    f"{path}, line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at byte {column} of the "
                    f"line, offset {err.start} in the file); save the file with UTF-8 encoding "
                    "(in a spreadsheet: \"CSV UTF-8\")"
                ) from None
    if size == 0:
        raise DataError(f"{path}: the file is empty")


def _csv_header(path: Path, delimiter: str) -> list[str]:
    """The header's column names, which must be present, named and unique, followed by at least one row."""
    with _open(path, "rt", newline="", encoding="utf-8-sig") as f:
        lines = (row for row in csv.reader(f, delimiter=delimiter) if row)
        header, first = next(lines, None), next(lines, None)
    if not header:
        raise DataError(f"{path}: the file has no header line (it holds only blank lines)")
    if first is None:
        raise DataError(f"{path}: no rows in this file, only the header")
    unnamed = [str(i + 1) for i, name in enumerate(header) if not name.strip()]
    if unnamed:
        raise DataError(
            f"{path}, line 1: column {', '.join(unnamed)} of the header has no name (a trailing delimiter?); "
            "name every column or remove the empty one"
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{path}, line 1: column name(s) {', '.join(map(repr, repeated))} appear more than once")
    return header


_PANDAS_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def _stream_errors_named(rows: datasets.IterableDataset, path: Path, error) -> datasets.IterableDataset:
    """A stream reads its file lazily, so parser errors surface mid-run: turn them into `error(path, cause)`."""

    def guarded() -> Iterator[dict]:
        try:
            yield from rows
        except DataError:
            raise
        except Exception as err:  # the parsers' own types, wrapped by datasets
            raise error(path, _root_cause(err)) from err

    return datasets.IterableDataset.from_generator(guarded)


def _csv_error(path: Path, err: BaseException) -> DataError:
    match = _PANDAS_FIELDS.search(str(err))
    if match:
        want, line, got = match.groups()
        return DataError(
            f"{path}, line {line}: {got} fields, but the header has {want}; quote values that contain the "
            "delimiter (\"a, b\") or fix the row"
        )
    return DataError(f"{path}: cannot read this {file_format(path)} file: {err}")


def _load_csv(path: Path, streaming: bool) -> Rows:
    """Every cell as the exact text in the file: no number, date or missing-value guessing (an empty
    cell is an empty string)."""
    delimiter = "\t" if file_format(path) == ".tsv" else ","
    header = _csv_header(path, delimiter)
    features = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        rows = datasets.load_dataset(
            "csv",
            data_files=str(path),
            split="train",
            streaming=streaming,
            features=features,
            delimiter=delimiter,
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
        )
    except Exception as err:  # datasets wraps pandas' parser errors
        raise _csv_error(path, _root_cause(err)) from err
    return _stream_errors_named(rows, path, _csv_error) if streaming else rows


def _literal(text: str) -> str:
    return text


def _parse(text: str) -> object:
    """JSON with numbers (and NaN/Infinity) kept as the text written: `1.50` is "1.50", not 1.5."""
    return json.loads(text, parse_float=_literal, parse_int=_literal, parse_constant=_literal)


def _kind(value: object) -> str:
    """A parsed JSON value's kind in JSON's words (numbers arrive as their text, see `_parse`)."""
    if isinstance(value, bool):
        return "true/false"
    names = {list: "an array", str: "a string or number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _json_lines(path: Path) -> Iterator[dict]:
    with _open(path, "rt", encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = _parse(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}); each line of a "
                    "JSON Lines file must be one complete JSON object"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object {{...}}, got {_kind(row)}")
            yield row


def _json_document(path: Path) -> list[dict]:
    """A JSON array of objects, an object of equally long columns, or JSON Lines saved as ``.json``."""
    with _open(path, "rt", encoding="utf-8-sig") as f:
        text = f.read()
    try:
        doc = _parse(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines in a .json file
            return list(_json_lines(path))
        raise DataError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        lengths = {len(v) for v in doc.values()}
        if len(lengths) == 1:
            return [dict(zip(doc, values)) for values in zip(*doc.values())]
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of objects (one per row), got {_kind(doc)}")
    for i, row in enumerate(doc):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object {{...}}, got {_kind(row)}")
    return doc


def _json_rows(path: str) -> Iterator[dict]:
    path = Path(path)
    yield from _json_lines(path) if file_format(path) == ".jsonl" else _json_document(path)


def _mixed(values: list) -> bool:
    """True when Arrow cannot hold `values` in one column type (e.g. text in some rows, a list in others)."""
    try:
        pa.array(values)
    except (pa.ArrowException, TypeError, ValueError):
        return True
    return False


def _table(rows: list[dict]) -> datasets.Dataset:
    """Rows as a `Dataset` with the union of every row's keys (a key missing from a row is None).

    A field whose values differ in kind is stored as `datasets.Json`, each value pre-encoded so that it
    decodes to exactly what the file held (text that looks like a number stays text); the row with the
    wrong kind is then reported (or skipped) by the per-row checks, like any other bad value.
    """
    columns = {name: [row.get(name) for row in rows] for name in dict.fromkeys(k for row in rows for k in row)}
    mixed = [name for name, values in columns.items() if _mixed(values)]
    if not mixed:
        return datasets.Dataset.from_dict(columns)
    features = {}
    for name, values in columns.items():
        if name in mixed:
            columns[name] = [json.dumps(v) for v in values]
            features[name] = datasets.Json()
        else:
            features[name] = generate_from_arrow_type(pa.array(values).type)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _load_json(path: Path, streaming: bool) -> Rows:
    if streaming:
        first = next(_json_rows(str(path)), None)  # fail now, not mid-run, on an unreadable start
        if first is None:
            raise DataError(f"{path}: no rows in this file")
        return datasets.IterableDataset.from_generator(_json_rows, gen_kwargs={"path": str(path)})
    return _table(list(_json_rows(str(path))))


def _parquet_error(path: Path, err: BaseException) -> DataError:
    return DataError(f"{path}: cannot read this Parquet file ({err}); it may be damaged or not Parquet")


def _load_parquet(path: Path, streaming: bool) -> Rows:
    try:
        rows = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=streaming)
    except Exception as err:  # pyarrow's errors for a damaged file, wrapped by datasets
        raise _parquet_error(path, _root_cause(err)) from err
    return _stream_errors_named(rows, path, _parquet_error) if streaming else rows


def _load_file(path: Path, streaming: bool) -> Rows:
    kind = file_format(path)
    if kind != ".parquet":
        _check_text(path)
    loader = {".csv": _load_csv, ".tsv": _load_csv, ".json": _load_json, ".jsonl": _load_json}.get(kind)
    rows = (loader or _load_parquet)(path, streaming)
    if isinstance(rows, datasets.Dataset) and len(rows) == 0:
        raise DataError(f"{path}: no rows in this file")
    return _labelled(rows, str(path))


def column_names(rows: Rows) -> list[str]:
    """Column names; a stream that does not know them yet shows its first row."""
    if rows.column_names is not None:
        return list(rows.column_names)
    return list(next(iter(rows), {}))


def _same_columns(folder: Path, split: str, group: list[Path], parts: list[Rows]) -> None:
    """Files of one split are stacked, so their columns must agree; name the files and columns that do not."""
    columns = [set(column_names(part)) for part in parts]
    if all(c == columns[0] for c in columns):
        return
    differ = "; ".join(
        f"{f.name} lacks {', '.join(sorted(columns[0] - c)) or '-'} and adds {', '.join(sorted(c - columns[0])) or '-'}"
        for f, c in zip(group[1:], columns[1:])
        if c != columns[0]
    )
    raise DataError(
        f"{folder}: the {split} files do not have the same columns; compared with {group[0]}: {differ}. "
        "Rename the columns to match, or move the odd files out of the folder"
    )


def _load_folder_of_files(path: Path, streaming: bool) -> Loaded:
    files = sorted(f for f in path.rglob("*") if file_format(f) and f.is_file())
    if not files:
        raise DataError(f"{path}: no {ACCEPTED} files in this folder")
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(split_of(f), []).append(f)
    splits = {}
    for split, group in by_split.items():
        parts = [_load_file(f, streaming) for f in group]
        _same_columns(path, split, group, parts)
        try:
            splits[split] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        except ValueError as err:
            names = ", ".join(str(f) for f in group)
            raise DataError(f"{path}: the {split} files ({names}) hold different kinds of values: {err}") from err
    return Loaded(splits, {str(f): f.parent for f in files})


def _load_saved(path: Path, streaming: bool) -> Loaded:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # missing/damaged arrow files or state.json, in several types
        raise DataError(
            f"{path}: cannot read this save_to_disk folder ({type(_root_cause(err)).__name__}: {_root_cause(err)}); "
            "it may be incomplete or damaged: save it again with save_to_disk"
        ) from err
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
    if not _hub_reachable(name) and not _cached(name):
        raise _unreachable(name, config)
    try:
        loaded = datasets.load_dataset(name, config, streaming=streaming)
    except ConnectionError as err:  # datasets' "Couldn't reach ... on the Hub": offline mode or no network
        raise _unreachable(name, config) from err
    except Exception as err:  # not found, gated, bad config: many types
        raise DataError(
            f"{name}: not a local file or folder, and it cannot be loaded as a hub dataset "
            f"({type(_root_cause(err)).__name__}: {_root_cause(err)})"
        ) from err
    return Loaded({split: _labelled(rows, f"{name} [{split}]") for split, rows in dict(loaded).items()})


def _hub_reachable(name: str) -> bool:
    """False only when one request for `name`'s metadata cannot connect. Without it a user with no network
    waits 23 s while huggingface_hub retries the download five times (with a warning each) before
    `datasets` gives up; any other answer (found, not found, gated) is left to `load_dataset` to report."""
    from huggingface_hub import HfApi, constants

    if offline_variables(for_datasets=True):
        return True  # offline mode: `load_dataset` refuses at once, without a request
    try:
        HfApi().dataset_info(name, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:  # the HTTP client's and the hub's own error types
        return not is_network_error(err)
    return True


def _cached(name: str) -> bool:
    """Whether `datasets` holds a prepared copy of hub dataset `name` (its cache's `namespace___name` folder):
    with no network, `load_dataset` falls back to it, after its retries."""
    return (Path(datasets.config.HF_DATASETS_CACHE).expanduser() / name.replace("/", "___")).is_dir()


def _unreachable(name: str, config: str | None) -> UsageError:
    """A hub dataset id that cannot be downloaded from here: what was asked, why, and how to get it."""
    from huggingface_hub import constants

    variables = offline_variables(for_datasets=True)
    why = offline_reason(for_datasets=True) if variables else f"no network connection to {constants.ENDPOINT}"
    folder = name.rstrip("/").rsplit("/", 1)[-1]
    args = f"{name!r}, {config!r}" if config else repr(name)
    online = f"unset {' and '.join(variables)} if this machine has a network" if variables else "check the network"
    return UsageError(
        f"{name}: no such local file or folder, and as a hub dataset it cannot be downloaded here: {why}. "
        f"Download it where there is a network (python -c \"import datasets; datasets.load_dataset({args})"
        f".save_to_disk('{folder}')\"), copy the folder here and pass it (e.g. --dataset_name {folder}), or "
        f"{online}"
    )


def load_splits(name: str, config: str | None = None, streaming: bool = False) -> Loaded:
    """Load every split `name` offers: a file, a folder of files, a `save_to_disk` folder or a hub id."""
    path = Path(name).expanduser()
    if path.is_file():
        if not file_format(path):
            raise DataError(f"{path}: unsupported file type; use one of {ACCEPTED}")
        # A single file is the user's training data whatever its name says.
        return Loaded({"train": _load_file(path, streaming)}, {str(path): path.parent})
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return _load_saved(path, streaming)
        return _load_folder_of_files(path, streaming)
    if file_format(path) or name.startswith((".", "/", "~")):
        raise DataError(f"{name}: no such file or folder")  # a path, not a hub id: say so, not "not on the hub"
    return load_hub(name, config, streaming)


@dataclass
class Sources:
    """Every split the data arguments name, loaded: rows per role (None where there are none) and the
    folder of each source, against which its rows' relative image paths resolve."""

    train: Rows | None
    eval: Rows | None
    test: Rows | None
    folders: dict[str, Path]

    def first(self) -> Rows:
        """The rows whose columns the schema is read from: train's, else eval's, else test's."""
        return next(rows for rows in (self.train, self.eval, self.test) if rows is not None)


def load_sources(
    dataset: str | None,
    *,
    eval_dataset: str | None = None,
    test_dataset: str | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    test_split: str | None = None,
    config: str | None = None,
    streaming: bool = False,
    need_train: bool = True,
) -> Sources:
    """Load everything the data arguments name, each source once, and pick the train, eval and test rows.

    Train rows are `dataset`'s split `train_split`, else the one named like train. Eval and test rows come
    from `eval_dataset` / `test_dataset` when given (the split named, else the one named for the role,
    else its first split), otherwise from `dataset`'s split named for the role, if any.
    """
    if not dataset:
        raise DataError("--dataset_name is required")
    loaded: dict[str, Loaded] = {}

    def load(name: str) -> Loaded:
        if name not in loaded:
            loaded[name] = load_splits(name, config, streaming)
        return loaded[name]

    main = load(dataset)
    train = main.pick(train_split, "train", dataset)
    if need_train and train is None:
        raise DataError(f"{dataset}: no training split (found: {', '.join(main.splits)})")
    rows = {}
    for role, own, wanted in (("validation", eval_dataset, eval_split), ("test", test_dataset, test_split)):
        if own:
            other = load(own)
            rows[role] = other.pick(wanted, role, own) or next(iter(other.splits.values()))
        else:
            rows[role] = main.pick(wanted, role, dataset)
    folders = {label: folder for source in loaded.values() for label, folder in source.folders.items()}
    return Sources(train, rows["validation"], rows["test"], folders)
