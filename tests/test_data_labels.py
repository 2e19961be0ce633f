"""Multi-turn, multi-image conversations read from a file train exactly the assistant tokens, per family."""

from __future__ import annotations

import logging

import pytest

from tests.data_files import data_args, data_uri, png, write_rows
from tests.helpers import family_spec
from tests.test_models_labels import MARKERS, expected_labels
from vlmtune.data.collate import VlmCollator
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.data.splits import build_splits
from vlmtune.models.processors import load_processor


def _conversations(folder) -> list[dict]:
    """Row 0: inline images (data URI and an image_url part with a relative path), a system turn.
    Row 1: the images column, three images, three answers."""
    png(folder / "pics" / "b.png", "blue", size=(96, 64))
    png(folder / "pics" / "g.png", "green")
    inline = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image", "image": data_uri("red")}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "This one?"},
                {"type": "image_url", "image_url": {"url": "pics/b.png"}},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "a blue circle"}]},
    ]
    column = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And now?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "green"}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]
    return [
        {"messages": inline, "images": []},
        {"messages": column, "images": ["pics/g.png", "pics/b.png", "pics/g.png"]},
    ]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_file_conversations_train_every_assistant_turn_and_nothing_else(tmp_path, tiny_model_dir, family, caplog):
    path = write_rows(tmp_path / "chat.jsonl", _conversations(tmp_path))
    processor = load_processor(tiny_model_dir(family))
    spec = family_spec(family)
    with caplog.at_level(logging.WARNING):
        splits = build_splits(data_args(str(path), val_split_ratio=0), spec.encoding, processor=processor)
        batch = VlmCollator(processor, splits.preparer)(list(splits.train))
    warnings = [r for r in caplog.records if "takes one image per sample" in r.getMessage()]
    assert len(warnings) == (0 if spec.multi_image else 1), "single-image families warn once"
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(spec.image_token)
    for i in range(2):
        length = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i].tolist()[:length], batch["labels"][i].tolist()[:length]
        assert labels == expected_labels(tokenizer, ids, family, last_only=False)
        assert all(label == IGNORE_INDEX for label in batch["labels"][i].tolist()[length:])
        assert image_id in ids and not any(lab == image_id for lab in labels)
    eos = MARKERS[family][1]
    trained = [
        tokenizer.decode([t for t in row.tolist() if t != IGNORE_INDEX]).replace(" ", "") for row in batch["labels"]
    ]
    assert trained == [f"red{eos}abluecircle{eos}", f"no{eos}green{eos}yes{eos}"]
    if spec.multi_image:  # every image of every turn kept: its own run of image tokens, sized by its grid
        per_image = (batch["image_grid_thw"].prod(dim=1) // processor.image_processor.merge_size**2).tolist()
        assert len(per_image) == 5
        counts = [batch["input_ids"][i].tolist().count(image_id) for i in range(2)]
        assert counts == [sum(per_image[:2]), sum(per_image[2:])]
