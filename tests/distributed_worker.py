"""`vlmtune train` as one process of a multi-process test job, with a check that the ranks stay in step.

Run by tests/test_distributed.py under torchrun or with RANK/WORLD_SIZE set by hand. The command line is
vlmtune's own; the only addition is a callback that, after every optimizer step, gathers a checksum of
each rank's trainable weights (through accelerate) and stops the job if any rank differs. With
VLMTUNE_TEST_STEP_SECONDS set, each training step first sleeps that long (so a signal arrives mid-run).
"""

from __future__ import annotations

import os
import sys
import time

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback

import vlmtune.train.run as run_module
from vlmtune.cli import main


class RanksInStep(TrainerCallback):
    """Every step: all ranks' trainable weights have the same checksum; rank 0 reports the count."""

    def __init__(self):
        self.steps_checked = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
        sums = gather_object([checksum])
        if len(set(sums)) != 1:
            raise AssertionError(f"ranks diverged at step {state.global_step}: {sums}")
        self.steps_checked += 1

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"ranks in step: {self.steps_checked} steps checked across {args.world_size} processes")


def run_training_checked(*args, callbacks=None):
    return original(*args, callbacks=[*(callbacks or []), RanksInStep()])


original = run_module.run_training
run_module.run_training = run_training_checked

if step_seconds := float(os.environ.get("VLMTUNE_TEST_STEP_SECONDS", "0")):
    from vlmtune.train.trainer import VlmTrainer

    training_step = VlmTrainer.training_step

    def slow(self, *args, **kwargs):
        time.sleep(step_seconds)
        return training_step(self, *args, **kwargs)

    VlmTrainer.training_step = slow

if __name__ == "__main__":
    torch.set_num_threads(1)
    main(["train", *sys.argv[1:]])
