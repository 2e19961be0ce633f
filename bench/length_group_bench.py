"""Length-grouped batches (`--train_sampling_strategy group_by_length`) on mixed-length data: padding
saved against what it costs the shuffling.

Rows: the chart-QA rows of bench/compare.py with images of mixed sizes (224 to 896 px, so Qwen2-VL's
dynamic resolution gives 64 to 1024 image tokens) and one to four questions per answer. Lengths are the
ones vlmtune's pre-training check stores (`__length__`), batches come from transformers' own samplers
(`RandomSampler` vs `LengthGroupedSampler`, as the Trainer builds them) over several epochs. Reported:
- padding: share of the padded batch tensor that is padding (the tokens computed for nothing);
- pairs seen again: of the sample pairs that share a batch in one epoch, the share that shared one in
  the epoch before (random batches: about batch/rows; grouped: the same neighbours every epoch).

    python bench/length_group_bench.py --rows 2000 --batch 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402 - the benchmark's model and chart builders


def write_mixed(folder: Path, n: int) -> Path:
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            size = rng.choice((224, 336, 448, 672, 896))
            image, bars = compare.chart(rng, size)
            image.save(folder / "images" / f"{i}.png")
            questions = [q for q, _ in rng.sample(compare.QUESTIONS, rng.randint(1, 4))]
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " ".join(questions)}]},
                {"role": "assistant", "content": [{"type": "text", "text": str(max(bars))}]},
            ]
            f.write(json.dumps({"messages": messages, "images": [f"images/{i}.png"]}) + "\n")
    return folder / "train.jsonl"


def checked_lengths(model_dir: Path, data_file: Path) -> list[int]:
    from vlmtune.config import DataArguments
    from vlmtune.data.splits import build_splits
    from vlmtune.models.loading import load_processing

    processor, spec = load_processing(str(model_dir))
    data = DataArguments(dataset_name=str(data_file), val_split_ratio=0.0)
    return list(build_splits(data, spec.encoding, processor=processor).train["__length__"])


def batches(sampler, batch: int) -> list[list[int]]:
    order = list(sampler)
    return [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]


def stats(epochs: list[list[list[int]]], lengths: list[int]) -> tuple[float, float]:
    padded = sum(max(lengths[i] for i in b) * len(b) for e in epochs for b in e)
    real = sum(lengths[i] for e in epochs for b in e for i in b)
    pairs = [{frozenset(p) for b in e for p in itertools.combinations(b, 2)} for e in epochs]
    again = [len(pairs[k] & pairs[k - 1]) / len(pairs[k]) for k in range(1, len(pairs))]
    return 1 - real / padded, sum(again) / len(again)


def main() -> None:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model_dir = work / "qwen2_vl_reduced"
        if not (model_dir / "config.json").exists():
            compare.build_model("reduced", model_dir, "float32")
        lengths = checked_lengths(model_dir, write_mixed(work / "mixed", args.rows))
    print(f"{args.rows} rows, tokens min/median/max {min(lengths)}/{sorted(lengths)[len(lengths) // 2]}/{max(lengths)}")
    generator = torch.Generator().manual_seed(0)
    samplers = {
        "random": torch.utils.data.RandomSampler(range(len(lengths)), generator=generator),
        "group_by_length": LengthGroupedSampler(args.batch, lengths=lengths, generator=generator),
    }
    print(f"{'':<16}{'padding':>10}{'pairs seen again':>18}")
    for name, sampler in samplers.items():
        pad, again = stats([batches(sampler, args.batch) for _ in range(args.epochs)], lengths)
        print(f"{name:<16}{100 * pad:>9.1f}%{100 * again:>17.2f}%")


if __name__ == "__main__":
    main()
