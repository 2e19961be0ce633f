"""Early stopping with patience in evaluations or as a share of the run (the VizSage workflow), and
`--report_to` back-ends that fail without ending the run."""

from __future__ import annotations

import logging
import math

from transformers import EarlyStoppingCallback, TrainerCallback

from ..errors import UsageError

logger = logging.getLogger(__name__)


def evaluations_in(steps: float, args, max_steps: int) -> int:
    """How many evaluations happen in `steps` training steps under `args`' evaluation schedule."""
    if args.eval_strategy == "epoch":
        epochs = max(args.num_train_epochs, 1)
        per_eval = max_steps / epochs
    else:
        per_eval = args.eval_steps or args.logging_steps
        if per_eval < 1:  # a fraction of the run, as transformers allows
            per_eval = per_eval * max_steps
    return max(1, math.ceil(steps / max(per_eval, 1)))


class RatioEarlyStopping(EarlyStoppingCallback):
    """`EarlyStoppingCallback` whose patience is a fraction of the total steps, known at train start."""

    def __init__(self, patience_ratio: float, early_stopping_threshold: float = 0.0):
        super().__init__(early_stopping_patience=1, early_stopping_threshold=early_stopping_threshold)
        self.patience_ratio = patience_ratio

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.early_stopping_patience = evaluations_in(self.patience_ratio * state.max_steps, args, state.max_steps)
        logger.info(
            "Early stopping: patience %.3g of %d steps = %d evaluations.",
            self.patience_ratio,
            state.max_steps,
            self.early_stopping_patience,
        )


def early_stopping_callback(finetune_args, training_args) -> TrainerCallback | None:
    """The early-stopping callback the arguments ask for (None when they ask for none).

    Watches `--metric_for_best_model` (eval loss unless set), which any metric the evaluation reports
    can be; `--load_best_model_at_end` keeps the best checkpoint.
    """
    patience, ratio = finetune_args.early_stopping_patience, finetune_args.early_stopping_patience_ratio
    if patience is None and ratio is None:
        return None
    if patience is not None and ratio is not None:
        raise UsageError("give --early_stopping_patience or --early_stopping_patience_ratio, not both")
    if training_args.eval_strategy == "no":
        raise UsageError("early stopping needs evaluations: set --eval_strategy steps (with --eval_steps) or epoch")
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model = "loss"
        training_args.greater_is_better = False
    threshold = finetune_args.early_stopping_threshold
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise UsageError(f"--early_stopping_patience_ratio must be in (0, 1], got {ratio}")
        return RatioEarlyStopping(ratio, threshold)
    return EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)


# What to check when a `--report_to` back-end fails (its server, login or offline mode).
REPORTER_FIXES = {
    "wandb": "check `wandb login` and the network, or set WANDB_MODE=offline to log to ./wandb and `wandb sync` later",
    "mlflow": "check MLFLOW_TRACKING_URI and that its server runs, or unset it to log to ./mlruns",
    "trackio": "check TRACKIO_SPACE_ID and your hub login, or unset it to log locally",
    "comet_ml": "check COMET_API_KEY and the network, or set COMET_MODE=offline",
    "tensorboard": "check that --logging_dir can be written",
}
_EVENTS = [name for name in vars(TrainerCallback) if name.startswith("on_")]


def keep_training_when_reporters_fail(handler) -> list[str]:
    """Make each `--report_to` back-end's callback step aside at its first failure (no network, no login, a
    server that is down) with one warning naming it and the fix; training, the console log,
    trainer_state.json and the plots go on. Returns the names of the back-ends guarded.

    A back-end in offline mode (WANDB_MODE=offline...) logs locally by itself; nothing here changes that.
    """
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = {cls: name for name, cls in INTEGRATION_TO_CALLBACK.items()}
    guarded = []
    for callback in handler.callbacks:
        if type(callback) in names:
            _step_aside_on_failure(callback, names[type(callback)])
            guarded.append(names[type(callback)])
    return guarded


def _step_aside_on_failure(callback: TrainerCallback, name: str) -> None:
    failed: list[BaseException] = []

    def guard(event: str):
        method = getattr(callback, event)

        def guarded(*args, **kwargs):
            if failed:
                return None
            try:
                return method(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - a logger must never end a training run
                failed.append(err)
                fix = REPORTER_FIXES.get(name, f"check {name}'s server and login")
                message = " ".join(str(err).split())[:300]
                logger.warning(
                    "--report_to %s failed (%s: %s): training goes on, logged locally only (the console, "
                    "trainer_state.json, the training plots). To log to %s, %s.",
                    name,
                    type(err).__name__,
                    message,
                    name,
                    fix,
                )
                return None

        return guarded

    for event in _EVENTS:
        setattr(callback, event, guard(event))
