"""External knowledge from a CSV, joined to each row by a key (`--context_file`, `--context_join_on`).

VizSage's SemArt descriptions are the model case: a table keyed by image file name whose text the model
should read before answering. Knowledge tables come from other tools, so the delimiter (comma, tab,
semicolon) is sniffed and non-UTF-8 (Latin-1) files are accepted.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .schema import Context, DataError

TEXT_COLUMNS = ("context", "knowledge", "description", "text")


def _read_table(path: Path) -> list[dict[str, str]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raw = path.read_text(encoding="latin-1")
    try:
        dialect = csv.Sniffer().sniff(raw.split("\n", 1)[0], delimiters=",\t;|")
    except csv.Error:
        dialect = csv.excel
    return list(csv.DictReader(raw.splitlines(), dialect=dialect))


def _text_column(columns: list[str], key: str, wanted: str | None, file: Path) -> str:
    if wanted:
        if wanted not in columns:
            raise DataError(f"{file}: no column {wanted!r}; columns are: {', '.join(columns)}")
        return wanted
    others = [c for c in columns if c != key]
    if len(others) == 1:
        return others[0]
    found = next((c for c in others if c.lower() in TEXT_COLUMNS), None)
    if found is None:
        raise DataError(
            f"{file}: cannot tell which column holds the context text; columns are: {', '.join(columns)}. "
            "Name it with --context_column."
        )
    return found


def load_context(file: str, join_on: str | None, text_column: str | None = None) -> Context:
    """Read the table; `join_on` is ``column`` (same name in data and table) or ``data_column=table_column``."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise DataError(f"--context_file {file}: file not found")
    if not join_on:
        raise DataError("--context_file needs --context_join_on (the column both tables share, or data_col=csv_col)")
    data_column, _, key = join_on.partition("=")
    key = key or data_column
    rows = _read_table(path)
    columns = list(rows[0]) if rows else []
    if key not in columns:
        raise DataError(f"{path}: join column {key!r} not found; columns are: {', '.join(columns)}")
    text = _text_column(columns, key, text_column, path)
    table = {}
    for row in rows:
        if row.get(key) and row.get(text):
            table[row[key]] = row[text]
            table.setdefault(Path(row[key]).name, row[text])
    return Context(table=table, data_column=data_column, file=str(path))
