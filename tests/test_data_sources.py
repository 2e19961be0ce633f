"""Where rows come from: every file format, folders, save_to_disk, hub-style loading, splits, streaming."""

from __future__ import annotations

import datasets
import pytest
from PIL import Image

from tests.data_files import data_args, png, shapes_rows, write_rows
from tests.helpers import family_spec
from vlmtune.data.schema import DataError
from vlmtune.data.sources import INDEX, SOURCE, load_hub, load_splits
from vlmtune.data.splits import build_splits

QWEN = family_spec("qwen2_vl").encoding
TEXT = datasets.Value("string")
IMAGE_QA = datasets.Features({"image": datasets.Image(), "question": TEXT, "answer": TEXT})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_file_format_loads_with_its_file_and_row_numbers(tmp_path, suffix):
    rows = shapes_rows(tmp_path, n=3)
    path = write_rows(tmp_path / f"data{suffix}", rows)
    loaded = load_splits(str(path))
    (train,) = loaded.splits.values()
    assert [r["response"] for r in train] == ["red", "green", "blue"]
    assert [r[INDEX] for r in train] == [0, 1, 2] and {r[SOURCE] for r in train} == {str(path)}
    assert loaded.folders == {str(path): tmp_path}


def test_a_missing_file_is_named_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path / 'trian.csv'}: no such file or folder"):
        load_splits(str(tmp_path / "trian.csv"))


def test_a_single_file_is_training_data_whatever_its_name(tmp_path):
    path = write_rows(tmp_path / "test.csv", shapes_rows(tmp_path, n=2))
    assert list(load_splits(str(path)).splits) == ["train"]


def test_folder_of_files_finds_splits_and_each_file_resolves_its_own_images(tmp_path):
    # Two training files in different sub-folders, each with images relative to itself.
    write_rows(tmp_path / "part1" / "a_train.jsonl", shapes_rows(tmp_path / "part1", n=2, prefix="a"))
    write_rows(tmp_path / "part2" / "b_train.jsonl", shapes_rows(tmp_path / "part2", n=3, prefix="b"))
    write_rows(tmp_path / "val.jsonl", shapes_rows(tmp_path, n=2, prefix="v"))
    write_rows(tmp_path / "test.jsonl", shapes_rows(tmp_path, n=1, prefix="t"))
    splits = build_splits(data_args(str(tmp_path)), QWEN)
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (5, 2, 1)
    for row in splits.train:
        conv = splits.preparer.conversation(row, row[INDEX])
        (image,) = splits.preparer.load_images(conv)
        assert image.getpixel((0, 0)) == Image.new("RGB", (1, 1), conv.answer).getpixel((0, 0))
    sources = [r[SOURCE] for r in splits.train]
    assert sources == [str(tmp_path / "part1" / "a_train.jsonl")] * 2 + [str(tmp_path / "part2" / "b_train.jsonl")] * 3


def test_eval_file_in_another_folder_resolves_images_against_its_own_folder(tmp_path):
    write_rows(tmp_path / "train" / "data.csv", shapes_rows(tmp_path / "train", n=2))
    # Same relative names, different folder and colours: a lookup in the train folder would find the wrong image.
    eval_rows = [{"image_path": "images/img0.png", "prompt": "What colour?", "response": "yellow"}]
    png(tmp_path / "eval" / "images" / "img0.png", "yellow")
    write_rows(tmp_path / "eval" / "data.csv", eval_rows)
    splits = build_splits(
        data_args(str(tmp_path / "train" / "data.csv"), eval_dataset_name=str(tmp_path / "eval" / "data.csv")), QWEN
    )
    row = splits.eval[0]
    (image,) = splits.preparer.load_images(splits.preparer.conversation(row, row[INDEX]))
    assert image.getpixel((0, 0)) == (255, 255, 0)


def test_image_root_is_tried_first(tmp_path):
    rows = [{"image_path": "pic.png", "prompt": "colour?", "response": "green"}]
    png(tmp_path / "root" / "pic.png", "green")
    write_rows(tmp_path / "data" / "d.csv", rows)
    splits = build_splits(data_args(str(tmp_path / "data" / "d.csv"), image_root=str(tmp_path / "root")), QWEN)
    (image,) = splits.preparer.load_images(splits.preparer.conversation(splits.train[0], 0))
    assert image.getpixel((0, 0)) == (0, 128, 0)


