"""Check an output path before any work is done, so a run does not fail at its first save hours in."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OutputError


def check_output_folder(path: str | Path, flag: str = "--output_dir") -> Path:
    """Refuse an output folder that is a file, or that cannot be created or written (nothing is created).

    The nearest existing ancestor decides: it must be a folder this user may write in (`os.access` also
    reports a read-only file system, even to root).
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; pass a folder path (it is created if needed)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, so this folder cannot be created inside it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: no permission to write in {existing}; pass a folder you can write to")
    return out


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse an output file path that is a folder or whose folder cannot be written."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise OutputError(f"{flag} {path} is a folder; pass a file path")
    check_output_folder(file.parent, flag)
    return file
