"""What `--cache_vision_features` buys: epoch-2 step time and peak RSS of `vlmtune train`, with and without.

Same model, data and settings as `bench/compare.py --device cpu` (reduced Qwen2-VL, real vocabulary,
448 px charts, batch 4, LoRA r=8, vlmtune's defaults), trained for 2 epochs; each run is its own process,
the two alternate, medians over the repeats. Epoch 1 fills the cache; epoch 2 reads it.

    python bench/vision_cache_bench.py --workdir /tmp/benchw --rows 16 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402 - the benchmark's model and data builders


def worker(args) -> None:
    import torch
    from transformers import TrainerCallback

    from vlmtune.config import parse_args
    from vlmtune.train.run import run_training

    torch.set_num_threads(args.threads)

    class EpochTimes(TrainerCallback):
        times: dict[int, list[float]] = {}

        def on_step_begin(self, a, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kwargs):
            epoch = 1 + int((state.global_step - 1) // (args.rows // args.batch))
            self.times.setdefault(epoch, []).append(time.perf_counter() - self.start)

    timer = EpochTimes()
    with tempfile.TemporaryDirectory() as out:
        argv = ["--model_name_or_path", args.model_dir, "--dataset_name", args.data_file, "--output_dir", out]
        argv += ["--num_train_epochs", "2", "--per_device_train_batch_size", str(args.batch), "--lora_r", "8"]
        argv += ["--val_split_ratio", "0", "--eval_accuracy", "false", "--save_strategy", "no", "--use_cpu", "true"]
        argv += ["--report_to", "none", "--max_train_samples", str(args.rows), "--dataloader_drop_last", "true"]
        argv += ["--cache_vision_features", "true"] if args.cached else []
        run_training(*parse_args(argv), callbacks=[timer])
    result = {
        "epoch1": statistics.median(timer.times[1][1:]),  # the first step is a warm-up
        "epoch2": statistics.median(timer.times[2]),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/benchw")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--data_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    work = Path(args.workdir)
    model_dir, data_file = work / "qwen2_vl_reduced", work / "data" / "train.jsonl"
    if not (model_dir / "config.json").exists():
        compare.build_model("reduced", model_dir, "float32")
    if not data_file.exists() or sum(1 for _ in open(data_file)) < args.rows:
        compare.write_data(work / "data", args.rows, 448)
    runs: dict[str, list[dict]] = {"plain": [], "cached": []}
    for r in range(args.repeats):
        for side in ("plain", "cached") if r % 2 == 0 else ("cached", "plain"):
            cmd = [sys.executable, __file__, "--worker", "--model_dir", str(model_dir), "--data_file", str(data_file)]
            cmd += ["--rows", str(args.rows), "--batch", str(args.batch), "--threads", str(args.threads)]
            cmd += ["--cached"] if side == "cached" else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            runs[side].append(json.loads(lines[-1][7:]))
            print(side, runs[side][-1], flush=True)
    print(f"\n{'':<8}{'epoch 1 s/step':>16}{'epoch 2 s/step':>16}{'peak RSS':>12}")
    med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in runs}
    for side, m in med.items():
        print(f"{side:<8}{m['epoch1']:>16.2f}{m['epoch2']:>16.2f}{m['peak_rss'] / 2**20:>8.0f} MiB")
    print(f"epoch2_speedup={med['plain']['epoch2'] / med['cached']['epoch2']:.2f}")


if __name__ == "__main__":
    main()
