"""Per-part learning rates: the vision tower, projector and the rest can each train at their own rate.

A `transformers.Trainer` subclass that only overrides `create_optimizer`: the optimizer class and its
settings are the Trainer's own (from `--optim`), the parameters are split into groups by part (and by
weight decay, as the Trainer does), and the scheduler scales every group's rate by the same factor.
"""

from __future__ import annotations

import logging

from transformers import Trainer

from ..models.loading import part_of, strip_peft_prefix
from ..models.registry import FamilySpec
from .checkpoints import CompleteCheckpoints
from .guard import NonFiniteGuard

logger = logging.getLogger(__name__)


def part_learning_rates(base_lr: float, vision_lr: float | None, projector_lr: float | None) -> dict[str, float]:
    """The learning rate of each part (the language model and anything else use `base_lr`)."""
    return {
        "vision_tower": base_lr if vision_lr is None else vision_lr,
        "projector": base_lr if projector_lr is None else projector_lr,
        "language_model": base_lr,
        "other": base_lr,
    }


def param_groups(model, spec: FamilySpec, lrs: dict[str, float], decay_names: set[str], weight_decay: float) -> list:
    """Optimizer parameter groups of the trainable parameters, one per (part, decay) that has any."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(strip_peft_prefix(name), spec)
        decay = name in decay_names
        group = groups.setdefault(
            (part, decay),
            {"params": [], "lr": lrs[part], "weight_decay": weight_decay if decay else 0.0, "part": part},
        )
        group["params"].append(param)
    return list(groups.values())


class VlmTrainer(NonFiniteGuard, CompleteCheckpoints, Trainer):
    """`Trainer` that gives the vision tower and projector their own learning rates when asked (and, by
    its mixins, stops on non-finite steps and marks each checkpoint complete once written)."""

    def __init__(self, *args, spec: FamilySpec, vision_lr=None, projector_lr=None, **kw):
        super().__init__(*args, **kw)
        self.spec = spec
        self.vision_lr = vision_lr
        self.projector_lr = projector_lr

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
