"""Command-line and config-file arguments, as dataclasses parsed by transformers' `HfArgumentParser`.

One definition serves `--flags`, YAML and JSON files and `--help`. Every `transformers.TrainingArguments`
field passes through by name; vlmtune's own fields are grouped ahead of them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from . import aliases, compat


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


@dataclass
class FinetuneArguments:
    _argument_group_name = "fine-tuning"

    finetuning_type: str = arg("lora", "lora (default), dora (weight-decomposed LoRA) or full.")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int = arg(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA path.")
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

    def __post_init__(self):
        # Before transformers' own checks, which refuse bf16/tf32 on machines without the hardware.
        compat.fit_training_args(self)
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, FinetuneArguments, VlmTrainingArguments)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the epilog (other tools' option names) kept as written."""


def make_parser(classes=ARGUMENT_CLASSES, **kwargs) -> HfArgumentParser:
    kwargs.setdefault("epilog", aliases.help_epilog())
    kwargs.setdefault("formatter_class", HelpFormatter)
    return HfArgumentParser(classes, **kwargs)


def flag_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every `--flag` the parser takes, without dashes."""
    return {s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")}


def _file_to_argv(path: str) -> list[str]:
    """Turn a YAML/JSON config into `--key value` pairs placed before the command line's own."""
    text = Path(path).read_text()
    values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of argument names to values")
    argv: list[str] = []
    for key, value in values.items():
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def parse_args(argv: list[str], classes=ARGUMENT_CLASSES) -> tuple:
    """Parse `argv`; a leading `.yaml`/`.yml`/`.json` path (or `--config FILE`) supplies defaults."""
    argv = list(argv)
    files = []
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        files.append(argv.pop(0))
    while "--config" in argv:
        i = argv.index("--config")
        files.append(argv[i + 1])
        del argv[i : i + 2]
    parser = make_parser(classes)
    known = flag_names(parser)
    train_known = known if classes is ARGUMENT_CLASSES else flag_names(make_parser())
    warned: set[str] = set()  # each foreign name is explained once per run
    argv = aliases.translate(argv, known, warned)
    for f in reversed(files):
        argv = aliases.shared_config(aliases.translate(_file_to_argv(f), known, warned), known, train_known, f) + argv
    parsed = parser.parse_args_into_dataclasses(args=argv)
    for obj in parsed:  # what the user wrote, before transformers sets do_eval from --eval_strategy
        if isinstance(obj, TrainingArguments):
            obj.do_train_given, obj.do_eval_given = compat.given_bools(argv, ("do_train", "do_eval"))
    return parsed


def to_dict(*dataclass_objects) -> dict:
    """All arguments of a run as one JSON-safe dict (saved next to the model as the resolved config)."""
    out: dict = {}
    for obj in dataclass_objects:
        data = obj.to_dict() if hasattr(obj, "to_dict") else vars(obj)
        out.update({k: v for k, v in data.items() if not k.startswith("_")})
    return json.loads(json.dumps(out, default=str))
