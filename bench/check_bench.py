"""What the pre-training check costs per row, and for 100k rows, in one run on the same data.

Three ways to check every row of a CSV of 3-turn conversations with a real-sized JPEG photo each
(Qwen2-VL processor with the real checkpoints' pixel range):

- baseline: the check as it was (conversation + every image decoded in full; no chat template);
- vlmtune's check (no `--max_seq_length`): conversation + chat template + trained spans + placeholder
  count, images read by header only, image tokens from the processor's arithmetic;
- with `--max_seq_length`: the same, plus the full processor for rows whose estimate is near or over the
  limit (none here);
- for scale: the full processor on every row (what a check that encodes every row costs).

    python bench/check_bench.py [--rows 2000] [--image_size 1024x768]
"""

from __future__ import annotations

import argparse
import csv
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image

from vlmtune.config import DataArguments
from vlmtune.data.collate import VlmCollator
from vlmtune.data.sources import load_splits
from vlmtune.data.splits import build_splits
from vlmtune.models.loading import load_processing
from vlmtune.models.tiny import build_tiny_model

TURNS = [
    ("Describe the photo in one sentence.", "A red tram crossing a bridge at dusk."),
    ("What colour is the tram?", "Red, with a white stripe."),
    ("Is it raining?", "No, the street is dry."),
]


def write_data(folder: Path, rows: int, size: tuple[int, int]) -> Path:
    """`rows` rows over 50 distinct JPEG files (decoding cost is per row either way)."""
    for i in range(50):
        Image.new("RGB", size, (5 * i, 90, 200 - 3 * i)).save(folder / f"{i}.jpg", quality=90)
    path = folder / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "prompt", "response"])
        for i in range(rows):
            question, answer = TURNS[i % 3]
            writer.writerow([f"{i % 50}.jpg", f"{question} (#{i})", answer])
    return path


def timed(path: Path, facts, processor, **flags) -> float:
    args = DataArguments(dataset_name=str(path), val_split_ratio=0.0, **flags)
    start = time.perf_counter()
    build_splits(args, facts, processor=processor)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--image_size", default="1024x768")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = tuple(int(v) for v in args.image_size.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        processor, spec = load_processing(str(build_tiny_model("qwen2_vl", Path(folder) / "model")))
        processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
        path = write_data(Path(folder), args.rows, size)
        facts = spec.encoding
        results = {
            "baseline: decode every image, no template": _baseline(path, facts),
            "vlmtune check (template, header-only images)": timed(path, facts, processor),
            "vlmtune check with --max_seq_length 8192": timed(path, facts, processor, max_seq_length=8192),
            "full processor on every row (200 rows, scaled)": _full(path, facts, processor, 200) * args.rows / 200,
        }
    base = next(iter(results.values()))
    print(f"check benchmark, {date.today()}, {platform.machine()}, 1 thread, {args.rows} rows, {args.image_size} JPEG")
    print("| check | s | ms/row | 100k rows (min) | vs baseline |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in results.items():
        per_row = 1000 * seconds / args.rows
        print(f"| {name} | {seconds:.1f} | {per_row:.2f} | {per_row * 100_000 / 60_000:.1f} | {seconds / base:.2f}x |")


def _baseline(path: Path, facts) -> float:
    """The old check: each row's conversation and its images decoded in full, nothing rendered."""
    splits = build_splits(DataArguments(dataset_name=str(path), val_split_ratio=0.0), facts)  # schema + preparer
    rows = load_splits(str(path)).splits["train"]
    start = time.perf_counter()
    for i, row in enumerate(rows):
        conv = splits.preparer.conversation(row, i)
        splits.preparer.load_images(conv)
    return time.perf_counter() - start


def _full(path: Path, facts, processor, rows: int) -> float:
    """`rows` rows encoded exactly as training encodes them (images decoded, image processor run)."""
    splits = build_splits(DataArguments(dataset_name=str(path), val_split_ratio=0.0), facts)
    collator = VlmCollator(processor, splits.preparer)
    chosen = list(load_splits(str(path)).splits["train"].select(range(rows)))
    start = time.perf_counter()
    for i, row in enumerate(chosen):
        collator.encode({**row, "__index__": i})
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
