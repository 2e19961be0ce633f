"""Config files: a YAML or JSON mapping of option names to values, read and turned into `--key value`
tokens, so one translation of other tools' names serves files and flags alike (`merge` then keeps one
value per setting: the command line's over the file's). A key written twice in one file is refused here:
YAML and JSON parsers would silently keep the last.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import UsageError


class _KeyTwiceError(Exception):
    def __init__(self, key, lines: tuple[int, ...] = ()):
        super().__init__(key)
        self.key, self.lines = key, lines


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key written twice in one mapping (`<<` merges may be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, line = self.construct_scalar(key_node), key_node.start_mark.line + 1
                if key in first:
                    raise _KeyTwiceError(key, (first[key], line))
                first[key] = line
        return super().construct_mapping(node, deep)


def _unique_pairs(pairs: list) -> dict:
    """`json.loads`' object hook: a key written twice in one object is refused."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _KeyTwiceError(key)
        seen[key] = value
    return seen


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
        values = json.loads(text, object_pairs_hook=_unique_pairs) if path.endswith(".json") else _load_yaml(text)
    except _KeyTwiceError as err:
        lines = f", lines {err.lines[0]} and {err.lines[1]}" if err.lines else ""
        raise UsageError(f"{path}{lines}: key {err.key!r} is written twice; keep one") from None
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


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects built


def file_to_argv(values: dict) -> list[str]:
    """Turn a config file's values into `--key value` pairs."""
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
