"""Config files: a YAML or JSON mapping of option names to values, read and turned into `--key value`
tokens placed before the command line's own (so flags override the file, and one translation of other
tools' names serves files and flags alike).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import UsageError


def read_config_file(path: str) -> dict:
    """A YAML/JSON config file as a dict, or a `UsageError` naming the file (and line) and the fix."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path}: {'is a folder' if file.is_dir() else 'no such file'}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON: {err.msg}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path}{where}: not valid YAML: {err.problem}") from None
    if values is None or (isinstance(values, str) and not values.strip()):
        raise UsageError(f"{path} is empty; a config file holds option: value lines (e.g. lora_r: 16)")
    if not isinstance(values, dict):
        raise UsageError(
            f"{path}: the top level must be a mapping of option names to values (e.g. lora_r: 16), "
            f"not a {type(values).__name__}"
        )
    return values


def file_to_argv(values: dict) -> list[str]:
    """Turn a config file's values into `--key value` pairs placed before the command line's own."""
    argv: list[str] = []
    for key, value in values.items():
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def take_config_files(argv: list[str]) -> list[str]:
    """Take the config files out of `argv`: a leading `.yaml`/`.yml`/`.json` path and any `--config FILE`."""
    files = []
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        files.append(argv.pop(0))
    while "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise UsageError("--config needs a file: --config run.yaml")
        files.append(argv[i + 1])
        del argv[i : i + 2]
    return files
