"""Checkpoints that survive a kill at any moment, and resuming from the newest complete one.

transformers writes `checkpoint-N` file by file, and its `get_last_checkpoint` takes the highest N whether
or not the writing finished, so a job killed while saving could not resume. Here the Trainer saves as it
always does; once every process has written its part, the main process flushes the files to disk and
writes a completion marker last (`checkpoint_complete.json`, listing each file and its size, renamed into
place and fsync'd). Only a folder whose marker is there and whose files all match it is complete.

- `--resume_from_checkpoint latest` takes the newest complete checkpoint; an explicit path to an
  incomplete one is refused.
- `--save_total_limit` counts complete checkpoints only and runs after the marker is written, so the only
  complete checkpoint is never deleted. A checkpoint is deleted by renaming it out of the way first
  (`.vlmtune-deleting-checkpoint-N`, removed at the next start or save if a kill interrupts the deletion).
- Incomplete leftovers (`checkpoint-N` without a valid marker) are never resumed from and never deleted
  on their own: they may be another tool's checkpoints. When training saves step N again, the folder of
  that step is replaced.
- A full disk (or quota) while saving ends the run with "no space left on device" naming the folder: the
  checkpoint being written is removed (it is incomplete and holds the space), the last complete one stays
  as it was, and the message says how to resume.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import ModelError, OutputError, RunError
from ..models.checkpoint import check_files

logger = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"
LATEST = "latest"
DELETING = ".vlmtune-deleting-"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _fsync(path: Path) -> None:
    """Flush a file's or folder's data to disk (a rename is only durable once its folder is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative path → size), the marker and its temporary file aside."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(MARKER)
    }


def mark_complete(folder: Path, step: int) -> None:
    """Declare `folder` complete: flush its files, then write the marker (atomically, last)."""
    files = _files(folder)
    for name in files:
        _fsync(folder / name)
    for sub in {(folder / name).parent for name in files}:
        _fsync(sub)
    tmp = folder / f"{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"global_step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)
    _fsync(folder)


def incompleteness(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is)."""
    marker = folder / MARKER
    if not marker.is_file():
        return f"it has no {MARKER}, so its saving never finished"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MARKER} is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{path} is truncated or corrupt ({path.stat().st_size} bytes, not the {size} it was saved with)"
    return None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders in `run_dir`, oldest step first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints in `run_dir`, oldest step first."""
    return [p for p in checkpoint_folders(run_dir) if incompleteness(p) is None]


