"""Packed vs padded training, samples/s on mixed-length data: what `--packing` buys, in one run.

Chart and document QA mixes many short samples with a few long ones; a padded batch is as long as its
longest sample, so most of its tokens are padding. Every side trains the same rows (shapes images with
prompts of 0 to 60 filler sentences: mostly short, some long), one epoch, through `vlmtune train`'s own
path, with the same `--max_seq_length`, seed and learning rate, on a model of the chosen family whose
language model is widened so that compute grows with tokens as in a real model:

- `padded`: `--per_device_train_batch_size B`, random batches (transformers' default sampler);
- `grouped`: the same, batches of similar lengths (`--train_sampling_strategy group_by_length` on the
  check's token bounds), the usual way to cut padding without packing;
- `packed`: `--packing`, rows of at most `--max_seq_length` tokens, and a batch of as many packed rows as
  hold about B samples, so every side takes about the same number of optimizer steps over the same tokens.

A warm-up run of each side comes first (untimed); then the sides alternate for `--repeats` rounds. Each
run is timed from the start of training to the end of its last step (model loading and the data check
excluded); samples/s is rows / time. Ratios are taken within each round, and their medians reported.
The last line reads `packed_speedup=<x>`: packed samples/s over padded samples/s.

    python bench/pack_bench.py --family llava [--rows 96] [--batch_size 8] [--capacity 512] [--repeats 3]

Packed rows are only correct for the Qwen families with the model side of packing (per-sample
multimodal rotary positions); its speed does not depend on that.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, TrainerCallback

from vlmtune.config import parse_args
from vlmtune.data.synthetic import COLOURS, SHAPES, draw_shape
from vlmtune.models.tiny import build_tiny_model
from vlmtune.train.run import run_training

FILLER = "Look at the picture carefully before you answer. "


def build_model(family: str, folder: Path, hidden: int, layers: int) -> Path:
    """The family's tiny model and processor, with its language model widened to `hidden` x `layers`."""
    build_tiny_model(family, folder)
    config = AutoConfig.from_pretrained(folder)
    text = config.get_text_config()
    heads, old_width = hidden // 64, text.hidden_size
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, 4 * hidden, layers
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = heads, heads, 64
    if getattr(text, "layer_types", None):  # one entry per layer (sliding or full attention)
        text.layer_types = [text.layer_types[0]] * layers
    rope = getattr(text, "rope_parameters", None) or {}
    if "mrope_section" in rope:  # Qwen: the sections must sum to head_dim / 2
        rope["mrope_section"] = [8, 12, 12]
    vision = getattr(config, "vision_config", None)
    for name in ("out_hidden_size", "hidden_size"):  # Qwen's merger projects into the language model's width
        if getattr(vision, name, None) == old_width:
            setattr(vision, name, hidden)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(folder)
    return folder


