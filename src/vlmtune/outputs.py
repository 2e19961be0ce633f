"""Output folders: checked before any work is done (so a run does not fail at its first save hours in), and
held by one run at a time."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

logger = logging.getLogger(__name__)


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


# --- one run per output folder ------------------------------------------------------------------------

LOCK_FILE = "_vlmtune.lock"  # `_*`: left out of hub uploads, as the Trainer leaves private files out


def _holder(text: str) -> str:
    """'PID 123 on host h (vlmtune train, since 2026-12-02 22:10:05)' from a lock file's text."""
    try:
        info = json.loads(text)
        return f"PID {info['pid']} on host {info['host']} ({info['command']}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "a process whose details could not be read"


def _alive_here(text: str) -> bool:
    """Whether the lock file names a process on this host that still runs (file systems without flock)."""
    try:
        info = json.loads(text)
        if info["host"] != socket.gethostname():
            return True  # another machine's process: cannot tell, so assume it runs
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, KeyError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


@contextlib.contextmanager
def exclusive_output_dir(out: Path, command: str = "vlmtune train") -> Iterator[Path]:
    """Hold `out` for this run: a second run into the same folder is refused, naming the process that
    holds it.

    The lock is `fcntl.flock` on `out/_vlmtune.lock`, which the kernel releases when its process ends, however
    it ends: a killed run never leaves the folder stuck. The file records PID, host and start time; a
    file left by a run that was killed is taken over with a note. On a file system without flock the
    recorded PID is checked instead (on this host).
    """
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = _acquire(path, command)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):  # unlink first: a run that opens the file now sees a new one
            path.unlink()
        os.close(fd)
        for folder in created:  # a run that failed before writing anything leaves no folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def _acquire(path: Path, command: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(_read(fd))
            os.close(fd)
            raise OutputError(
                f"--output_dir {path.parent} is in use by another run: {holder}. Wait for it to end, stop it, or "
                "choose another --output_dir"
            ) from None
        except OSError:  # no flock on this file system (some network mounts): trust the recorded PID
            if (previous := _read(fd)) and _alive_here(previous):
                os.close(fd)
                raise OutputError(
                    f"--output_dir {path.parent} is in use by another run: {_holder(previous)}. Wait for it to "
                    "end, stop it, or choose another --output_dir"
                ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder ended and removed the file between our open and our lock: try again
            os.close(fd)
            continue
        if previous := _read(fd):
            note = "Taking over %s: the run that held it (%s) ended without releasing it."
            logger.warning(note, path, _holder(previous))
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": since}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        return fd
