"""Every sample is checked before training: bad ones stop the run (or are skipped and reported), and
over-long ones lose prompt text, never image tokens or answers, or are skipped."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from tests.data_files import data_args, png, write_rows
from tests.helpers import family_spec
from vlmtune.data.collate import VlmCollator
from vlmtune.data.conversation import Conversation
from vlmtune.data.encode import IGNORE_INDEX, encode
from vlmtune.data.prepare import Preparer
from vlmtune.data.schema import DataError, detect_schema
from vlmtune.data.splits import build_splits
from vlmtune.data.validate import ESTIMATE_MARGIN, Checker
from vlmtune.models.loading import load_processing
from vlmtune.models.processors import load_processor
from vlmtune.models.registry import OVERRIDES

QWEN = family_spec("qwen2_vl").encoding


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir("qwen2_vl"))


def _good(i: int) -> dict:
    return {"image_path": "ok.png", "prompt": f"Question {i}?", "response": "red"}


BAD_ROWS = {
    "missing image": (
        {"image_path": "nope.png", "prompt": "Q?", "response": "red"},
        r"row 1, field 'image_path', image 0: image file not found: 'nope.png'",
    ),
    "unreadable image": (
        {"image_path": "broken.png", "prompt": "Q?", "response": "red"},
        r"row 1, field 'image_path', image 0: cannot decode image file '.*broken.png'",
    ),
    "empty answer": ({"image_path": "ok.png", "prompt": "Q?", "response": ""}, r"row 1, field 'response': empty"),
    "wrong type": (
        {"image_path": "ok.png", "prompt": ["Q?"], "response": "red"},
        r"row 1, field 'prompt': expected text, got list",
    ),
}


def _files(folder):
    png(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_a_bad_sample_stops_before_training_naming_file_row_and_reason(tmp_path, processor, kind):
    _files(tmp_path)
    bad, message = BAD_ROWS[kind]
    path = write_rows(tmp_path / "d.jsonl", [_good(0), bad, _good(2)])
    with pytest.raises(DataError, match=f"^{path}, {message}") as err:
        build_splits(data_args(str(path), val_split_ratio=0), QWEN, processor=processor)
    assert "--on_bad_sample skip" in str(err.value)


def test_a_conversation_the_template_cannot_split_is_a_bad_sample(tmp_path, processor):
    messages = [
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": "x"},
    ]
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match=f"^{path}, row 0: a conversation cannot start with an assistant turn"):
        build_splits(data_args(str(path), val_split_ratio=0), QWEN, processor=processor)


def test_skip_drops_bad_samples_and_reports_count_and_first_reasons(tmp_path, processor):
    _files(tmp_path)
    rows = [_good(0)] + [bad for bad, _ in BAD_ROWS.values()] + [_good(5)]
    path = write_rows(tmp_path / "d.jsonl", rows)
    splits = build_splits(data_args(str(path), val_split_ratio=0, on_bad_sample="skip"), QWEN, processor=processor)
    assert [r["__index__"] for r in splits.train] == [0, 5]
    report = splits.reports["train"]
    assert (report.rows, report.bad, report.kept) == (6, 4, 2)
    summary = splits.summary()
    assert summary.startswith("train: 2 of 6 samples kept; 4 bad samples skipped")
    for i, (_, message) in enumerate(BAD_ROWS.values()):
        expected = f"  skipped: {re.escape(str(path))}, " + message.replace("row 1", f"row {i + 1}")
        assert re.match(expected, summary.splitlines()[1 + i])


def test_all_samples_bad_is_an_error_not_an_empty_run(tmp_path, processor):
    path = write_rows(tmp_path / "d.csv", [{"image_path": "nope.png", "prompt": "Q?", "response": "a"}])
    with pytest.raises(DataError, match="no usable samples left in the train: 0 of 1 samples kept"):
        build_splits(data_args(str(path), val_split_ratio=0, on_bad_sample="skip"), QWEN, processor=processor)


def test_over_long_samples_lose_prompt_text_never_image_tokens_or_answer(tmp_path, processor):
    png(tmp_path / "ok.png", size=(56, 56))
    long_prompt = "Some background. " * 12 + "What colour is the square?"
    rows = [
        {"image_path": "ok.png", "prompt": long_prompt, "response": "red"},
        {"image_path": "ok.png", "prompt": "Colour?", "response": "red"},
        {"image_path": "ok.png", "prompt": "Colour?", "response": "a very long answer " * 10},
    ]
    path = write_rows(tmp_path / "d.csv", rows)
    full = build_splits(data_args(str(path), val_split_ratio=0), QWEN, processor=processor)
    lengths = full.reports["train"].lengths
    limit = lengths[1] + 20  # the short row fits; the long prompt must lose text; the long answer cannot fit
    assert lengths[0] > limit and lengths[2] > limit
    splits = build_splits(data_args(str(path), val_split_ratio=0, max_seq_length=limit), QWEN, processor=processor)
    report = splits.reports["train"]
    assert (report.shortened, report.too_long, report.kept) == (1, 1, 2)
    assert f"row 2: {lengths[2]} tokens; cutting the prompt cannot fit --max_seq_length {limit}" in splits.summary()
    batch = VlmCollator(processor, splits.preparer)([splits.train[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert limit - 3 <= len(ids) <= limit
    conv = full.preparer.conversation(full.train[0], 0)
    original = encode(processor, conv, full.preparer.load_images(conv), QWEN)
    image_id = processor.tokenizer.convert_tokens_to_ids(QWEN.image_token)
    assert ids.count(image_id) == original.input_ids.count(image_id) > 0
    assert [t for t in labels if t != IGNORE_INDEX] == [t for t in original.labels if t != IGNORE_INDEX]
    text = processor.tokenizer.decode(ids)
    assert text.count("<|vision_start|>") == 1 and "What colour is the square?" in text
    assert text.count("background") < 12  # cut from the start of the prompt


# Families whose processor arithmetic (transformers' `_get_num_multimodal_tokens`) overcounts some rows: safe
# for --max_seq_length (the row is then measured exactly), but packing and length grouping see it longer.
OVERCOUNTS = {
    "llava_onevision": "the arithmetic tiles every image; with several images the processor takes each at base size",
}


@pytest.mark.parametrize("family", sorted(OVERRIDES))
def test_the_fast_length_estimate_never_undercounts_by_more_than_its_margin(tiny_model_dir, family):
    """Rows are kept on the header-only estimate when it is clearly within --max_seq_length: the exact
    length (full processor) may exceed it by at most the margin, for every family; and it is not shorter
    than the estimate, except where the processor's arithmetic is known to overcount (`OVERCOUNTS`)."""
    processor, spec = load_processing(tiny_model_dir(family))
    facts = spec.encoding
    sizes = [(64, 64), (96, 40)][: 2 if facts.multi_image else 1]
    messages = [
        {"role": "user", "content": [{"type": "image"} for _ in sizes] + [{"type": "text", "text": "What\n\nis it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red  "}]},
    ]
    conv = Conversation(messages, [Image.new("RGB", s, "red") for s in sizes], {"source": "d.jsonl", "row": 0})
    checker = Checker(Preparer(detect_schema(["messages"]), facts), processor)
    estimate = checker.estimate(conv, sizes)
    exact = encode(processor, conv, conv.images, facts).length
    if getattr(processor, "_get_num_multimodal_tokens", None) is not None:
        assert exact - estimate <= ESTIMATE_MARGIN[0] * len(sizes) + ESTIMATE_MARGIN[1]
        assert exact >= estimate or (family in OVERCOUNTS and len(sizes) > 1), (exact, estimate)
    else:  # without the processor's arithmetic the estimate is not trusted with --max_seq_length
        assert not Checker(checker.preparer, processor, max_seq_length=10**6)._surely_fits(estimate, len(sizes))


def test_an_image_without_its_placeholder_is_found_before_training(tmp_path, processor):
    png(tmp_path / "ok.png")
    messages = [{"role": "user", "content": "<|image_pad|> Q?"}, {"role": "assistant", "content": "red"}]
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": messages, "images": ["ok.png", "ok.png"]}])
    with pytest.raises(DataError, match=rf"^{path}, row 0, .*image placeholder"):
        build_splits(data_args(str(path), val_split_ratio=0), QWEN, processor=processor)
