"""The workload the training benchmarks share: a Qwen2-VL of a chosen size and chart-QA rows.

`build_model` writes a Qwen2-VL with random weights (`reduced` for the CPU: real vocabulary, head sizes
and image path, a quarter of 2B's widths; or the real `2b` / `7b` shapes) and the tiny builder's
Qwen2-VL processor set to the real checkpoints' pixel range. `write_data` writes bar-chart images and
OpenAI-style `messages` rows (system, user with image + question, assistant) as the seed-004 notebook's
ChartQA data looks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = (
    "You are a Vision Language Model specialized in interpreting visual data from chart images. Your task is to "
    "analyze the provided chart image and respond to queries with concise answers, usually a single word, number, "
    "or short phrase. The charts include a variety of types (e.g., line charts, bar charts) and contain colors, "
    "labels, and text. Focus on delivering accurate, succinct answers based on the visual information. Avoid "
    "additional explanation unless absolutely necessary."
)
QUESTIONS = [
    ("What is the value of the tallest bar?", "{top}"),
    ("How many bars are in the chart?", "{n}"),
    ("Is the first bar taller than the last one?", "{cmp}"),
    ("What is the difference between the tallest and the shortest bar?", "{diff}"),
]
def qwen2_vl_config(size: str, tokenizer_ids: dict):
    """Qwen2-VL configuration: `reduced` (CPU), or the real `2b` / `7b` shapes (random weights)."""
    from transformers import Qwen2VLConfig

    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    vision = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2)
    if size == "2b":
        text = dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    elif size == "7b":
        text = dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        )
    else:  # reduced: a quarter of 2B's widths, few layers; real head sizes, vocabulary and image path
        text = dict(
            hidden_size=384,
            intermediate_size=2240,
            num_hidden_layers=4,
            num_attention_heads=3,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
        vision.update(depth=4, embed_dim=320, num_heads=4)
    vision["hidden_size"] = text["hidden_size"]
    tie = text.pop("tie_word_embeddings")
    text_config = dict(
        text,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_parameters=rope,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        eos_token_id=tokenizer_ids["eos_token_id"],
        pad_token_id=tokenizer_ids["pad_token_id"],
        bos_token_id=None,
    )
    ids = {k: v for k, v in tokenizer_ids.items() if k.endswith("token_id") and k not in text_config}
    return Qwen2VLConfig(text_config=text_config, vision_config=vision, tie_word_embeddings=tie, **ids)


def build_model(size: str, folder: Path, dtype: str) -> None:
    """Write a random Qwen2-VL of `size` with a Qwen2-VL processor set to the real checkpoints' pixel range."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from vlmtune.models.tiny import RECIPES
    from vlmtune.models.tiny.common import token_ids

    recipe = RECIPES["qwen2_vl"]
    processor = recipe.processor()
    tok = processor.tokenizer
    ids = token_ids(tok, recipe.ids)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    ids.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = qwen2_vl_config(size, ids)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def chart(rng: random.Random, size: int):
    """A bar chart image and the numbers it shows."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    bars = [rng.randint(5, 95) for _ in range(rng.randint(3, 7))]
    width = size // (len(bars) + 1)
    for i, value in enumerate(bars):
        x = (i + 0.5) * width
        colour = tuple(rng.randint(0, 200) for _ in range(3))
        draw.rectangle((x, size - 10 - value * (size - 40) / 100, x + width * 0.7, size - 10), fill=colour)
        draw.text((x, size - 25 - value * (size - 40) / 100), str(value), fill=(0, 0, 0))
    return image, bars


def write_data(folder: Path, n: int, image_size: int) -> Path:
    """`n` chart-QA rows in OpenAI-style messages (system, user with image + question, assistant) as JSONL."""
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            image, bars = chart(rng, image_size)
            image.save(folder / "images" / f"{i}.png")
            question, template = QUESTIONS[i % len(QUESTIONS)]
            answer = template.format(
                top=max(bars), n=len(bars), cmp="Yes" if bars[0] > bars[-1] else "No", diff=max(bars) - min(bars)
            )
            messages = [
                {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
            f.write(json.dumps({"messages": messages, "images": [f"images/{i}.png"]}) + "\n")
    return folder / "train.jsonl"


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer of the same kind: another number, or the other of Yes/No."""
    if answer in ("Yes", "No"):
        return "No" if answer == "Yes" else "Yes"
    return str(int(answer) + rng.choice((-3, -2, -1, 1, 2, 3)))


def write_preference_data(folder: Path, n: int, image_size: int) -> Path:
    """`n` chart-QA preference pairs in TRL's conversational form as JSONL: `images`, `prompt` (system, user
    with image + question), `chosen` (the right answer) and `rejected` (a wrong one), as assistant turns."""
    sft = write_data(folder, n, image_size)
    rng = random.Random(1)
    with open(sft) as rows, open(folder / "pairs.jsonl", "w") as f:
        for line in rows:
            row = json.loads(line)
            *prompt, answer = row["messages"]
            right = answer["content"][0]["text"]
            pair = {
                "images": row["images"],
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": right}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong_answer(right, rng)}]}],
            }
            f.write(json.dumps(pair) + "\n")
    return folder / "pairs.jsonl"
