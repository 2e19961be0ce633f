"""`--family_file family.yaml`: the few facts about an architecture that vlmtune cannot derive from the
checkpoint (docs/models.md), read and type-checked here and passed to `models/` as a mapping; the keys are
`models.derive.FAMILY_FILE_KEYS`, so the file and the `DerivationError` messages name the same ones."""

from __future__ import annotations

from ..errors import UsageError
from ..models.derive import FAMILY_FILE_KEYS
from .files import read_config_file
from .suggest import did_you_mean

_KINDS = {tuple: "a list of strings (or one string)", str: "a string", bool: "true or false"}


def read_family_file(path: str | None) -> dict[str, object] | None:
    """The facts `path` states (lists as tuples), or None without a file; a `UsageError` naming the file,
    the key and what it must be for an unknown key or a value of the wrong type."""
    if path is None:
        return None
    values = read_config_file(path)
    return {key: _fact(path, str(key), value) for key, value in values.items()}


def _fact(path: str, key: str, value: object) -> object:
    kind = FAMILY_FILE_KEYS.get(key)
    if kind is None:
        hint = did_you_mean(key, list(FAMILY_FILE_KEYS))
        raise UsageError(
            f"--family_file {path}: unknown key {key!r}{hint} (the keys a family file may state: "
            f"{', '.join(FAMILY_FILE_KEYS)})"
        )
    if kind is tuple:
        value = [value] if isinstance(value, str) else value
        valid = isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
    else:
        valid = isinstance(value, kind) and (kind is bool or value != "")
    if not valid:
        raise UsageError(f"--family_file {path}: {key} must be {_KINDS[kind]}, got {value!r}")
    return tuple(value) if kind is tuple else value
