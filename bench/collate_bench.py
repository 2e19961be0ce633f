"""What assistant-only labels cost in the data path, against the TRL recipe's collator, in one run.

Both collators get the same rows (multi-turn conversations, real-sized images) and the same Qwen2-VL
processor with the real checkpoints' image settings (14-pixel patches, 2x2 merge, default pixel range),
so image processing is as expensive as in a real run. The baseline is the TRL recipe users copy (seed 004):
chat template + processor, labels = input ids with padding and image tokens masked, which also trains
on the prompt. vlmtune renders the template per assistant turn and aligns the spans to token ids.
The ratio says how much slower (or not) correct labels make collation; training steps on a GPU take far
longer than either, with `dataloader_num_workers` hiding collation entirely.

    python bench/collate_bench.py [--batches 20] [--batch_size 8] [--image_size 448]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date

import torch
from PIL import Image

from vlmtune.data.collate import VlmCollator
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.data.prepare import Preparer
from vlmtune.data.schema import detect_schema
from vlmtune.models.loading import load_processing
from vlmtune.models.tiny import build_tiny_model

TURNS = [
    ("Describe the chart in one sentence.", "A bar chart of quarterly revenue rising from 12 to 31 million."),
    ("Which quarter grew fastest?", "The third quarter, up 9 million on the second."),
    ("And what is the total for the year?", "The four quarters add up to 84 million."),
]


def make_rows(n: int, image_size: int) -> list[dict]:
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": [{"type": "text", "text": "You read charts for analysts."}]}]
        for turn, (question, answer) in enumerate(TURNS):
            content = ([{"type": "image"}] if turn == 0 else []) + [{"type": "text", "text": question}]
            messages += [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
        colour = (37 * i % 255, 91 * i % 255, 53 * i % 255)
        rows.append(
            {"__index__": i, "messages": messages, "images": [Image.new("RGB", (image_size, image_size), colour)]}
        )
    return rows


class RecipeCollator:
    """The TRL recipe's collator: prompt tokens are trained; padding and image tokens are masked."""

    def __init__(self, processor):
        self.processor = processor
        self.masked = {processor.tokenizer.pad_token_id, processor.image_token_id}

    def __call__(self, rows: list[dict]) -> dict:
        texts = [self.processor.apply_chat_template(r["messages"], tokenize=False) for r in rows]
        batch = self.processor(text=texts, images=[r["images"] for r in rows], return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        for token in self.masked:
            labels[labels == token] = IGNORE_INDEX
        batch["labels"] = labels
        return batch


def seconds_per_batch(collate, rows: list[dict], batch_size: int, batches: int) -> tuple[float, dict]:
    collate(rows[:batch_size])  # warm-up
    times, batch = [], None
    for b in range(batches):
        chunk = rows[(b * batch_size) % len(rows) :][:batch_size]
        start = time.perf_counter()
        batch = collate(chunk)
        times.append(time.perf_counter() - start)
    return statistics.median(times), batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=448)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as folder:
        processor, spec = load_processing(str(build_tiny_model("qwen2_vl", folder)))
    # The real checkpoints' pixel range (Qwen/Qwen2-VL-*-Instruct), not the tiny model's.
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    rows = make_rows(args.batch_size * 4, args.image_size)
    ours = VlmCollator(processor, Preparer(detect_schema(["messages", "images"]), spec.encoding))

    base_s, base_batch = seconds_per_batch(RecipeCollator(processor), rows, args.batch_size, args.batches)
    ours_s, ours_batch = seconds_per_batch(ours, rows, args.batch_size, args.batches)
    trained = {
        name: int((b["labels"] != IGNORE_INDEX).sum()) for name, b in (("recipe", base_batch), ("vlmtune", ours_batch))
    }
    tokens = int(ours_batch["attention_mask"].sum())

    print(f"collate benchmark, {date.today()}, {platform.processor() or platform.machine()}, 1 thread")
    print(f"batch {args.batch_size} x 3-turn conversations, {args.image_size}px images, {tokens} tokens per batch")
    print(f"{'collator':<28}{'ms/batch':>10}{'samples/s':>12}{'trained tokens':>16}")
    for name, s in (("TRL recipe (baseline)", base_s), ("vlmtune assistant-only", ours_s)):
        key = "recipe" if name.startswith("TRL") else "vlmtune"
        print(f"{name:<28}{1000 * s:>10.1f}{args.batch_size / s:>12.1f}{trained[key]:>16}")
    print(f"ratio vlmtune / baseline time: {ours_s / base_s:.2f}x")
    print(
        f"labels: the baseline trains {trained['recipe'] / trained['vlmtune']:.1f}x as many tokens (prompts included)"
    )


if __name__ == "__main__":
    main()