def write_data(folder: Path, rows: int, seed: int = 0) -> Path:
    """Shapes questions with mixed prompt lengths: 70% short (0-3 fillers), 30% long (10-60)."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "prompt", "response"])
        for i in range(rows):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            draw_shape(colour, shape, rng=rng).save(folder / f"images/{i:04d}.png")
            fillers = rng.randint(0, 3) if rng.random() < 0.7 else rng.randint(10, 60)
            writer.writerow([f"images/{i:04d}.png", FILLER * fillers + "What colour is the shape?", colour])
    return path


class StepTimer(TrainerCallback):
    """Seconds from the start of training to the end of its last step (loading and checks excluded)."""

    def __init__(self):
        self.start = self.end = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()


def run(side: str, model: Path, data: Path, out: Path, args, packed_batch: int) -> dict:
    """One epoch of `side` and its samples/s."""
    argv = [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
        "--overwrite_output_dir", "true", "--val_split_ratio", "0", "--eval_accuracy", "false",
        "--save_strategy", "no", "--report_to", "none", "--num_train_epochs", "1", "--seed", "0",
        "--max_seq_length", str(args.capacity), "--use_cpu", str(args.device == "cpu").lower(),
        "--logging_steps", "1000", "--disable_tqdm", "true",
    ]  # fmt: skip
    if side == "packed":
        argv += ["--packing", "true", "--per_device_train_batch_size", str(packed_batch)]
    else:
        argv += ["--per_device_train_batch_size", str(args.batch_size)]
        strategy = "group_by_length" if side == "grouped" else "random"
        argv += ["--train_sampling_strategy", strategy, "--length_column_name", "__length__"]
    timer = StepTimer()
    result = run_training(*parse_args(argv), callbacks=[timer])
    seconds = timer.end - timer.start
    steps = result.trainer.state.global_step
    return {"side": side, "steps": steps, "seconds": round(seconds, 2), "samples_per_s": args.rows / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2_vl", help="tiny family (vlmtune tiny-model --family)")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=8, help="samples per padded batch")
    parser.add_argument("--capacity", type=int, default=512, help="--max_seq_length: longest sample, packed row")
    parser.add_argument("--hidden", type=int, default=256, help="language model width")
    parser.add_argument("--layers", type=int, default=4, help="language model layers")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds after the warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workdir", default=None, help="keep the model and data here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pack_bench_"))
    model = build_model(args.family, work / "model", args.hidden, args.layers)
    data = write_data(work / "data", args.rows)

    from vlmtune.data.splits import build_splits
    from vlmtune.models.loading import load_processing

    processor, spec = load_processing(str(model))
    _, data_args, _, _ = parse_args(["--dataset_name", str(data), "--max_seq_length", str(args.capacity),
                                     "--val_split_ratio", "0", "--output_dir", str(work / "o")])  # fmt: skip
    bounds = build_splits(data_args, spec.encoding, processor=processor).train["__length__"]
    mean = statistics.mean(bounds)
    packed_batch = max(1, round(args.batch_size * mean / args.capacity))
    print(f"{args.rows} rows, tokens (bounds) min/mean/max {min(bounds)}/{mean:.0f}/{max(bounds)}; "
          f"padded batch {args.batch_size} samples, packed batch {packed_batch} rows of {args.capacity}")  # fmt: skip

    sides = ("padded", "grouped", "packed")
    for side in sides:  # warm-up: caches, allocator, lazy imports
        run(side, model, data, work / f"out_{side}", args, packed_batch)
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for round_ in range(args.repeats):
        for side in sides if round_ % 2 == 0 else reversed(sides):
            results[side].append(run(side, model, data, work / f"out_{side}", args, packed_batch))
            print(json.dumps(results[side][-1]))
    report(args, results)


def report(args, results: dict[str, list[dict]]) -> None:
    """Ratios within each round (its runs are minutes apart, so a change in the machine's load between rounds
    cancels out), then their medians."""
    rounds = range(len(results["padded"]))
    ratio = {side: [runs[i]["samples_per_s"] / results["padded"][i]["samples_per_s"] for i in rounds]
             for side, runs in results.items()}  # fmt: skip
    over_grouped = [results["packed"][i]["samples_per_s"] / results["grouped"][i]["samples_per_s"] for i in rounds]
    print(f"\n{date.today()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"family {args.family}, hidden {args.hidden} x {args.layers} layers, {args.threads} threads")  # fmt: skip
    print("| side | optimizer steps | samples/s (median) | vs padded, per round | vs padded (median) |")
    print("| --- | ---: | ---: | --- | ---: |")
    for side, runs in results.items():
        median = statistics.median(r["samples_per_s"] for r in runs)
        per_round = " ".join(f"{r:.2f}" for r in ratio[side])
        print(f"| {side} | {runs[0]['steps']} | {median:.2f} | {per_round} | {statistics.median(ratio[side]):.2f}x |")
    print(f"packed_vs_grouped={statistics.median(over_grouped):.2f}")
    print(f"packed_speedup={statistics.median(ratio['packed']):.2f}")


if __name__ == "__main__":
    main()
