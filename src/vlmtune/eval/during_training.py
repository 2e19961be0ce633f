"""Generation metrics at every evaluation during training (`--eval_metrics`).

`transformers.Trainer` calls `compute_metrics` at the end of each evaluation loop and logs what it
returns with the `eval_` prefix, in the same log entry as `eval_loss`. So `eval_exact_match` (or any
other metric) is in the logs, in `trainer_state.json`, in the plots, and available to
`metric_for_best_model` and `EarlyStoppingCallback`.

The Trainer would otherwise gather every batch's logits (batch x length x vocabulary) for
`compute_metrics`; `shrink_logits` replaces them with one number per row first, since the metrics here
come from generation, not from the evaluation pass's logits.
"""

from __future__ import annotations

import itertools
import logging

import torch

from ..data.prepare import Preparer
from ..models.generation import full_parameters_for_generation
from .evaluate import evaluate_generation
from .metrics import check_metric_names

logger = logging.getLogger(__name__)


class GenerationMetrics:
    """A `compute_metrics` for `Trainer`: generate answers for the first `max_samples` eval rows and score them.

    Set `trainer` after building the Trainer (the model being trained is read from it at each call).
    """

    def __init__(
        self,
        processor,
        preparer: Preparer,
        rows,
        metrics: list[str],
        max_samples: int | None = 64,
        batch_size: int = 8,
        max_new_tokens: int = 32,
    ):
        self.processor = processor
        self.preparer = preparer
        if hasattr(rows, "select"):
            self.rows = rows.select(range(min(max_samples, len(rows)))) if max_samples else rows
        else:  # a streaming (iterable) eval set: take the first rows once
            self.rows = list(itertools.islice(rows, max_samples or None))
        self.metrics = metrics
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.trainer = None

    @classmethod
    def from_args(cls, processor, splits, finetune_args, training_args) -> GenerationMetrics | None:
        """The hook `--eval_metrics` asks for, or None (no metrics asked, or no eval data)."""
        if not finetune_args.eval_metrics:
            return None
        metrics = check_metric_names(finetune_args.eval_metrics)  # a typo fails before training starts
        # The Trainer's own evaluation pass already reports eval_loss on the answer tokens of every eval row.
        metrics = [m for m in metrics if m != "loss"]
        if splits.eval is None or not metrics:
            return None
        return cls(
            processor,
            splits.preparer,
            splits.eval,
            metrics,
            max_samples=finetune_args.eval_metrics_samples,
            batch_size=training_args.per_device_eval_batch_size,
            max_new_tokens=finetune_args.max_new_tokens,
        )

    def trainer_kwargs(self) -> dict:
        """What to pass to `Trainer(...)`."""
        return {"compute_metrics": self, "preprocess_logits_for_metrics": self.shrink_logits}

    @staticmethod
    def shrink_logits(logits, labels) -> torch.Tensor:
        """`preprocess_logits_for_metrics`: keep one zero per row instead of the full logits."""
        return torch.zeros(labels.shape[0], 1, device=labels.device)

    def __call__(self, eval_prediction=None) -> dict:
        if self.trainer is None:
            raise RuntimeError("GenerationMetrics.trainer must be set to the Trainer that uses it")
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:  # under several processes each answers its share of the rows (FSDP1: with full weights)
            with full_parameters_for_generation(self.trainer):
                result = evaluate_generation(
                    model,
                    self.processor,
                    self.preparer,
                    self.rows,
                    metrics=self.metrics,
                    batch_size=self.batch_size,
                    max_new_tokens=self.max_new_tokens,
                )
        finally:
            model.train(was_training)
        logger.info("Generation metrics on %d eval samples: %s", result.metrics["samples"], result.metrics)
        # The Trainer adds the `eval_` prefix; the sample count would read as a metric, so rename it.
        metrics = dict(result.metrics)
        metrics["generation_samples"] = metrics.pop("samples")
        return metrics


def attach(trainer, hook: GenerationMetrics | None) -> None:
    """Point `hook` at `trainer` (a no-op without a hook)."""
    if hook is not None:
        hook.trainer = trainer
