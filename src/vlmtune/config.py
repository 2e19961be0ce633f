"""Command-line and config-file arguments, as dataclasses parsed by transformers' `HfArgumentParser`.

One definition serves `--flags`, YAML and JSON files and `--help`. Every `transformers.TrainingArguments`
field passes through by name; vlmtune's own fields are grouped ahead of them.
"""

from __future__ import annotations

import argparse
import json
import re
from argparse import ArgumentError
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from difflib import get_close_matches
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments

from . import aliases, compat
from .errors import UsageError
from .train.distributed import prepare_launch_environment, resolve_launch_shortcuts


def arg(default, help: str, **kwargs):  # noqa: A002 - argparse's own word
    """A dataclass field with its `--help` text (default_factory given: `default` is ignored)."""
    if "default_factory" in kwargs:
        return field(metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str = arg(
        None, "Base model: a local folder or a Hugging Face hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)."
    )
    adapter_name_or_path: str | None = arg(
        None, "A PEFT adapter to load on top of the base model (inference, or to continue training)."
    )
    attn_implementation: str = arg(
        "sdpa", "Attention kernel: sdpa (default), eager, or flash_attention_2 (GPU, if installed)."
    )
    trust_remote_code: bool = arg(False, "Allow model code from the hub checkpoint.")
    model_type: str | None = arg(
        None, "Architecture the checkpoint must be (llava, qwen2_vl...): checked, never needed (read from config.json)."
    )


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset_name: str = arg(
        None, "Training data: a CSV/TSV/JSON/JSONL/Parquet file, a folder of them, a save_to_disk folder, or a hub id."
    )
    eval_dataset_name: str | None = arg(None, "Separate evaluation data (same forms as --dataset_name).")
    dataset_config: str | None = arg(None, "Hub dataset configuration name.")
    image_column: str | None = arg(
        None, "Column with the image(s); detected if omitted (image_path, image, images...)."
    )
    prompt_column: str | None = arg(None, "Column with the prompt; detected if omitted (prompt, question, query...).")
    response_column: str | None = arg(None, "Column with the answer; detected if omitted (response, answer, label...).")
    dataset_text_field: str | None = arg(None, "Column with OpenAI-style `messages` (role + content parts).")
    dataset_image_field: str | None = arg(None, "Column with the images for --dataset_text_field (one or a list).")
    image_root: str | None = arg(
        None, "Folder that relative image paths are resolved against (default: the data file's folder)."
    )
    image_max_pixels: int | None = arg(
        None, "Shrink larger images (aspect kept) to at most this many pixels before the processor."
    )
    image_min_pixels: int | None = arg(None, "Enlarge smaller images (aspect kept) to at least this many pixels.")
    system_prompt: str | None = arg(None, "System message added to every conversation that has none.")
    train_on_prompt: bool = arg(False, "Also train on prompt tokens (default: assistant turns only).")
    max_train_samples: int | None = arg(None, "Use at most this many training rows.")
    max_eval_samples: int | None = arg(None, "Use at most this many evaluation rows.")
    val_split_ratio: float = arg(0.1, "Held-out fraction (seeded) when the data has no validation split; 0 disables.")
    test_dataset_name: str | None = arg(None, "Separate test data (same forms as --dataset_name).")
    train_split: str | None = arg(None, "Split to train on when the data has several (default: train).")
    eval_split: str | None = arg(None, "Split to evaluate on (default: validation/val/valid/dev/eval).")
    test_split: str | None = arg(None, "Split to test on (default: test).")
    streaming: bool = arg(False, "Read the data as a stream (larger than memory); needs --max_steps.")
    stream_buffer_size: int = arg(1000, "Shuffle buffer (rows) when streaming.")
    max_seq_length: int | None = arg(
        None, "Longest sample in tokens: longer ones lose prompt text from the start, or are skipped; images never cut."
    )
    on_bad_sample: str = arg(
        "error", "error: stop at the first bad sample (file, row, reason); skip: drop bad samples and report them."
    )
    context_file: str | None = arg(None, "CSV of external knowledge joined into each prompt as a 'Context:' line.")
    context_join_on: str | None = arg(
        None, "Key for --context_file: a column both share, or data_column=csv_column (e.g. image=IMAGE_FILE)."
    )
    context_column: str | None = arg(None, "Column of --context_file with the text (detected if omitted).")
    packing: bool = arg(
        False,
        "Pack samples into rows of at most --max_seq_length tokens (needs it), never splitting one; each "
        "sample attends only to itself, with positions restarting per sample (unlike LLaMA-Factory's packing "
        "without neat_packing). --per_device_train_batch_size then counts packed rows. Training only; "
        "evaluation stays one sample per row (docs/packing.md).",
    )
    padding_free: bool = arg(
        False,
        "Join each training batch's samples into one row without padding (no plan, works with --streaming); "
        "each sample attends only to itself. Implied by --packing, whose rows are already padding-free.",
    )
    packing_strategy: str = arg(
        "best_fit",
        "How --packing fills rows: best_fit (longest samples first, each into the fullest row it fits; "
        "packs shuffled with --data_seed or --seed) or greedy (in data order, a new row when the next does not fit).",
    )


@dataclass
class FinetuneArguments:
    _argument_group_name = "fine-tuning"

    finetuning_type: str = arg("lora", "lora (default), dora (weight-decomposed LoRA) or full.")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int = arg(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = arg(
        0.0,
        "Dropout on the LoRA path (default 0: a dropout copies every adapted layer's input, which cost 20%% of "
        "the step time in bench/compare.py; 0.05 is a common regulariser for small data).",
    )
    lora_target_modules: list[str] | None = arg(
        None, "Modules to adapt: names, one regex, or all-linear (the language model's linear layers, the default)."
    )
    freeze_vision_tower: bool = arg(True, "Keep the vision encoder frozen (default on).")
    freeze_projector: bool | None = arg(
        None, "Freeze the vision-to-text projector (default: on for LoRA, off for full)."
    )
    freeze_language_model: bool = arg(False, "Freeze the language model (train only what else is unfrozen).")
    max_new_tokens: int = arg(32, "Longest generated answer when evaluating accuracy.")
    eval_accuracy: bool = arg(True, "After training, generate answers for the eval split and report exact match.")
    eval_metrics: list[str] | None = arg(
        None,
        "Generation metrics (exact_match, exact_match_raw, relaxed_accuracy, anls, token_f1, loss, or all) computed "
        "at every evaluation during training, logged as eval_<metric> (usable by --metric_for_best_model and "
        "early stopping), and after training (default after training: exact_match).",
    )
    eval_metrics_samples: int = arg(64, "Eval rows that --eval_metrics generates answers for at each evaluation.")
    use_rslora: bool = arg(False, "Rank-stabilised LoRA: scale the adapter by alpha / sqrt(r) instead of alpha / r.")
    train_vision_lora: bool = arg(False, "Also add LoRA to the vision tower's linear layers (its weights stay frozen).")
    vision_lr: float | None = arg(
        None, "Learning rate of the vision tower's trainable parameters (default: --learning_rate)."
    )
    projector_lr: float | None = arg(
        None, "Learning rate of the projector's trainable parameters (default: --learning_rate)."
    )
    load_in_4bit: bool = arg(False, "QLoRA: load the language model in 4-bit NF4, double quantised (bitsandbytes).")
    load_in_8bit: bool = arg(False, "Load the language model in 8-bit (bitsandbytes) and train LoRA on top.")
    quantize_vision_tower: bool = arg(False, "With --load_in_4bit/8bit, quantise the vision tower too (default: kept).")
    early_stopping_patience: int | None = arg(
        None, "Stop after this many evaluations without improvement of --metric_for_best_model (default eval loss)."
    )
    early_stopping_patience_ratio: float | None = arg(
        None, "Patience as a fraction of the total training steps (e.g. 0.1), converted to evaluations."
    )
    early_stopping_threshold: float = arg(0.0, "Minimum improvement of the metric that resets the patience.")


@dataclass
class VlmTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with defaults that suit VLM fine-tuning."""

    output_dir: str = arg(None, "Where the adapter/model, processor, config and logs are written.")
    overwrite_output_dir: bool = arg(False, "Replace a trained model already in --output_dir.")
    remove_unused_columns: bool = arg(False, "Keep raw columns: the collator needs them.")
    learning_rate: float = arg(1e-4, "Peak learning rate.")
    logging_steps: float = arg(10, "Log every N steps.")
    per_device_eval_batch_size: int = arg(8, "Batch size for evaluation and generation.")
    deepspeed: dict | str | None = arg(
        None, "DeepSpeed (GPUs): zero2, zero3, zero3_offload (configs shipped with vlmtune) or your JSON config file."
    )
    fsdp: str | None = field(
        default=None,
        metadata={
            "help": "FSDP (GPUs): full_shard or hybrid_shard (configs shipped with vlmtune, the family's layers "
            "wrapped), or bare --fsdp with your own --fsdp_config.",
            "nargs": "?",
            "const": True,
        },
    )
    resume_from_checkpoint: str | None = arg(
        None, "Continue from a checkpoint-N folder, or `latest`: the newest complete checkpoint in --output_dir."
    )
    on_nonfinite: Literal["stop", "skip"] = arg(
        "stop",
        "A NaN/inf loss or gradient norm at a step: stop (default; exit 1 naming the step, nothing saved for it) "
        "or skip (drop that optimizer step, count and report it, go on).",
    )
    dataloader_num_workers: int | None = arg(
        None,
        "Processes that load images and build batches beside training (default: with a GPU, half the CPU "
        "cores up to 4; without, 0: on CPU they would take cores from the model).",
    )
    malloc_mmap_threshold_mb: float = arg(
        2.0,
        "Linux (glibc): host tensors of at least this many MiB get their own memory, returned to the system "
        "when freed, so the heap does not fragment (CPU benchmark: 22%% lower peak RSS, steps about 25%% "
        "slower; see docs/performance.md). 0: glibc's adaptive default. MALLOC_MMAP_THRESHOLD_ in the "
        "environment wins.",
    )
    length_column_name: str = arg(
        "__length__",
        "Per-row token counts for --train_sampling_strategy group_by_length (batches of similar length: less "
        "padding on mixed-length data): by default the counts vlmtune's pre-training check measured, so no "
        "second pass over the data.",
    )
    cache_vision_features: bool = arg(
        False,
        "Compute each image's vision tower + projector features once and reuse them in later epochs and "
        "evaluations (needs both frozen: the LoRA default). Kept in host memory up to --vision_cache_max_gb.",
    )
    vision_cache_max_gb: float = arg(
        4.0, "Host memory for --cache_vision_features; images beyond it are computed every time."
    )
    # ops: preemption (train/guard.py)
    save_on_signal: list[str] = arg(
        None,
        "Signals that mean: finish this step, save a checkpoint, stop (exit 128 + the signal's number); Ctrl-C "
        "always does. Add the one your scheduler warns with, e.g. SIGTERM SIGUSR1 for Slurm's --signal=USR1@120 "
        "(docs/multi-gpu.md, 'Preemption').",
        default_factory=lambda: ["SIGTERM"],
    )

    def __post_init__(self):
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = default_num_workers()
        if not _has_gpu():  # pinned memory only speeds copies to a GPU; without one torch warns every run
            self.dataloader_pin_memory = False
        # Before transformers' own checks, which refuse bf16/tf32 on machines without the hardware.
        compat.fit_training_args(self)
        super().__post_init__()


def default_num_workers() -> int:
    """Data-loader workers: images are decoded and processed while the GPU computes, off the training loop."""
    import os

    if not _has_gpu():
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, FinetuneArguments, VlmTrainingArguments)


@dataclass(frozen=True)
class Check:
    """What one option's value must be: a range (ends open or closed) or one of some choices."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

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


def one_of(*choices: str) -> Check:
    return Check(choices=choices)


# Every option's allowed values, in one table: checked for any argument class that has the field, after
# parsing and before anything loads, so a bad value is named with its flag (or config file and key).
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


class VlmArgumentParser(HfArgumentParser):
    """`HfArgumentParser` that never guesses and never exits: no prefix matching (`--learning_rat` is not
    `--learning_rate`), and every mistake is a `UsageError` naming the flag, or the config file and key
    the value came from, with a "did you mean" for misspelt names.

    `extra_names` maps other names users may type (aliases) to our option names, for the suggestions.
    """

    def __init__(self, classes, extra_names: Mapping[str, str] | None = None, **kwargs):
        super().__init__(classes, allow_abbrev=False, exit_on_error=False, **kwargs)
        self.extra_names = dict(extra_names or {})
        self.sources: dict[str, str] = {}  # option name -> the config file its value came from
        for action in self._actions:
            if action.dest in CHECKS and action.help and action.option_strings:
                action.help += f" [{CHECKS[action.dest].describe()}]"

    def option_names(self) -> list[str]:
        """Every option name without dashes (`learning_rate`, `no_eval_accuracy`, ...)."""
        return sorted({o.lstrip("-") for o in self._option_string_actions if o.startswith("--") and "-" not in o[2:]})

    def where(self, name: str) -> str:
        """How to name an option to the user: its config file and key, or its flag."""
        return f"{self.sources[name]}: key {name!r}" if name in self.sources else f"--{name}"

    def error(self, message: str):
        """argparse calls this for the errors it does not raise (required options); never exit."""
        raise UsageError(f"{message}; `{self.prog} --help` lists the options")

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parse, with its errors and any unknown option turned into a `UsageError`."""
        try:
            namespace, remaining = super().parse_known_args(args, namespace)
        except ArgumentError as err:
            name = (err.argument_name or "").split("/")[0].lstrip("-")
            where = self.where(name) if name else "arguments"
            hint = self._hint(name, err.message)
            raise UsageError(f"{where}: {err.message}{hint}") from None
        if remaining:
            raise UsageError(self.unknown_message(remaining))
        return namespace, remaining

    def _hint(self, name: str, message: str) -> str:
        """What to add to argparse's own message: a close choice, or how to pass a value starting with '-'."""
        if "expected one" in message:
            return f" (a value that starts with '-' goes as --{name}=VALUE)"
        value = re.search(r"invalid choice: '([^']*)'", message)
        action = self._option_string_actions.get(f"--{name}")
        if value and action is not None and action.choices:
            return did_you_mean(value.group(1), [str(c) for c in action.choices])
        return ""

    def unknown_message(self, remaining: list[str]) -> str:
        flags = [a for a in remaining if a.startswith("--") or (a.startswith("-") and not _is_number(a))]
        if not flags:
            return (
                f"unexpected argument {remaining[0]!r}: options are given as --name value "
                f"(e.g. --dataset_name {remaining[0]}); `{self.prog} --help` lists them"
            )
        name = flags[0].split("=", 1)[0].lstrip("-")
        hint = did_you_mean(name, self.option_names(), self.extra_names, "--")
        return f"unknown option --{name}{hint or f'; `{self.prog} --help` lists the options'}"

    def check_keys(self, path: str, keys) -> None:
        """Refuse a config file key that is not an option, naming the file and key."""
        known = self.option_names()
        for key in keys:
            if str(key).replace("-", "_") not in known:
                hint = did_you_mean(str(key), known, self.extra_names)
                raise UsageError(f"{path}: unknown key {key!r}{hint or f'; `{self.prog} --help` lists the options'}")

    def check_values(self, objects) -> None:
        """Apply `CHECKS` and the two-option rules to parsed argument objects."""
        values = {}
        for obj in objects:
            values.update({f.name: getattr(obj, f.name) for f in fields(obj) if f.init})
        for name, value in values.items():
            check = CHECKS.get(name)
            for item in value if isinstance(value, list) else [value]:
                if check is not None and item is not None and not check.allows(item):
                    hint = did_you_mean(str(item), list(check.choices)) if check.choices else ""
                    raise UsageError(f"{self.where(name)} must be {check.describe()}, got {item!r}{hint}")
        for name, problem in _pair_problems(values):
            raise UsageError(f"{self.where(name)} {problem}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def did_you_mean(word: str, known: list[str], extra: Mapping[str, str] | None = None, dashes: str = "") -> str:
    """"; did you mean --x or --y?" for a misspelt option name, or "" when nothing is close.

    Close spellings (difflib), options the word begins (`--lora` for `--lora_r`) and initials (`--lr` for
    `--learning_rate`) count; `extra` maps other known names (aliases) to the option each stands for.
    """
    word = word.replace("-", "_").lower()
    names = {name: name for name in known} | dict(extra or {})
    found = get_close_matches(word, list(names), n=3, cutoff=0.75)
    found += [n for n in names if n.startswith(word) and len(word) >= 3]
    found += [n for n in names if len(word) >= 2 and "".join(p[0] for p in n.split("_") if p) == word]
    targets = list(dict.fromkeys(names[n] for n in found))[:3]
    if not targets:
        return ""
    return "; did you mean " + " or ".join(f"{dashes}{t}" for t in targets) + "?"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the epilog (other tools' option names) kept as written."""


def make_parser(classes=ARGUMENT_CLASSES, **kwargs) -> VlmArgumentParser:
    kwargs.setdefault("epilog", aliases.help_epilog())
    kwargs.setdefault("formatter_class", HelpFormatter)
    return VlmArgumentParser(classes, **kwargs)


def read_config_file(path: str) -> dict:
    """A YAML/JSON config file as a dict, or a `UsageError` naming the file (and line) and the fix."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path}: {'is a folder' if file.is_dir() else 'no such file'}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON: {err.msg}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path}{where}: not valid YAML: {err.problem}") from None
    if values is None or (isinstance(values, str) and not values.strip()):
        raise UsageError(f"{path} is empty; a config file holds option: value lines (e.g. lora_r: 16)")
    if not isinstance(values, dict):
        raise UsageError(
            f"{path}: the top level must be a mapping of option names to values (e.g. lora_r: 16), "
            f"not a {type(values).__name__}"
        )
    return values


def _file_to_argv(values: dict) -> list[str]:
    """Turn a config file's values into `--key value` pairs placed before the command line's own."""
    argv: list[str] = []
    for key, value in values.items():
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def _config_files(argv: list[str]) -> list[str]:
    """Take the config files out of `argv`: a leading `.yaml`/`.yml`/`.json` path and any `--config FILE`."""
    files = []
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        files.append(argv.pop(0))
    while "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise UsageError("--config needs a file: --config run.yaml")
        files.append(argv[i + 1])
        del argv[i : i + 2]
    return files


def _option_names(tokens: list[str]) -> list[str]:
    """The option names in `--name value ...` tokens (`--name=value` too)."""
    return [t[2:].split("=", 1)[0].replace("-", "_") for t in tokens if t.startswith("--")]


def parse_args(
    argv: list[str], classes=ARGUMENT_CLASSES, prog: str | None = None, extra_names: Mapping[str, str] | None = None
) -> tuple:
    """Parse `argv` into the argument objects; a leading `.yaml`/`.yml`/`.json` path (or `--config FILE`)
    supplies defaults. Other tools' option names are translated first (`aliases`, one warning per name);
    every mistake is a `UsageError` naming the flag, or the file and key; `extra_names` (other names ->
    option names) widen the "did you mean" suggestions beyond the alias table."""
    argv = list(argv)
    parser = make_parser(classes, prog=prog, extra_names={**aliases.suggestion_names(), **(extra_names or {})})
    known = set(parser.option_names())
    train_known = known if classes is ARGUMENT_CLASSES else set(make_parser().option_names())
    warned: set[str] = set()  # each foreign name is explained once per run
    file_argv: list[str] = []
    for path in _config_files(argv):
        values = read_config_file(path)
        # Foreign keys are translated below; a training config's own keys are dropped for other commands.
        parser.check_keys(path, [k for k in values if str(k) not in aliases.BY_NAME and str(k) not in train_known])
        tokens = aliases.translate(_file_to_argv(values), known, warned)
        tokens = aliases.shared_config(tokens, known, train_known, path)
        parser.sources.update({name: path for name in _option_names(tokens)})
        file_argv += tokens
    argv = aliases.translate(argv, known, warned)
    for name in _option_names(argv):  # a value the command line gives is not the file's
        parser.sources.pop(name, None)
    # Before TrainingArguments: it opens the DeepSpeed/FSDP files and sets up the process group.
    args = resolve_launch_shortcuts(file_argv + argv)
    prepare_launch_environment()
    try:
        parsed = parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)
    except UsageError:
        raise
    except ValueError as err:  # TrainingArguments' own checks (in its __post_init__)
        message = " ".join(str(err).split())  # one paragraph, whatever transformers' line breaks
        raise UsageError(f"{message} (`{parser.prog} --help` lists the options)") from None
    parser.check_values(parsed)
    for obj in parsed:  # what the user wrote, before transformers sets do_eval from --eval_strategy
        if isinstance(obj, TrainingArguments):
            obj.do_train_given, obj.do_eval_given = compat.given_bools(args, ("do_train", "do_eval"))
    return parsed


def to_dict(*dataclass_objects) -> dict:
    """All arguments of a run as one JSON-safe dict (saved next to the model as the resolved config)."""
    out: dict = {}
    for obj in dataclass_objects:
        data = obj.to_dict() if hasattr(obj, "to_dict") else vars(obj)
        out.update({k: v for k, v in data.items() if not k.startswith("_")})
    return json.loads(json.dumps(out, default=str))
