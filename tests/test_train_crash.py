"""Crashes lose nothing: a SIGKILL while a checkpoint is written, a diverged run, Ctrl-C, two runs into one
folder and a full disk.

Killed runs are real processes that die by a real signal. They are forked from a `forkserver` that has
imported the stack once, so each kill costs a training run, not a Python start-up.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import short_run
from vlmtune.cli import main
from vlmtune.outputs import LOCK_FILE
from vlmtune.train.checkpoints import MARKER, checkpoint_folders, complete_checkpoints

QWEN = "qwen2_vl"
# Dropout on (RNG state matters), 12 rows in batches of 2 (the run crosses an epoch boundary), a decaying
# schedule (the scheduler state matters), one checkpoint kept (rotation runs at every save).
SETTINGS = dict(
    max_steps=12,
    per_device_train_batch_size=2,
    lora_dropout=0.1,
    lr_scheduler_type="cosine",
    warmup_steps=2,
    save_strategy="steps",
    save_steps=2,
    save_total_limit=1,
)


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


@pytest.fixture(scope="module")
def straight(tiny_model_dir, shapes_data, tmp_path_factory):
    """The adapter of an uninterrupted run with SETTINGS."""
    out = tmp_path_factory.mktemp("straight")
    short_run(tiny_model_dir(QWEN), shapes_data, out, **SETTINGS)
    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(expected: dict, folder: Path) -> None:
    got = load_file(folder / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6), key


def names(folders) -> list[str]:
    return [p.name for p in folders]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# --- SIGKILL while a checkpoint is being written ---------------------------------------------------


def _die(truncate: Path | None = None) -> None:
    if truncate is not None:  # as if the kill came halfway through writing this file
        with open(truncate, "r+b") as f:
            f.truncate(os.path.getsize(truncate) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def train_and_die(model_dir: str, train: str, out: str, step: int, point: str, resume: str | None) -> None:
    """Forked child: train, and SIGKILL this process at `point` of writing checkpoint-`step`:

    adapter: the adapter file half written; state: everything but trainer_state.json written;
    marker: every file written, the completion marker not yet in place; rotation: the new checkpoint
    complete, the older one renamed for deletion but not yet deleted.
    """
    from vlmtune.train.trainer import VlmTrainer

    saving: list[int] = []
    folder = Path(out) / f"checkpoint-{step}"

    def here(name: str) -> bool:
        return saving == [step] and point == name

    def wrap(cls, method, after):
        original = getattr(cls, method)

        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            after(*args, **kwargs)
            return result

        setattr(cls, method, wrapped)

    save_checkpoint = VlmTrainer._save_checkpoint

    def tracked(self, model, trial):
        saving.append(self.state.global_step)
        save_checkpoint(self, model, trial)
        saving.pop()

    VlmTrainer._save_checkpoint = tracked
    wrap(VlmTrainer, "save_model", lambda *a, **k: here("adapter") and _die(folder / "adapter_model.safetensors"))
    wrap(VlmTrainer, "_save_rng_state", lambda *a, **k: here("state") and _die())
    replace, rmtree = os.replace, shutil.rmtree
    os.replace = lambda src, dst: (here("marker") and Path(dst).name == MARKER and _die()) or replace(src, dst)
    shutil.rmtree = lambda path, **k: (here("rotation") and Path(path).exists() and _die()) or rmtree(path, **k)
    short_run(model_dir, {"train": train}, out, resume_from_checkpoint=resume, **SETTINGS)


def test_kills_during_checkpoint_saves_resume_to_the_uninterrupted_adapter(
    tiny_model_dir, shapes_data, tmp_path, forkserver, straight, capsys
):
    model_dir, train, out = tiny_model_dir(QWEN), str(shapes_data["train"]), tmp_path / "run"
    inputs = {folder: snapshot(folder) for folder in (Path(model_dir), Path(train).parent)}

    def kill_at(step: int, point: str, resume: str | None = "latest") -> None:
        child = forkserver.Process(target=train_and_die, args=(model_dir, train, str(out), step, point, resume))
        child.start()
        child.join()
        assert child.exitcode == -signal.SIGKILL, f"killed while saving checkpoint-{step} ({point})"
        assert not (out / "adapter_model.safetensors").exists()

    kill_at(4, "adapter", resume=None)
    assert names(complete_checkpoints(out)) == ["checkpoint-2"]
    assert names(checkpoint_folders(out)) == ["checkpoint-2", "checkpoint-4"]

    # The half-written checkpoint is refused by name, with the way out.
    args = ["train", "--model_name_or_path", model_dir, "--dataset_name", train, "--output_dir", str(out)]
    with pytest.raises(SystemExit) as refused:
        main([*args, "--use_cpu", "--resume_from_checkpoint", str(out / "checkpoint-4")])
    err = capsys.readouterr().err
    assert refused.value.code == 1 and "Traceback" not in err
    assert "checkpoint-4" in err and "incomplete" in err and "--resume_from_checkpoint latest" in err

    kill_at(6, "state")  # resumed from checkpoint-2; checkpoint-4 rewritten, checkpoint-2 rotated away
    assert names(complete_checkpoints(out)) == ["checkpoint-4"]
    kill_at(8, "marker")
    assert names(complete_checkpoints(out)) == ["checkpoint-6"]
    assert names(checkpoint_folders(out)) == ["checkpoint-6", "checkpoint-8"]
    kill_at(10, "rotation")
    assert names(checkpoint_folders(out)) == ["checkpoint-10"], "the one being deleted is no checkpoint"
    assert (out / ".vlmtune-deleting-checkpoint-8").is_dir()

    resumed = short_run(model_dir, shapes_data, out, resume_from_checkpoint="latest", **SETTINGS)
    assert resumed.trainer.state.global_step == 12
    assert_same_adapter(straight, out)
    assert names(checkpoint_folders(out)) == names(complete_checkpoints(out)) == ["checkpoint-12"]
    assert not list(out.glob(".vlmtune-deleting-*")), "the interrupted deletion was finished"
    # Nothing outside output_dir was written or deleted: the model and data folders are as they were.
    assert list(tmp_path.iterdir()) == [out]
    assert {folder: snapshot(folder) for folder in inputs} == inputs


def test_resume_latest_without_a_complete_checkpoint_says_so(tiny_model_dir, shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"half")
    args = ["train", "--model_name_or_path", tiny_model_dir(QWEN), "--dataset_name", str(shapes_data["train"])]
    with pytest.raises(SystemExit) as refused:
        main([*args, "--output_dir", str(out), "--use_cpu", "--resume_from_checkpoint", "latest"])
    err = capsys.readouterr().err
    assert refused.value.code == 1 and "Traceback" not in err
    assert "no complete checkpoint" in err and "checkpoint-3" in err


# --- NaN / inf ------------------------------------------------------------------------------------


@pytest.mark.parametrize("previous_result", [False, True])
def test_a_diverged_run_stops_at_its_step_and_saves_no_result(
    tiny_model_dir, shapes_data, tmp_path, capsys, previous_result
):
    out = tmp_path / "run"
    if previous_result:  # a good adapter from an earlier run, which --overwrite_output_dir would replace
        out.mkdir()
        (out / "adapter_model.safetensors").write_bytes(b"the earlier good adapter")
    with pytest.raises(SystemExit) as failed:
        main(
            [
                "train",
                "--model_name_or_path",
                tiny_model_dir(QWEN),
                "--dataset_name",
                str(shapes_data["train"]),
                "--output_dir",
                str(out),
                "--overwrite_output_dir",
                "--use_cpu",
                "--learning_rate",
                "1e30",  # Adam moves every weight by ~lr at the first step: the second step overflows
                "--max_steps",
                "6",
                "--max_train_samples",
                "12",
                "--val_split_ratio",
                "0",
                "--eval_accuracy",
                "false",
                "--save_strategy",
                "no",
            ]
        )
    err = capsys.readouterr().err
    assert failed.value.code == 1 and "Traceback" not in err
    assert re.search(r"(^|\n)vlmtune: error: training diverged", err), "the message starts its own line"
    step = re.search(r"diverged at step (\d+)", err)
    assert step and 1 < int(step.group(1)) <= 6, err
    assert "--learning_rate" in err and "--bf16" in err and "--on_nonfinite skip" in err
    if previous_result:
        assert (out / "adapter_model.safetensors").read_bytes() == b"the earlier good adapter"
    else:
        assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "adapter_config.json").exists()


def poison_step(monkeypatch, step: int) -> None:
    """Make the loss of optimizer step `step` infinite (a stand-in for one bad batch)."""
    from vlmtune.train.trainer import VlmTrainer

    compute_loss = VlmTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        return loss * float("inf") if self.state.global_step + 1 == step else loss

    monkeypatch.setattr(VlmTrainer, "compute_loss", poisoned)


def test_on_nonfinite_skip_drops_the_bad_step_and_reports_it(tiny_model_dir, shapes_data, tmp_path, monkeypatch):
    poison_step(monkeypatch, 3)
    out = tmp_path / "run"
    result = short_run(tiny_model_dir(QWEN), shapes_data, out, max_steps=5, on_nonfinite="skip")
    assert result.trainer.nonfinite_steps == [3]
    assert result.metrics["train_nonfinite_steps_skipped"] == 1
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k), "the other steps trained"


def test_a_bad_step_stops_the_run_by_default(tiny_model_dir, shapes_data, tmp_path, monkeypatch):
    poison_step(monkeypatch, 2)
    with pytest.raises(ValueError, match="diverged at step 2: the loss is inf"):
        short_run(tiny_model_dir(QWEN), shapes_data, tmp_path / "run", max_steps=5)


# --- Ctrl-C ---------------------------------------------------------------------------------------


def train_slowly(argv: list[str], stderr_file: str) -> None:
    """Forked child: the `vlmtune` command, each step slowed so that a signal arrives mid-run."""
    from vlmtune.train.trainer import VlmTrainer

    training_step = VlmTrainer.training_step

    def slow(self, *args, **kwargs):
        time.sleep(0.2)
        return training_step(self, *args, **kwargs)

    VlmTrainer.training_step = slow
    os.dup2(os.open(stderr_file, os.O_WRONLY | os.O_CREAT), 2)
    main(argv)


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes_to_the_same_adapter(
    tiny_model_dir, shapes_data, tmp_path, forkserver, straight
):
    out, stderr = tmp_path / "run", tmp_path / "stderr.txt"
    argv = ["train", "--model_name_or_path", tiny_model_dir(QWEN), "--dataset_name", str(shapes_data["train"])]
    argv += ["--output_dir", str(out), "--use_cpu", "--seed", "0", "--learning_rate", "3e-3"]
    argv += ["--max_train_samples", "12", "--val_split_ratio", "0", "--eval_accuracy", "false"]
    argv += [f"--{k}={v}" for k, v in {**SETTINGS, "save_steps": 4, "save_total_limit": None}.items() if v]
    child = forkserver.Process(target=train_slowly, args=(argv, str(stderr)))
    child.start()
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-4" / MARKER).exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGINT)
    child.join()
    message = stderr.read_text()
    assert child.exitcode == 130, message[-3000:]
    stopped = re.search(r"stopped by SIGINT at step (\d+) of 12", message)
    assert stopped and "--resume_from_checkpoint latest" in message and "Traceback" not in message
    step = int(stopped.group(1))
    assert 4 <= step < 12 and (out / f"checkpoint-{step}" / MARKER).exists()
    assert not (out / "adapter_model.safetensors").exists()
    saved = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert saved["global_step"] == step

    short_run(tiny_model_dir(QWEN), shapes_data, out, resume_from_checkpoint="latest", **SETTINGS)
    assert_same_adapter(straight, out)


# --- one run per output folder ---------------------------------------------------------------------


def test_a_second_run_into_a_busy_output_folder_is_refused_and_a_killed_run_leaves_no_lock(
    tiny_model_dir, shapes_data, tmp_path, forkserver, capsys, caplog
):
    out, stderr = tmp_path / "run", tmp_path / "stderr.txt"
    argv = ["train", "--model_name_or_path", tiny_model_dir(QWEN), "--dataset_name", str(shapes_data["train"])]
    argv += ["--output_dir", str(out), "--use_cpu", "--max_steps", "40", "--max_train_samples", "12"]
    argv += ["--val_split_ratio", "0", "--eval_accuracy", "false", "--save_strategy", "no"]
    first = forkserver.Process(target=train_slowly, args=(argv, str(stderr)))
    first.start()
    lock = out / LOCK_FILE
    deadline = time.monotonic() + 300
    while not (lock.exists() and lock.read_text()) and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert json.loads(lock.read_text())["pid"] == first.pid

    with pytest.raises(SystemExit) as refused:
        main(argv)
    err = capsys.readouterr().err
    assert refused.value.code == 1 and "Traceback" not in err
    assert f"--output_dir {out} is in use by another run: PID {first.pid} on host {socket.gethostname()}" in err
    assert first.is_alive(), "the first run goes on"

    os.kill(first.pid, signal.SIGKILL)  # killed: nothing runs to release the lock but the kernel
    first.join()
    assert lock.exists()
    with caplog.at_level(logging.WARNING):
        result = short_run(tiny_model_dir(QWEN), shapes_data, out)
    assert result.trainer.state.global_step == 3
    assert f"PID {first.pid}" in caplog.text and "ended without releasing it" in caplog.text
    assert not lock.exists(), "released at the end"


# --- a full disk -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.2 MB file system (tmpfs): room for two checkpoints of the tiny model, not three."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_saving_is_a_message_and_the_last_complete_checkpoint_stays(
    tiny_model_dir, shapes_data, small_disk, capsys
):
    out = small_disk / "run"
    argv = ["train", "--model_name_or_path", tiny_model_dir(QWEN), "--dataset_name", str(shapes_data["train"])]
    argv += ["--output_dir", str(out), "--use_cpu", "--max_steps", "8", "--max_train_samples", "12"]
    argv += ["--val_split_ratio", "0", "--eval_accuracy", "false", "--save_strategy", "steps", "--save_steps", "2"]
    with pytest.raises(SystemExit) as failed:
        main(argv)
    err = capsys.readouterr().err
    assert failed.value.code == 1 and "Traceback" not in err and "RuntimeError" not in err
    message = err[err.index("vlmtune: error: ") :]
    assert f"no space left on device in {out} while saving checkpoint-" in message
    complete = complete_checkpoints(out)
    assert complete and f"the last complete checkpoint, {complete[-1]}, is intact" in message
    assert "--resume_from_checkpoint latest" in message
    assert names(checkpoint_folders(out)) == names(complete), "the half-written checkpoint was removed"
    assert not (out / "adapter_model.safetensors").exists()

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    main([*argv, "--resume_from_checkpoint", "latest", "--save_total_limit", "1"])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8
    assert (out / "adapter_model.safetensors").is_file()
