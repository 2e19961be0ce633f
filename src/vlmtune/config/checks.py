"""What each option's value must be, and the rules that involve two options: checked after parsing and
before anything loads, so a bad value is named with its flag (or config file and key).

The table (`CHECKS`) applies to any argument class that has the field, so a new command's dataclass is
checked by naming its fields here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from ..errors import UsageError
from .arguments import (
    DPO_LOSS_TYPES,
    DPO_OTHER_METHODS,
    DPO_SMOOTHED_LOSSES,
    GRPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    DpoArguments,
    GrpoArguments,
    KtoArguments,
)
from .suggest import did_you_mean


@dataclass(frozen=True)
class Check:
    """What one option's value must be: a range (ends open or closed) or one of some choices."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    refused: tuple[tuple[str, str], ...] = ()  # (value, why it is not taken): known names answered with a reason

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.high is None:
            return f"{'greater than' if self.low_open else 'at least'} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"

    def allows(self, value) -> bool:
        if self.choices:
            return value in self.choices
        below = value <= self.low if self.low_open else value < self.low
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return not (below or above)


def at_least(low: float) -> Check:
    return Check(low=low)


def above(low: float) -> Check:
    return Check(low=low, low_open=True)


def fraction(low_open: bool = False, high_open: bool = False) -> Check:
    return Check(low=0, high=1, low_open=low_open, high_open=high_open)


def one_of(*choices: str, refused: dict[str, str] | None = None) -> Check:
    return Check(choices=choices, refused=tuple((refused or {}).items()))


# Every option's allowed values, in one table: checked for any argument class that has the field.
CHECKS: dict[str, Check] = {
    "lora_r": at_least(1),
    "lora_alpha": above(0),
    "lora_dropout": fraction(high_open=True),
    "finetuning_type": one_of("lora", "dora", "full"),
    "per_device_train_batch_size": at_least(1),
    "per_device_eval_batch_size": at_least(1),
    "batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "learning_rate": above(0),
    "vision_lr": above(0),
    "projector_lr": above(0),
    "weight_decay": at_least(0),
    "val_split_ratio": fraction(high_open=True),
    "max_seq_length": at_least(1),
    "image_max_pixels": at_least(1),
    "image_min_pixels": at_least(1),
    "max_train_samples": at_least(1),
    "max_eval_samples": at_least(1),
    "stream_buffer_size": at_least(1),
    "on_bad_sample": one_of("error", "skip"),
    "beta": above(0),
    "loss_type": one_of(*DPO_LOSS_TYPES, refused=DPO_OTHER_METHODS),
    "label_smoothing": Check(low=0, high=0.5, high_open=True),
    "packing_strategy": one_of("best_fit", "greedy"),
    "max_new_tokens": at_least(1),
    "eval_metrics_samples": at_least(1),
    "early_stopping_patience": at_least(1),
    "early_stopping_patience_ratio": fraction(low_open=True),
    "early_stopping_threshold": at_least(0),
    "temperature": above(0),
    "top_p": fraction(low_open=True),
    "num_beams": at_least(1),
    "num_examples": at_least(0),
    "debug_samples": at_least(0),
    "report_samples": at_least(0),
    "dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "malloc_mmap_threshold_mb": Check(low=0, high=32),  # glibc refuses more than 32 MiB
    "vision_cache_max_gb": above(0),
    "inspect_split": one_of("train", "eval", "test"),
    "color": one_of("auto", "always", "never"),
}


# A command's own values for an option another command also has (`vlmtune dpo`'s --beta must be above 0,
# GRPO's may be 0; their --loss_type choices differ): these win over `CHECKS` for that class's fields.
COMMAND_CHECKS: dict[type, dict[str, Check]] = {
    KtoArguments: {
        "loss_type": one_of(*KTO_LOSS_TYPES),
        "desirable_weight": above(0),
        "undesirable_weight": above(0),
    },
    GrpoArguments: {
        "beta": at_least(0),
        "loss_type": one_of(*GRPO_LOSS_TYPES),
        "num_generations": at_least(2),
        "max_completion_length": at_least(1),
        "num_iterations": at_least(1),
        "epsilon": above(0),
        "importance_sampling_level": one_of("token", "sequence"),
        "scale_rewards": one_of("group", "batch", "none"),
    },
}


def _dpo_problems(values: dict) -> list[tuple[str, str]]:
    """`vlmtune dpo`'s losses against their weights and label smoothing: TRL would fail on these only after the
    model loads, or ignore the smoothing without a word."""
    losses, weights, smoothing = values["loss_type"], values["loss_weights"], values["label_smoothing"]
    named = " ".join(losses)
    problems = []
    if weights is not None and len(weights) != len(losses):
        count = f"{len(weights)} weight(s) for {len(losses)} --loss_type loss(es) ({named})"
        problems.append(("loss_weights", f"has {count}; give one weight per loss"))
    if smoothing and not set(losses) & set(DPO_SMOOTHED_LOSSES):
        problems.append(
            (
                "label_smoothing",
                f"is read only by the {', '.join(DPO_SMOOTHED_LOSSES)} losses and --loss_type {named} would ignore it: "
                "leave it out, or add one of those losses",
            )
        )
    if "exo_pair" in losses and not smoothing:
        problems.append(("loss_type", "exo_pair needs --label_smoothing above 0 (EXO's epsilon; its paper uses 1e-3)"))
    return problems


# Rules on several options of one command, as (the option to name, what is wrong), for the classes that have them.
COMMAND_RULES = {DpoArguments: _dpo_problems}