def resolve_resume(value: str | None, output_dir: Path) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint value` means; a RunError when it cannot be resumed."""
    if not value:
        return None
    if value == LATEST:
        complete = complete_checkpoints(output_dir)
        leftovers = [p.name for p in checkpoint_folders(output_dir) if p not in complete]
        if leftovers:
            logger.warning("Ignoring incomplete checkpoints (interrupted while saving): %s", ", ".join(leftovers))
        if not complete:
            found = f"; incomplete ones: {', '.join(leftovers)}" if leftovers else ""
            raise RunError(
                f"--resume_from_checkpoint latest: {output_dir} holds no complete checkpoint{found}. Check "
                "--output_dir, or start from the beginning without --resume_from_checkpoint."
            )
        logger.info("Resuming from %s", complete[-1])
        check_readable(complete[-1], value)
        return str(complete[-1])
    path = Path(value)
    if not path.is_dir():
        raise RunError(
            f"--resume_from_checkpoint {value}: no such folder. Give a checkpoint-N folder of a previous run, "
            "or `latest` for the newest complete checkpoint in --output_dir."
        )
    problem = incompleteness(path)
    if problem:
        raise RunError(
            f"--resume_from_checkpoint {value}: this checkpoint is incomplete ({problem}); the run was probably "
            f"killed while saving it. {another_checkpoint(path)}"
        )
    check_readable(path, value)
    return str(path)


def another_checkpoint(folder: Path) -> str:
    """Which other checkpoints of the run there are to resume from (the way out of a damaged one)."""
    others = [p for p in checkpoint_folders(folder.parent) if p.resolve() != folder.resolve()]
    listed = ", ".join(f"{p} ({'complete' if incompleteness(p) is None else 'incomplete'})" for p in others)
    there = f"The other checkpoints there: {listed}" if others else f"There is no other checkpoint in {folder.parent}"
    return f"{there}. Pass another one, or --resume_from_checkpoint latest for the newest complete one."


def check_readable(folder: Path, value: str) -> None:
    """Refuse a checkpoint whose files are complete in size but damaged (a weights header, a JSON file),
    naming the file: the Trainer would fail on it after the model loaded, with safetensors' own words."""
    try:
        check_files(folder, "pick another checkpoint")
    except ModelError as err:
        raise RunError(f"--resume_from_checkpoint {value}: {err}. {another_checkpoint(folder)}") from None


def discard(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of the checkpoint names first (atomic), so a kill during the
    deletion never leaves a half-deleted `checkpoint-N`."""
    doomed = folder.with_name(DELETING + folder.name)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    _fsync(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_deletion_leftovers(run_dir: Path) -> None:
    """Finish deletions a kill interrupted (only folders vlmtune itself renamed for deletion)."""
    for doomed in run_dir.glob(DELETING + PREFIX_CHECKPOINT_DIR + "-*") if run_dir.is_dir() else ():
        shutil.rmtree(doomed, ignore_errors=True)


def rotate(run_dir: Path, limit: int | None, keep: set[Path]) -> None:
    """Delete the oldest complete checkpoints beyond `limit`, never those in `keep` (current, best)."""
    if not limit or limit <= 0:
        return
    complete = complete_checkpoints(run_dir)
    keep = {p.resolve() for p in keep}
    excess = len(complete) - max(limit, len(keep))
    for folder in complete:
        if excess <= 0:
            break
        if folder.resolve() not in keep:
            logger.info("Deleting %s (--save_total_limit %d)", folder, limit)
            discard(folder)
            excess -= 1
    remove_deletion_leftovers(run_dir)


_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_NO_SPACE_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# torch's zip writer reports a failed write without its errno ("unexpected pos 576 vs 534"): such an
# error counts as a full disk when the file system has less than this left.
LOW_SPACE_BYTES = 64 * 2**20


def free_bytes(folder: Path) -> int:
    """Bytes this user may still write on `folder`'s file system (its nearest existing ancestor)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


def out_of_space(err: BaseException, folder: Path) -> bool:
    """Whether `err`, raised while writing into `folder`, means that the disk or the quota is full: an
    errno, a message (safetensors' and others' `os error 28`), or a torch zip-writer failure on a file
    system that is (nearly) full."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE_ERRNOS:
            return True
        text = str(seen).lower()
        if any(t in text for t in _NO_SPACE_TEXTS):
            return True
        if "inline_container" in text or "pytorchstreamwriter" in text:
            return free_bytes(folder) < LOW_SPACE_BYTES
        seen = seen.__cause__ or seen.__context__
    return False


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


@contextlib.contextmanager
def no_space_errors(run_dir: Path, what: str, cleanup=None) -> Iterator[None]:
    """Turn a full disk while saving `what` into `run_dir` into an `OutputError` that names the folder,
    the space left and the last complete checkpoint (intact); `cleanup()` first removes what was
    half written."""
    try:
        yield
    except Exception as err:
        if not out_of_space(err, run_dir):
            raise
        if cleanup is not None:
            cleanup()
        complete = complete_checkpoints(run_dir)
        if complete:
            kept = f"the last complete checkpoint, {complete[-1]}, is intact"
            then = "run the same command with --resume_from_checkpoint latest"
        else:
            kept, then = "no complete checkpoint was saved before", "run the training again"
        raise OutputError(
            f"no space left on device in {run_dir} while saving {what} ({_size(free_bytes(run_dir))} free now); "
            f"{kept}. Free some space, or choose an --output_dir on a disk with more room, then {then}."
        ) from err


class CompleteCheckpoints:
    """Trainer mixin: each checkpoint gets its completion marker, and rotation waits for it."""

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():
            discard(folder)  # a leftover of this step (interrupted, or a run resumed from further back)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the Trainer's own rotation would run before the marker exists

        def remove_incomplete() -> None:
            if self.args.should_save and folder.exists():
                discard(folder)

        with no_space_errors(run_dir, folder.name, remove_incomplete):
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            self.accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are written
            if self.args.should_save:
                mark_complete(folder, self.state.global_step)
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            rotate(run_dir, limit, {folder} | ({Path(best)} if best else set()))
