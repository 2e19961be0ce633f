"""Failures during training that must not cost the run: a non-finite loss or gradient, and Ctrl-C.

- Non-finite loss or gradients are checked at every optimizer step, after clipping and before the step.
  `--on_nonfinite stop` (default) ends the run with the step number and the usual fixes; `skip` drops
  that optimizer step (counted and reported) and goes on. With fp16 the loss scaler already skips steps
  whose gradients overflow (that is how it finds its scale), so there only the loss is checked.
- Weights that are not finite are never saved: neither as a checkpoint nor as the result.
- The first Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and stops; the
  command then exits with 128 + the signal number and says how to resume. A second one quits at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..errors import RunError

logger = logging.getLogger(__name__)

STOP, SKIP = "stop", "skip"
NONFINITE_FIXES = (
    "Lower --learning_rate, use --bf16 instead of --fp16, keep --max_grad_norm on (1.0), and check the data "
    "for empty answers or broken images; or pass --on_nonfinite skip to drop such steps and go on."
)


class TrainingInterruptedError(RunError):
    """Ctrl-C or SIGTERM: a checkpoint was saved; the exit code is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Refuse to save `what` when a trainable weight is NaN or infinite."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise RunError(
            f"not saving {what}: {len(bad)} trained weights are NaN or infinite (first: {bad[0]}); the run "
            f"diverged. {NONFINITE_FIXES}"
        )


def _finite(value) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(value)


class NonFiniteGuard:
    """Trainer mixin: watch each step's loss and gradient norm; stop or skip the step when not finite."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nonfinite_steps: list[int] = []  # the optimizer steps skipped with --on_nonfinite skip
        self._bad_loss: float | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not _finite(loss):
            self._bad_loss = float(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Called once per optimizer step, after clipping and right before `optimizer.step()`.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        bad_loss, self._bad_loss = self._bad_loss, None
        scaled = self.args.fp16 or self.accelerator.scaler is not None  # overflowing gradients are routine
        if bad_loss is None and (scaled or _finite(grad_norm)):
            return grad_norm
        step = self.state.global_step + 1
        what = f"loss is {bad_loss}" if bad_loss is not None else f"gradient norm is {float(grad_norm)}"
        if getattr(self.args, "on_nonfinite", STOP) != SKIP:
            raise RunError(
                f"training diverged at step {step}: the {what}. The run stopped before this step changed the "
                f"weights; no adapter or model was saved (checkpoints of earlier steps are kept). {NONFINITE_FIXES}"
            )
        self.nonfinite_steps.append(step)
        logger.warning("Step %d skipped (--on_nonfinite skip): the %s.", step, what)
        model.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients untouched
        return grad_norm

    def _save_checkpoint(self, model, trial) -> None:
        check_finite_weights(self.model, f"checkpoint-{self.state.global_step}")
        super()._save_checkpoint(model, trial)


class StopOnSignal(TrainerCallback):
    """Turn the first SIGINT/SIGTERM into "save a checkpoint at the end of this step and stop"."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: quit now (what is saved is still complete or recognised)
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nvlmtune: {signal.Signals(signum).name} received: saving a checkpoint after this step, then "
            "stopping (press Ctrl-C again to quit without saving).",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """Handle the signals while the block runs (only the main thread can; elsewhere nothing changes)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            self._restore()

    def on_step_end(self, args, state, control, **kwargs):
        if self._requested_anywhere(args):
            control.should_save = True
            control.should_training_stop = True
        return control

    def _requested_anywhere(self, args) -> bool:
        """Whether any process got the signal: all must save and stop at the same step, or they hang."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.signum is not None
        signum = torch.tensor([self.signum or 0], device=args.device)
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(signum.item()) or None
        return self.signum is not None

    def raise_if_stopped_early(self, trainer) -> None:
        """After a signal stopped training early: say where the checkpoint is and how to go on."""
        state = trainer.state
        if self.signum is None or state.global_step >= state.max_steps:
            return
        checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{state.global_step}"
        raise TrainingInterruptedError(
            f"training stopped by {signal.Signals(self.signum).name} at step {state.global_step} of "
            f"{state.max_steps}; its checkpoint is {checkpoint}. To continue, run the same command with "
            "--resume_from_checkpoint latest.",
            self.signum,
        )
