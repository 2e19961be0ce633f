"""vlmtune's `transformers.Trainer`: loss only where labels are, frozen parts out of autograd, per-part rates.

Loss: `compute_loss` asks the model for logits at the labelled positions only (`models/loss.py`, which
evaluation uses too), so the full `batch x length x vocabulary` logits are never built; the loss is the
one transformers' causal-LM loss computes (same shift, same reduction, same `num_items_in_batch` scaling).

Frozen parts: gradient checkpointing makes transformers and PEFT hook every input embedding (the vision
tower's patch embedding included) so its output requires grad; that pulls a frozen vision tower into
autograd: its activations are kept (or recomputed) and its backward runs for nothing. Non-reentrant
checkpointing needs none of it, so the hooks are removed when training starts.

Per-part learning rates: the parameters are split into groups by part (and by weight decay, as the
Trainer does); optimizer class and settings are the Trainer's own.
"""

from __future__ import annotations

import logging

import torch
from transformers import Trainer, TrainerCallback

from ..errors import UsageError
from ..models.feature_cache import VisionFeatureCache
from ..models.loading import keep_frozen_parts_out_of_autograd
from ..models.loss import accepts_logits_to_keep, labelled_forward
from ..models.packing import is_packed, packed_inputs
from ..models.registry import FamilySpec
from .checkpoints import CompleteCheckpoints
from .guard import NonFiniteGuard
from .memory import release_large_frees
from .optim import param_groups, part_learning_rates

logger = logging.getLogger(__name__)


# Samplers that order rows by `--length_column_name`.
LENGTH_STRATEGIES = ("group_by_length", "batch_rebalance")


def has_lengths(dataset, args) -> bool:
    """Whether `dataset` holds the length column (transformers would otherwise tokenize every row again,
    and vlmtune's rows are raw conversations, not token ids)."""
    return args.length_column_name in (getattr(dataset, "column_names", None) or [])


def check_sampling(args, train_dataset) -> None:
    """Refuse a length-ordered sampler without lengths before training starts (transformers would tokenize
    the raw rows again and fail); streamed data has no sampler: it trains in stream order."""
    if args.train_sampling_strategy not in LENGTH_STRATEGIES or train_dataset is None:
        return
    if isinstance(train_dataset, torch.utils.data.IterableDataset):
        logger.info("Streamed data: batches in stream order (--train_sampling_strategy applies to data read in full).")
        return
    if not has_lengths(train_dataset, args):
        raise UsageError(
            f"--train_sampling_strategy {args.train_sampling_strategy} needs each row's length in the column "
            f"--length_column_name {args.length_column_name}, which the training data does not have; use "
            "--train_sampling_strategy random, or name a column of lengths"
        )


class _FrozenPartsOutOfAutograd(TrainerCallback):
    """At the start of training (after the Trainer turned gradient checkpointing on), drop the hooks that
    would make frozen parts' outputs require grad."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            reentrant = bool((args.gradient_checkpointing_kwargs or {}).get("use_reentrant", False))
            keep_frozen_parts_out_of_autograd(model, reentrant=args.gradient_checkpointing and reentrant)


class VlmTrainer(NonFiniteGuard, CompleteCheckpoints, Trainer):
    """`Trainer` scoring labelled positions only, keeping frozen parts out of autograd, and giving the
    vision tower and projector their own learning rates when asked; its mixins stop on non-finite steps
    and mark each checkpoint complete once written."""

    def __init__(self, *args, spec: FamilySpec, vision_lr=None, projector_lr=None, **kw):
        super().__init__(*args, **kw)
        release_large_frees(getattr(self.args, "malloc_mmap_threshold_mb", 0))
        self.spec = spec
        self.vision_lr = vision_lr
        self.projector_lr = projector_lr
        check_sampling(self.args, self.train_dataset)
        self.vision_cache = None
        if getattr(self.args, "cache_vision_features", False):
            self.vision_cache = VisionFeatureCache.attach(self.model, spec, self.args.vision_cache_max_gb)
        self.labelled_only = accepts_logits_to_keep(self.model)
        if self.labelled_only:
            # compute_loss divides by `num_items_in_batch` itself: have the Trainer count and pass it.
            self.model_accepts_loss_kwargs = True
        self.add_callback(_FrozenPartsOutOfAutograd())

    def _get_eval_sampler(self, eval_dataset):
        streamed = isinstance(eval_dataset, torch.utils.data.IterableDataset)
        if (
            self.args.train_sampling_strategy in LENGTH_STRATEGIES
            and not streamed
            and not has_lengths(eval_dataset, self.args)
        ):
            return torch.utils.data.SequentialSampler(eval_dataset)  # the order does not matter to the metrics
        return super()._get_eval_sampler(eval_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if is_packed(inputs):  # several samples per row: the family's per-sample positions (models/packing.py)
            inputs = packed_inputs(model, self.spec, inputs)
        # Liger patches the forward with its own fused linear cross-entropy, which also never builds logits.
        custom = self.label_smoother is not None or self.compute_loss_func is not None or self.args.use_liger_kernel
        if not self.labelled_only or custom or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs, _ = labelled_forward(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens, DDP averages gradients.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.vision_lr is None and self.projector_lr is None:
            return super().create_optimizer(model)
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        lrs = part_learning_rates(self.args.learning_rate, self.vision_lr, self.projector_lr)
        decay_names = set(self.get_decay_parameter_names(model))
        groups = param_groups(model, self.spec, lrs, decay_names, self.args.weight_decay)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)  # each group carries its own
        self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        for group in groups:
            logger.info("%s: %d tensors at lr %g", group["part"], len(group["params"]), group["lr"])
        return self.optimizer