def checks_for(classes) -> dict[str, Check]:
    """The checks of the options of `classes` (argument dataclasses): `CHECKS` with their own ones on top."""
    table = dict(CHECKS)
    for cls in classes:
        table.update(COMMAND_CHECKS.get(cls, {}))
    return table


# Options whose value is a mapping (keyword arguments passed on as **kwargs).
MAPPING_OPTIONS = ("lr_scheduler_kwargs", "gradient_checkpointing_kwargs", "model_init_kwargs")


def _pair_problems(values: dict) -> list[tuple[str, str]]:
    """Rules that involve two options: (the option to name, what is wrong)."""
    problems = []
    low, high = values.get("image_min_pixels"), values.get("image_max_pixels")
    if low is not None and high is not None and low > high:
        problems.append(("image_min_pixels", f"must not exceed image_max_pixels ({high}), got {low}"))
    epochs, max_steps = values.get("num_train_epochs"), values.get("max_steps")
    if epochs is not None and epochs <= 0 and not (max_steps and max_steps > 0):
        problems.append(("num_train_epochs", f"must be greater than 0 unless --max_steps is set, got {epochs:g}"))
    if values.get("load_in_4bit") and values.get("load_in_8bit"):
        problems.append(("load_in_4bit", "and --load_in_8bit cannot both be on; choose one"))
    if values.get("streaming") and not (max_steps and max_steps > 0):
        problems.append(("streaming", "needs --max_steps: a stream has no length to count epochs by"))
    patience, ratio = values.get("early_stopping_patience"), values.get("early_stopping_patience_ratio")
    if patience is not None and ratio is not None:
        problems.append(("early_stopping_patience", "and --early_stopping_patience_ratio: give one, not both"))
    if (patience is not None or ratio is not None) and values.get("eval_strategy") == "no":
        problems.append(("early_stopping_patience", "needs evaluations: set --eval_strategy steps (and --eval_steps)"))
    for name in MAPPING_OPTIONS:  # transformers keeps a value that is not JSON as text and fails much later
        if isinstance(values.get(name), str):
            problems.append((name, f"""must be a JSON object such as '{{"key": 1}}', got {values[name]!r}"""))
    problems += _packing_problems(values)
    return problems + _scheduler_problems(values) + _report_to_problems(values.get("report_to"))


def _packing_problems(values: dict) -> list[tuple[str, str]]:
    """`--packing` / `--padding_free` against the options they depend on (the model family is checked when
    the run reads the checkpoint's config: `models.packing.check_packing`)."""
    problems = []
    if values.get("packing") and values.get("max_seq_length") is None:
        problems.append(
            ("packing", "needs --max_seq_length: it is the most tokens a packed row holds (e.g. --max_seq_length 2048)")
        )
    if values.get("packing") and values.get("streaming"):
        problems.append(
            (
                "packing",
                "cannot plan rows over a stream (it needs every sample's length first); use --padding_free, which "
                "joins each batch into one row as it is read, or load the data without --streaming",
            )
        )
    if (values.get("packing") or values.get("padding_free")) and values.get("remove_unused_columns"):
        problems.append(("remove_unused_columns", "must stay false: packed rows are built from the raw columns"))
    return problems


def _scheduler_problems(values: dict) -> list[tuple[str, str]]:
    """`--lr_scheduler_kwargs` keys the chosen schedule does not take (transformers fails only at step 0)."""
    kwargs, kind = values.get("lr_scheduler_kwargs"), values.get("lr_scheduler_type")
    if not isinstance(kwargs, dict) or not kwargs or kind is None:
        return []
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    kind = SchedulerType(kind)
    schedule = TYPE_TO_SCHEDULER_FUNCTION.get(kind)
    fixed = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}  # the Trainer passes these
    taken = set(inspect.signature(schedule).parameters) - fixed if schedule else set()
    unknown = sorted(set(kwargs) - taken)
    if not unknown:
        return []
    problem = (
        f"has key(s) {', '.join(unknown)} that --lr_scheduler_type {kind.value} does not take; "
        f"it takes: {', '.join(sorted(taken)) or 'none'}"
    )
    return [("lr_scheduler_kwargs", problem)]


def _report_to_problems(wanted) -> list[tuple[str, str]]:
    """A `--report_to` logger that does not exist fails now, not after the model loads (one that is not
    installed is dropped with a warning: `compat.fit_training_args`)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in [wanted] if isinstance(wanted, str) else wanted or []:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            known = list(INTEGRATION_TO_CALLBACK)
            hint = did_you_mean(name, known)
            return [("report_to", f"cannot be {name!r}: choose from {', '.join(known)} or none{hint}")]
    return []


def check_values(objects, where: Callable[[str], str]) -> None:
    """Apply `CHECKS` and the two-option rules to parsed argument objects; `where(name)` names an option
    to the user (its flag, or the config file and key it came from)."""
    values = {}
    for obj in objects:
        values.update({f.name: getattr(obj, f.name) for f in fields(obj) if f.init})
    classes = [type(obj) for obj in objects]
    table = checks_for(classes)
    for name, value in values.items():
        check = table.get(name)
        for item in value if isinstance(value, list) else [value]:
            if check is None or item is None or check.allows(item):
                continue
            why = dict(check.refused).get(item)
            if why:
                raise UsageError(f"{where(name)} {item} is not supported: {why}")
            hint = did_you_mean(str(item), list(check.choices)) if check.choices else ""
            raise UsageError(f"{where(name)} must be {check.describe()}, got {item!r}{hint}")
    rules = [rule for cls, rule in COMMAND_RULES.items() if cls in classes]
    for name, problem in _pair_problems(values) + [p for rule in rules for p in rule(values)]:
        raise UsageError(f"{where(name)} {problem}")
