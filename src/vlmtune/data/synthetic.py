"""A small synthetic VQA dataset whose answers need the image: coloured shapes.

Used by `vlmtune demo` and by the learning tests. Each row asks either the colour or the shape of the
one figure drawn on a plain background, so a model that ignores the image scores near chance;
`write_preference_dataset` makes preference pairs of it (the right answer chosen, a wrong one rejected).
With `sentence_share`, part of the training answers are full sentences ("The answer is red.") although the
question asks for one word, as hand-written SFT data often is, while the held-out answers stay bare.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 170),
    "orange": (250, 140, 10),
}
SHAPES = ("square", "circle", "triangle")
QUESTIONS = {
    "colour": "What colour is the shape? Answer with one word.",
    "shape": "What shape is shown? Answer with one word.",
}
SENTENCE = "The answer is {}."


def draw_shape(colour: str, shape: str, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """One figure, slightly jittered in place and size, on a light grey background."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    half = rng.randint(size // 4, size // 3)
    cx, cy = (rng.randint(half + 2, size - half - 2) for _ in range(2))
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def write_shapes_dataset(
    folder: str | Path,
    n_train: int = 300,
    n_eval: int = 60,
    seed: int = 0,
    questions: tuple[str, ...] = ("colour",),
    sentence_share: float = 0.0,
) -> dict[str, Path]:
    """Write PNGs and `train.csv` / `validation.csv` (columns image_path, prompt, response).

    Image paths in the CSVs are relative to `folder`, as users' own data usually is. `sentence_share` of the
    training answers (drawn by their own seeded generator, so images and questions are those of
    `sentence_share=0`) are written as a sentence (`SENTENCE`): data whose answers are partly verbose, scored
    against bare held-out answers, where `vlmtune grpo`'s exact-match reward asks for what the user wants.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng, verbose = random.Random(seed), random.Random(seed + 2)
    files = {}
    for split, n in (("train", n_train), ("validation", n_eval)):
        path = folder / f"{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_path", "prompt", "response"])
            for i in range(n):
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                kind = rng.choice(questions)
                name = f"images/{split}_{i:04d}.png"
                draw_shape(colour, shape, rng=rng).save(folder / name)
                answer = colour if kind == "colour" else shape
                if split == "train" and verbose.random() < sentence_share:
                    answer = SENTENCE.format(answer)
                writer.writerow([name, QUESTIONS[kind], answer])
        files[split] = path
    return files


def write_preference_dataset(
    folder: str | Path, n_train: int = 300, n_eval: int = 60, seed: int = 0
) -> dict[str, Path]:
    """The shapes data as preference pairs: `train.csv` / `validation.csv` with columns image_path, prompt,
    chosen, rejected; chosen is the right colour, rejected a wrong one (seeded), images as in
    `write_shapes_dataset` (same seed, same images and questions)."""
    folder = Path(folder)
    files = write_shapes_dataset(folder, n_train, n_eval, seed)
    rng = random.Random(seed + 1)
    for path in files.values():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_path", "prompt", "chosen", "rejected"])
            for row in rows:
                wrong = rng.choice([c for c in COLOURS if c != row["response"]])
                writer.writerow([row["image_path"], row["prompt"], row["response"], wrong])
    return files
