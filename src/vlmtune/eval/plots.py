"""PNG plots of a training run, drawn from the Trainer's `log_history` (as in `trainer_state.json`).

- `training_curves.png`: training loss and learning rate per step (and eval loss, when evaluated).
- `eval_metrics.png`: every other `eval_*` metric per evaluation (accuracy, ANLS, ...), when evaluated.
- `reward_curves.png`: the rewards TRL's trainers log per step (`vlmtune grpo`'s `reward` and
  `rewards/<name>/mean`, `vlmtune dpo`'s `rewards/chosen`, `rewards/margins`...), when there are any.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

TRAINING_PLOT = "training_curves.png"
EVAL_PLOT = "eval_metrics.png"
REWARD_PLOT = "reward_curves.png"
# Logged by every evaluation but not about the model's quality.
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "generation_samples", "model_preparation_time")


def _series(log_history: list[dict], key: str) -> tuple[list, list]:
    points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
    return [p[0] for p in points], [p[1] for p in points]


def eval_metric_names(log_history: list[dict]) -> list[str]:
    """The quality metrics among the `eval_*` keys in `log_history` (eval_loss first)."""
    keys = {k for e in log_history for k in e if k.startswith("eval_") and not k.endswith(_NOT_METRICS)}
    return sorted(keys, key=lambda k: (k != "eval_loss", k))


def reward_names(log_history: list[dict]) -> list[str]:
    """The training reward series in `log_history`: `reward` and `rewards/...` keys, spreads left out."""
    keys = {k for e in log_history for k in e if k == "reward" or k.startswith("rewards/")}
    return sorted(k for k in keys if not k.endswith("/std"))


def write_training_plots(log_history: list[dict], output_dir: str | Path) -> list[Path]:
    """Draw the plots into `output_dir`; returns the files written (none when there is nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency; stay usable without it
        logger.warning("matplotlib is not installed: no training plots (pip install matplotlib)")
        return []
    out = Path(output_dir)
    written: list[Path] = []

    steps, loss = _series(log_history, "loss")
    lr_steps, lr = _series(log_history, "learning_rate")
    eval_steps, eval_loss = _series(log_history, "eval_loss")
    if loss or lr:
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        if loss:
            ax_loss.plot(steps, loss, label="training loss", color="tab:blue")
        if eval_loss:
            ax_loss.plot(eval_steps, eval_loss, "o-", label="eval loss", color="tab:orange")
        ax_loss.set_ylabel("loss")
        ax_loss.set_title("Training")
        ax_loss.grid(alpha=0.3)
        ax_loss.legend()
        ax_lr.plot(lr_steps, lr, color="tab:green")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("step")
        ax_lr.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / TRAINING_PLOT, dpi=100)
        plt.close(fig)
        written.append(out / TRAINING_PLOT)

    names = [k for k in eval_metric_names(log_history) if k != "eval_loss"]
    if names:
        fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.6 * len(names)), sharex=True, squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            x, y = _series(log_history, name)
            ax.plot(x, y, "o-")
            ax.set_ylabel(name.removeprefix("eval_"))
            ax.grid(alpha=0.3)
        axes[0, 0].set_title("Evaluation")
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out / EVAL_PLOT, dpi=100)
        plt.close(fig)
        written.append(out / EVAL_PLOT)
    rewards = reward_names(log_history)
    if rewards:
        fig, ax = plt.subplots(figsize=(8, 4))
        for name in rewards:
            ax.plot(*_series(log_history, name), "o-" if name == "reward" else "-", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.set_title("Rewards")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / REWARD_PLOT, dpi=100)
        plt.close(fig)
        written.append(out / REWARD_PLOT)
    return written
