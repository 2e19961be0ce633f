"""`vlmtune dpo` vs TRL's own `DPOTrainer` for a VLM, side by side: step time and peak memory.

The baseline is TRL's `DPOTrainer` as its docs show for vision-language models (`sides/trl_dpo.py`):
the processor as `processing_class`, conversational pairs with PIL images, a PEFT LoRA so the reference
is the policy with the adapter disabled. vlmtune runs `vlmtune dpo`'s own path (`sides/vlmtune_dpo.py`)
with its defaults. Both get the same Qwen2-VL (`workload.py`: reduced on CPU, the real 2B/7B shapes with
random weights on CUDA), the same chart-QA pairs (the right answer chosen, a wrong one rejected), batch,
steps, LoRA rank and learning rate; both use sigmoid DPO with beta 0.1. Otherwise each side keeps its
defaults: TRL checkpoints gradients (`DPOConfig`'s default), vlmtune does not unless asked
(`--vlmtune_args --gradient_checkpointing true` compares like with like). LoRA targets differ by
design: TRL's example adapts `all-linear` (vision tower included), vlmtune the language model's linear
layers only (`--trl_lora_targets q_proj,k_proj,...` gives TRL the same).

Measured by `harness.py` like `compare.py`: fresh processes, warm-up steps untimed, ABBA order, medians.
The last line reads `speedup=<x> memory=<y>`: vlmtune's pairs/s and peak memory over TRL's.

    python bench/dpo_compare.py --device cpu --repeats 1 --steps 2 --warmup 1
    python bench/dpo_compare.py --device cuda --model 2b --batch 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import harness
from sides import trl_dpo, vlmtune_dpo
from workload import build_model, write_preference_data

SIDES = {"trl": trl_dpo, "vlmtune": vlmtune_dpo}
WORKER_OPTIONS = (
    "model_dir",
    "data_file",
    "device",
    "batch",
    "steps",
    "warmup",
    "lora_r",
    "learning_rate",
    "trl_lora_targets",
    "threads",
)


def worker(args) -> None:
    """One measured run in this process; prints the result line the harness reads."""
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    timer = harness.step_timer(args.warmup, args.steps)
    with tempfile.TemporaryDirectory() as out_dir:
        SIDES[args.worker].run(args, timer, out_dir)
    harness.worker_result(timer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("reduced", "2b", "7b"), default=None, help="reduced (CPU), 2b (GPU)")
    parser.add_argument("--batch", type=int, default=2, help="pairs per device per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side (alternating)")
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=5e-6)
    parser.add_argument("--trl_lora_targets", default="all-linear", help="TRL's LoRA targets (comma-separated)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vlmtune_args", nargs=argparse.REMAINDER, default=[], help="extra `vlmtune dpo` flags")
    parser.add_argument("--workdir", default=None, help="keep the model and data here (default: a temporary folder)")
    parser.add_argument("--worker", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--data_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
        data_file = write_preference_data(work / "data", args.batch * (args.warmup + args.steps), args.image_size)
        args.model_dir, args.data_file = str(model_dir), str(data_file)
        print(
            f"bench/dpo_compare.py: Qwen2-VL {size}, {args.image_size} px images, LoRA r={args.lora_r} "
            f"(TRL: {args.trl_lora_targets}), batch {args.batch} pairs, {args.steps} timed steps after "
            f"{args.warmup} warm-up, {args.repeats} runs per side; {harness.device_line(args.device, args.threads)}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
        )
        options = {key: getattr(args, key) for key in WORKER_OPTIONS}
        runs = harness.alternate(
            tuple(SIDES),
            args.repeats,
            lambda side: harness.measure(harness.worker_command(__file__, side, options, args.vlmtune_args), side),
            args.steps,
        )
        if not runs:
            sys.exit("a side failed; see its output above")
        rows = harness.summarise(runs, harness.Workload(args.batch, args.steps, args.device), {})
        harness.print_table(rows, runs)
        speedup, memory = harness.ratios(rows, "trl", "vlmtune")
        print(f"speedup={speedup:.2f} memory={memory:.2f}")


if __name__ == "__main__":
    main()