def test_save_to_disk_folder_with_image_feature_and_named_splits(tmp_path):
    make = lambda n, c: datasets.Dataset.from_dict(  # noqa: E731
        {"image": [Image.new("RGB", (32, 32), c)] * n, "question": ["colour?"] * n, "answer": [c] * n},
        features=IMAGE_QA,
    )
    datasets.DatasetDict({"train": make(4, "red"), "val": make(2, "blue"), "test": make(1, "green")}).save_to_disk(
        str(tmp_path / "saved")
    )
    splits = build_splits(data_args(str(tmp_path / "saved")), QWEN)
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (4, 2, 1)
    assert splits.eval[0][SOURCE] == f"{tmp_path / 'saved'} [val]"
    conv = splits.preparer.conversation(splits.eval[0], 0)
    assert splits.preparer.load_images(conv)[0].getpixel((0, 0)) == (0, 0, 255)


def test_hub_loader_is_plain_load_dataset_and_split_names_can_be_chosen(tmp_path):
    # `load_dataset` on a local folder runs the same code as a hub id (offline in tests).
    repo = tmp_path / "repo"
    write_rows(repo / "train.jsonl", shapes_rows(repo, n=3))
    write_rows(repo / "test.jsonl", shapes_rows(repo, n=2, prefix="t"))
    loaded = load_hub(str(repo))
    assert {name: len(rows) for name, rows in loaded.splits.items()} == {"train": 3, "test": 2}
    assert loaded.splits["test"][1][SOURCE] == f"{repo} [test]" and loaded.splits["test"][1][INDEX] == 1
    with pytest.raises(DataError, match=r"no split 'dev'; splits found: train, test"):
        loaded.pick("dev", "validation", str(repo))


def test_train_and_eval_split_flags_pick_splits_by_name(tmp_path):
    rows = {"image": [Image.new("RGB", (8, 8))] * 2, "question": ["q"] * 2, "answer": ["a"] * 2}
    one = datasets.Dataset.from_dict(rows, features=IMAGE_QA)
    datasets.DatasetDict({"main": one, "heldout": one.select([0])}).save_to_disk(str(tmp_path / "s"))
    splits = build_splits(data_args(str(tmp_path / "s"), train_split="main", eval_split="heldout"), QWEN)
    assert (len(splits.train), len(splits.eval)) == (2, 1)
    with pytest.raises(DataError, match="no training split"):
        build_splits(data_args(str(tmp_path / "s")), QWEN)


def test_validation_hold_out_is_seeded_and_sample_limits_apply(tmp_path):
    path = write_rows(tmp_path / "d.csv", shapes_rows(tmp_path, n=20))

    def held(seed: int) -> list[int]:
        return sorted(r[INDEX] for r in build_splits(data_args(str(path), val_split_ratio=0.25), QWEN, seed).eval)

    assert held(1) == held(1) and held(1) != held(2) and len(held(1)) == 5
    splits = build_splits(data_args(str(path), max_train_samples=3, max_eval_samples=2), QWEN)
    assert (len(splits.train), len(splits.eval)) == (3, 2)
    assert build_splits(data_args(str(path), val_split_ratio=0), QWEN).eval is None


def test_streaming_reads_lazily_through_the_same_checks(tmp_path):
    rows = shapes_rows(tmp_path, n=8)
    rows[5]["response"] = ""  # a bad row, found only when the stream reaches it
    path = write_rows(tmp_path / "d.jsonl", rows)
    args = data_args(str(path), streaming=True, stream_buffer_size=4, max_eval_samples=2, on_bad_sample="skip")
    splits = build_splits(args, QWEN)
    assert isinstance(splits.train, datasets.IterableDataset)
    assert sorted(r[INDEX] for r in splits.eval) == [0, 1]
    assert sorted(r[INDEX] for r in splits.train) == [2, 3, 4, 6, 7]
    assert splits.reports["train"].bad == 1 and "row 5, field 'response': empty" in splits.summary()
