"""Failures during training that must not cost the run: a non-finite loss or gradient, and Ctrl-C.

- Non-finite loss or gradients are checked at every optimizer step, after clipping and before the step.
  `--on_nonfinite stop` (default) ends the run with the step number and the usual fixes; `skip` drops
  that optimizer step (counted and reported) and goes on. With fp16 the loss scaler already skips steps
  whose gradients overflow (that is how it finds its scale), so there only the loss is checked.
- Weights that are not finite are never saved: neither as a checkpoint nor as the result.
- The first Ctrl-C (SIGINT), or a signal of `--save_on_signal` (SIGTERM by default; Slurm's `--signal`
  warning is often SIGUSR1), finishes the current step, saves a checkpoint and stops; the command then
  exits with 128 + the signal number and says how to resume. A second one, more than `REPEAT_WINDOW_S`
  after the first, quits at once; repeats within that window are the same request arriving twice (a
  launcher passes on the signal that the terminal or Slurm already sent to every process).
- Under torchrun / accelerate launch every process checks at each step whether any process was
  signalled, so all stop at the same step and save one consistent checkpoint, whichever process (or the
  launcher) got the signal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..config.launch import launched_world_size
from ..errors import RunError, UsageError

logger = logging.getLogger(__name__)

STOP, SKIP = "stop", "skip"
NONFINITE_FIXES = (
    "Lower --learning_rate, use --bf16 instead of --fp16, keep --max_grad_norm on (1.0), and check the data "
    "for empty answers or broken images; or pass --on_nonfinite skip to drop such steps and go on."
)


class TrainingInterruptedError(RunError):
    """Ctrl-C or a `--save_on_signal` signal: a checkpoint was saved; the exit code is 128 + the signal
    number. `silent` on the processes other than the first, which say the same thing."""

    def __init__(self, message: str, signum: int, silent: bool = False):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.silent = silent


# Signals that cannot mean "checkpoint and stop": uncatchable, or sent by the system for other reasons.
_NOT_HANDLED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE}
# The signals torchrun (and accelerate launch, through torchrun) passes on to its processes by default.
LAUNCHER_SIGNALS_VARIABLE = "TORCHELASTIC_SIGNALS_TO_HANDLE"


def parse_signals(names, flag: str = "--save_on_signal") -> tuple[signal.Signals, ...]:
    """`SIGUSR1`, `USR1`, `usr1` or `10` → the signal; a `UsageError` naming the flag otherwise."""
    found = []
    for name in names or ():
        text = str(name).strip().upper()
        text = text if text.isdigit() or text.startswith("SIG") else f"SIG{text}"
        try:
            signum = signal.Signals(int(text)) if text.isdigit() else signal.Signals[text]
        except (KeyError, ValueError):
            raise UsageError(
                f"{flag} {name}: not a signal; use a name such as SIGTERM, SIGUSR1 or SIGUSR2 (`kill -l` lists them)"
            ) from None
        if signum in _NOT_HANDLED:
            raise UsageError(
                f"{flag} {signum.name}: this signal cannot be caught, or means something else; use SIGTERM, SIGUSR1 "
                "or SIGUSR2"
            )
        found.append(signum)
    return tuple(dict.fromkeys(found))


def launcher_problem(signals, environ=os.environ) -> str | None:
    """Under torchrun / accelerate launch: the `--save_on_signal` signals the launcher does not pass on to
    its processes (a signal sent to the launcher alone would then end it without a checkpoint)."""
    handled = environ.get(LAUNCHER_SIGNALS_VARIABLE)
    if handled is None:
        return None
    passed = {s.strip().upper() for s in handled.split(",")}
    missing = [s.name for s in signals if s.name not in passed]
    if not missing:
        return None
    wanted = ",".join(dict.fromkeys([*(s.strip() for s in handled.split(",") if s.strip()), *missing]))
    return (
        f"--save_on_signal {' '.join(missing)}: the launcher passes on only {handled} to the training processes, "
        f"so {' or '.join(missing)} sent to torchrun itself would end the job without a checkpoint (a signal "
        f"sent to every process, as Slurm's --signal does without B:, still works). Launch with torchrun "
        f"--signals_to_handle {wanted} (accelerate launch: PET_SIGNALS_TO_HANDLE={wanted} in the environment)."
    )


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
    """Turn the first SIGINT or `signals` signal into "save a checkpoint at the end of this step and stop"."""

    REPEAT_WINDOW_S = 2.0

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.signals = tuple(dict.fromkeys((signal.SIGINT, *signals)))
        self.signum: int | None = None
        self._received_at = 0.0
        self._previous: dict = {}

    @staticmethod
    def _speaker() -> str:
        """`vlmtune`, or `vlmtune [rank N]` under a launcher: only the signalled processes speak."""
        launched = launched_world_size() > 1
        return f"vlmtune [rank {os.environ.get('RANK', '?')}]" if launched else "vlmtune"

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if time.monotonic() - self._received_at < self.REPEAT_WINDOW_S:
                return  # the same request, passed on by a launcher or sent to every process at once
            self._restore()  # asked twice: quit now (what is saved is still complete or recognised)
            raise KeyboardInterrupt
        self.signum, self._received_at = signum, time.monotonic()
        print(
            f"\n{self._speaker()}: {signal.Signals(signum).name} received: saving a checkpoint after this step, "
            "then stopping (press Ctrl-C again to quit without saving).",
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
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
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
            silent=not trainer.is_world_process_zero(),
        )
