"""Only the assistant's answer tokens are trained: checked token by token for each family."""

from __future__ import annotations

import pytest
from PIL import Image

from vlmtune.data.collate import Preparer, VlmCollator
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.data.schema import detect_schema
from vlmtune.models.processors import load_processor
from vlmtune.models.registry import get_family

# Per family, how an independent reader finds the answer: the token run that opens an assistant turn,
# and the token that closes it (trained, so the model learns to stop).
MARKERS = {
    "qwen2_vl": ("<|im_start|>assistant\n", "<|im_end|>"),
    "llava": (" ASSISTANT:", "</s>"),
}

MULTI_TURN = [
    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And the second one?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a blue circle"}]},
]
SINGLE_TURN = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "square"}]},
]


def expected_labels(tokenizer, ids: list[int], family: str) -> list[int]:
    """Mark the tokens after each assistant opener up to and including the closing token."""
    opener = tokenizer(MARKERS[family][0], add_special_tokens=False)["input_ids"]
    closer = tokenizer.convert_tokens_to_ids(MARKERS[family][1])
    labels, inside = [IGNORE_INDEX] * len(ids), False
    for i, tok in enumerate(ids):
        if inside:
            labels[i] = tok
            inside = tok != closer
        elif ids[i - len(opener) + 1 : i + 1] == opener:
            inside = True
    return labels


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_labels_cover_exactly_the_answers(tiny_model_dir, family):
    processor = load_processor(tiny_model_dir(family))
    spec = get_family(family)
    rows = [
        {
            "__index__": 0,
            "messages": MULTI_TURN,
            "images": [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (96, 64), "blue")],
        },
        {"__index__": 1, "messages": SINGLE_TURN, "images": [Image.new("RGB", (64, 64), "green")]},
    ]
    collator = VlmCollator(processor, Preparer(detect_schema(["messages", "images"]), spec))
    batch = collator(rows)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(spec.image_token)
    for i in range(len(rows)):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        length = int(batch["attention_mask"][i].sum())
        assert labels[:length] == expected_labels(tokenizer, ids[:length], family)
        assert all(label == IGNORE_INDEX for label in labels[length:]), "padding must not be trained"
        assert image_id in ids and all(lab == IGNORE_INDEX for tok, lab in zip(ids, labels) if tok == image_id)
    trained = [tokenizer.decode([t for t in batch["labels"][i].tolist() if t != IGNORE_INDEX]) for i in range(2)]
    eos = MARKERS[family][1]
    # Multi-turn: both answers trained (LLaVA-1.5 keeps one image, but both turns still train).
    assert trained[0].replace(" ", "") == f"red{eos}abluecircle{eos}".replace(" ", "")
    assert trained[1].strip() == f"square{eos}"


def test_train_on_prompt_trains_the_text_but_never_image_tokens(tiny_model_dir):
    processor = load_processor(tiny_model_dir("qwen2_vl"))
    spec = get_family("qwen2_vl")
    row = {"__index__": 0, "messages": SINGLE_TURN, "images": [Image.new("RGB", (64, 64), "green")]}
    collator = VlmCollator(processor, Preparer(detect_schema(["messages", "images"]), spec), train_on_prompt=True)
    batch = collator([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids(spec.image_token)
    trained_text = processor.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert "Shape?" in trained_text and "square<|im_end|>" in trained_text
    assert ids.count(image_id) >= 4
    assert not any(lab == image_id for lab in labels), "image tokens are inputs, never targets"
