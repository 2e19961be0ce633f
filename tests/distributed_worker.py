"""`vlmtune train` (or `dpo`, `kto`, `grpo`: the first argument) as one process of a multi-process test job, with a
check that the ranks stay in step.

Run by tests/test_distributed.py under torchrun or with RANK/WORLD_SIZE set by hand. The command line is
vlmtune's own (after the command); the only addition is a callback that, after every optimizer step,
gathers a checksum of each rank's trainable weights (through accelerate) and stops the job if any rank
differs, and counts the steps where one rank's batch had images and another's had none. With
VLMTUNE_TEST_STEP_SECONDS set, each training step first sleeps that long (so a signal arrives mid-run).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping

import torch
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback

import vlmtune.train.grpo as grpo_module
import vlmtune.train.kto as kto_module
import vlmtune.train.preference as dpo_module
import vlmtune.train.run as run_module
from vlmtune.cli import main

COMMANDS = {
    "train": (run_module, "run_training"),
    "dpo": (dpo_module, "run_dpo"),
    "kto": (kto_module, "run_kto"),
    "grpo": (grpo_module, "run_grpo"),
}


class RanksInStep(TrainerCallback):
    """Every step: all ranks' trainable weights have the same checksum; rank 0 reports the count."""

    def __init__(self):
        self.steps_checked = 0
        self.mixed_steps = 0  # steps where some ranks' batches had images and others' had none

    def on_step_end(self, args, state, control, model=None, **kwargs):
        checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
        sums = gather_object([checksum])
        if len(set(sums)) != 1:
            raise AssertionError(f"ranks diverged at step {state.global_step}: {sums}")
        self.steps_checked += 1
        self.mixed_steps += len(set(gather_object([BATCH_HAD_IMAGES[-1]]))) > 1

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"ranks in step: {self.steps_checked} steps checked across {args.world_size} processes")
            print(f"image and text-only batches in one step: {self.mixed_steps} steps")


BATCH_HAD_IMAGES = [False]  # per training step of this rank: whether its batch held pixel values
training_step = Trainer.training_step


def has_images(inputs) -> bool:
    """A collated batch's pixel values, or (GRPO: the step generates from raw rows) any row's images."""
    if isinstance(inputs, Mapping):  # a dict, or a BatchFeature
        return inputs.get("pixel_values") is not None
    return any(row.get("images") for row in inputs)


def recording_step(self, model, inputs, *args, **kwargs):
    BATCH_HAD_IMAGES.append(has_images(inputs))
    return training_step(self, model, inputs, *args, **kwargs)


Trainer.training_step = recording_step


def checked(run):
    """`run` (a command's run function) with the `RanksInStep` callback added."""

    def run_checked(*args, callbacks=None):
        return run(*args, callbacks=[*(callbacks or []), RanksInStep()])

    return run_checked


for module, name in COMMANDS.values():
    setattr(module, name, checked(getattr(module, name)))

if step_seconds := float(os.environ.get("VLMTUNE_TEST_STEP_SECONDS", "0")):
    from vlmtune.train.trainer import VlmTrainer

    vlm_training_step = VlmTrainer.training_step

    def slow(self, *args, **kwargs):
        time.sleep(step_seconds)
        return vlm_training_step(self, *args, **kwargs)

    VlmTrainer.training_step = slow

if __name__ == "__main__":
    torch.set_num_threads(1)
    argv = sys.argv[1:]
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    main([command, *argv])
