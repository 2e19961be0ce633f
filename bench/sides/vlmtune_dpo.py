"""vlmtune's side: `vlmtune dpo`'s own path (argument parsing, pair loading and encoding, TRL's
`DPOTrainer` under vlmtune's trainer, reference = adapter disabled) with its defaults, on the same model,
pairs, batch, steps and learning rate as the baseline."""

from __future__ import annotations


def run(args, timer, out_dir: str) -> None:
    """`vlmtune dpo` for `args.warmup + args.steps` steps, timed by `timer`."""
    from vlmtune.config import TRAINING_ARGUMENTS, DpoArguments, parse_args
    from vlmtune.train.preference import run_dpo

    argv = [
        "--model_name_or_path",
        args.model_dir,
        "--dataset_name",
        args.data_file,
        "--output_dir",
        out_dir,
        "--max_steps",
        str(args.warmup + args.steps),
        "--per_device_train_batch_size",
        str(args.batch),
        "--learning_rate",
        str(args.learning_rate),
        "--val_split_ratio",
        "0",
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
    run_dpo(*parse_args(argv + args.vlmtune_args, (*TRAINING_ARGUMENTS, DpoArguments)), callbacks=[timer])
