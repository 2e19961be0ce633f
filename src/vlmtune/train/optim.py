"""Per-part learning rates: the vision tower, projector and the rest can each train at their own rate.

`VlmTrainer.create_optimizer` (train/trainer.py) uses these groups: the optimizer class and its settings
are the Trainer's own (from `--optim`), and the scheduler scales every group's rate by the same factor.
"""

from __future__ import annotations

from ..models.loading import part_of, strip_peft_prefix
from ..models.registry import FamilySpec


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
