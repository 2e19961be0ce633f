"""vlmtune train vs the TRL recipe users copy (seed 004), side by side: speed and peak memory.

The baseline reimplements the seed-004 notebook faithfully with what is installed: TRL `SFTTrainer`, its
collator (chat template + processor, labels = input ids with padding and image tokens masked, so system
and user text is trained too), LoRA r=8 on q_proj/v_proj (alpha 16, dropout 0.05), and the notebook's
`SFTConfig` (gradient checkpointing, non-reentrant; fused AdamW; constant 2e-4; max_grad_norm 0.3;
warmup 3%; everything else SFTConfig's defaults). vlmtune runs `vlmtune train`'s own path
(argument parsing, data loading, `VlmTrainer`, collator) with its defaults. Both get the same model,
rows, images, batch size and number of steps.

Deviations from the notebook, the same for both sides: no 4-bit quantisation, no evaluation, saving or
hub upload, no gradient accumulation (the notebook's 8 would multiply every step's time by 8 for both);
on CPU fp32 instead of bf16 (on GPU: bf16 as the notebook).

Each measured run is a fresh subprocess (its own peak RSS, plus the largest of its finished children's,
such as data-loader workers), the two sides alternate (ABBA order), the first steps of each run are a
warm-up that is not timed, and the medians over the repeats are reported. vlmtune runs with all its
defaults, its allocator setting included (`--malloc_mmap_threshold_mb`, docs/performance.md); pass
`--vlmtune_args --malloc_mmap_threshold_mb 0` to measure without it.

    python bench/compare.py --device cpu                 # reduced Qwen2-VL, real vocabulary, 448 px, batch 4
    python bench/compare.py --device cuda --model 2b     # real Qwen2-VL-2B configuration, random weights
    python bench/compare.py --device cuda --model 7b --batch_sizes 4 8 16

Layout: `workload.py` builds the model and the chart rows, `sides/trl_recipe.py` and
`sides/vlmtune_train.py` are the two sides, `harness.py` measures (fresh processes, ABBA order, medians,
ratios); this file only wires them together.

The last line reads `speedup=<x> memory=<y>`: vlmtune's samples/s and peak memory over the recipe's.
The CUDA mode has not been run yet (no GPU was available when it was written).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import harness
from sides import trl_recipe, vlmtune_train
from workload import build_model, write_data

SIDES = {"recipe": trl_recipe, "vlmtune": vlmtune_train}
WORKER_OPTIONS = ("model_dir", "data_file", "device", "batch", "steps", "warmup", "lora_r", "threads")


def worker(args) -> None:
    """One measured run in this process; prints the result line the harness reads."""
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    timer = harness.step_timer(args.warmup, args.steps)
    with tempfile.TemporaryDirectory() as out_dir:
        SIDES[args.worker].run(args, timer, out_dir)
    harness.worker_result(timer)


def tokens_per_sample(model_dir: str, data_file: Path, n: int) -> dict[str, dict]:
    """Mean tokens and trained tokens (labels scored after the shift) per sample, for each side's collator."""
    out = {}
    for name, side in SIDES.items():
        batch = side.sample_batch(model_dir, data_file, n)
        rows = len(batch["attention_mask"])  # (fewer than n where the data file is shorter)
        out[name] = {
            "tokens": float(batch["attention_mask"].sum()) / rows,
            "trained": float((batch["labels"][:, 1:] != -100).sum()) / rows,
        }
    return out


def report(args, runs: dict[str, list[dict]], tokens: dict, batch: int) -> tuple[float, float]:
    work = harness.Workload(batch=batch, steps=args.steps, device=args.device)
    rows = harness.summarise(runs, work, {side: t["trained"] for side, t in tokens.items()})
    harness.print_table(rows, runs)
    print(
        f"trained tokens per sample: recipe {tokens['recipe']['trained']:.0f} (system and user text too), "
        f"vlmtune {tokens['vlmtune']['trained']:.0f} (answers); tokens per sample {tokens['vlmtune']['tokens']:.0f}"
    )
    if args.device == "cuda":
        harness.print_mfu(rows, {side: t["tokens"] for side, t in tokens.items()}, args.model_dir)
    return harness.ratios(rows, "recipe", "vlmtune")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--model", choices=("reduced", "2b", "7b"), default=None, help="default: reduced on CPU, 2b on CUDA"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--batch_sizes",
        type=int,
        nargs="*",
        default=None,
        help="CUDA: measure each; the largest both fit is the headline",
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (alternating)")
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument(
        "--lora_r", type=int, default=None, help="LoRA rank for both (default: 8 on CPU as the recipe, 16 on CUDA)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--vlmtune_args", nargs=argparse.REMAINDER, default=[], help="extra `vlmtune train` flags (ablations)"
    )
    parser.add_argument("--workdir", default=None, help="keep the model and data here (default: a temporary folder)")
    # internal: one measured run
    parser.add_argument("--worker", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--data_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lora_r is None:
        args.lora_r = 16 if args.device == "cuda" else 8
    if args.worker:
        return worker(args)

    import torch
    import transformers
    import trl

    size = args.model or ("2b" if args.device == "cuda" else "reduced")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model_dir = work / f"qwen2_vl_{size}"
        if not (model_dir / "config.json").exists():
            build_model(size, model_dir, "bfloat16" if args.device == "cuda" else "float32")
        batch_sizes = args.batch_sizes or [args.batch]
        data_file = work / "data" / "train.jsonl"
        n_rows = max(batch_sizes) * (args.warmup + args.steps)
        if not data_file.exists() or sum(1 for _ in open(data_file)) < n_rows:
            write_data(work / "data", n_rows, args.image_size)
        args.model_dir, args.data_file = str(model_dir), str(data_file)
        tokens = tokens_per_sample(args.model_dir, data_file, 8)

        print(
            f"bench/compare.py: Qwen2-VL {size} (vocabulary 151,936), {args.image_size} px images, "
            f"LoRA r={args.lora_r}, "
            f"{args.steps} timed steps after {args.warmup} warm-up, {args.repeats} runs per side; "
            f"{harness.device_line(args.device, args.threads)}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
        )
        result = None
        for batch in batch_sizes:
            args.batch = batch
            options = {key: getattr(args, key) for key in WORKER_OPTIONS}

            def run_side(side: str, options=options) -> dict:
                command = harness.worker_command(__file__, side, options, args.vlmtune_args)
                return harness.measure(command, side)

            runs = harness.alternate(tuple(SIDES), args.repeats, run_side, args.steps, tag=f"batch {batch} ")
            if not runs:
                print(f"batch {batch}: does not fit for both; stopping here")
                break
            print(f"\nbatch {batch}:")
            result = report(args, runs, tokens, batch)
        if result is None:
            sys.exit("no batch size ran for both sides")
        print(f"speedup={result[0]:.2f} memory={result[1]:.2f}")


if __name__ == "__main__":
    main()
