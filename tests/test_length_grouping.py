"""--train_sampling_strategy group_by_length: batches of similar length from the lengths the pre-training
check measured (no second pass), so less padding on mixed-length data."""

from __future__ import annotations

import csv
import random

import pytest

from tests.helpers import short_run
from vlmtune import cli
from vlmtune.data.synthetic import draw_shape


@pytest.fixture(scope="module")
def mixed_lengths(tmp_path_factory):
    """96 rows whose prompts run from 1 to 40 sentences."""
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "images").mkdir()
    rng = random.Random(0)
    with open(folder / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "prompt", "response"])
        for i in range(96):
            draw_shape("red", "circle", rng=rng).save(folder / "images" / f"{i}.png")
            prompt = " ".join(["Look closely at the picture."] * rng.randint(1, 40)) + " What colour is the shape?"
            writer.writerow([f"images/{i}.png", prompt, "red"])
    return {"train": folder / "train.csv"}


def padding(trainer) -> int:
    """Padding tokens over one epoch of the trainer's own training batches."""
    return sum(int((batch["attention_mask"] == 0).sum()) for batch in trainer.get_train_dataloader())


def test_grouped_batches_have_less_padding(tiny_model_dir, mixed_lengths, tmp_path):
    # transformers sorts within groups of 50 batches (fewer for small data: 6 here).
    flags = dict(max_steps=1, max_train_samples=96)
    grouped = short_run(
        tiny_model_dir("qwen2_vl"),
        mixed_lengths,
        tmp_path / "grouped",
        train_sampling_strategy="group_by_length",
        **flags,
    )
    assert "__length__" in grouped.trainer.train_dataset.column_names  # the check's lengths, no second pass
    random_run = short_run(tiny_model_dir("qwen2_vl"), mixed_lengths, tmp_path / "random", **flags)  # the default
    assert padding(grouped.trainer) < 0.5 * padding(random_run.trainer)


def test_grouping_without_lengths_is_refused(tiny_model_dir, mixed_lengths, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", tiny_model_dir("qwen2_vl"), "--dataset_name", str(mixed_lengths["train"])]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_cpu", "true", "--val_split_ratio", "0"]
    argv += ["--train_sampling_strategy", "group_by_length", "--length_column_name", "n_tokens"]
    argv += ["--eval_accuracy", "false"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--train_sampling_strategy group_by_length" in err and "--length_column_name n_tokens" in err
    assert "Traceback" not in err
