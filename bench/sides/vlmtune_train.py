"""vlmtune's side: `vlmtune train`'s own path (argument parsing, data loading, `VlmTrainer`, collator)
with its defaults, on the same model, rows, images, batch size and number of steps as the baseline."""

from __future__ import annotations

from pathlib import Path


def sample_batch(model_dir: str, data_file: Path, n: int) -> dict:
    """vlmtune's collator's batch of the first `n` rows (for counting tokens and trained tokens)."""
    from datasets import load_dataset

    from vlmtune.data.collate import VlmCollator
    from vlmtune.data.prepare import Preparer
    from vlmtune.data.schema import detect_schema
    from vlmtune.models.loading import load_processing

    processor, spec = load_processing(model_dir)
    rows = [dict(r, __index__=i) for i, r in enumerate(load_dataset("json", data_files=str(data_file))["train"])][:n]
    schema = detect_schema(["messages", "images"], source=str(data_file))
    preparer = Preparer(schema, spec.encoding)
    preparer.images.folders[str(data_file)] = data_file.parent
    for row in rows:
        row["__source__"] = str(data_file)
    return VlmCollator(processor, preparer)(rows)


def run(args, timer, out_dir: str) -> None:
    """`vlmtune train` for `args.warmup + args.steps` steps, timed by `timer`."""
    from vlmtune.config import parse_args
    from vlmtune.train.run import run_training

    argv = [
        "--model_name_or_path",
        args.model_dir,
        "--dataset_name",
        args.data_file,
        "--dataset_text_field",
        "messages",
        "--dataset_image_field",
        "images",
        "--output_dir",
        out_dir,
        "--max_steps",
        str(args.warmup + args.steps),
        "--per_device_train_batch_size",
        str(args.batch),
        "--val_split_ratio",
        "0",
        "--eval_accuracy",
        "false",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--logging_steps",
        "10",
        "--lora_r",
        str(args.lora_r),
    ]
    argv += ["--bf16", "true"] if args.device == "cuda" else ["--use_cpu", "true"]
    run_training(*parse_args(argv + args.vlmtune_args), callbacks=[timer])
