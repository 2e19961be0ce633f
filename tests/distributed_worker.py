"""`vlmtune train` as one process of a multi-process test job, with a check that the ranks stay in step.

Run by tests/test_distributed.py under torchrun or with RANK/WORLD_SIZE set by hand. The command line is
vlmtune's own; the only addition is a callback that, after every optimizer step, gathers a checksum of
each rank's trainable weights (through accelerate) and stops the job if any rank differs.
"""

from __future__ import annotations

import sys

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

if __name__ == "__main__":
    torch.set_num_threads(1)
    main(["train", *sys.argv[1:]])
