"""`vlmtune data inspect`: samples as the model sees them, and a check of the whole split."""

from __future__ import annotations

import pytest

from tests.data_files import shapes_rows, write_rows
from vlmtune.cli import main


@pytest.fixture
def dataset(tmp_path):
    rows = shapes_rows(tmp_path, n=3)
    rows.insert(1, {"image_path": "images/missing.png", "prompt": "What colour?", "response": "red"})
    return write_rows(tmp_path / "train.csv", rows)


def test_inspect_shows_samples_with_trained_text_marked_and_a_summary(dataset, tiny_model_dir, capsys):
    model = tiny_model_dir("qwen2_vl")
    capsys.readouterr()  # building the tiny model may log (deepspeed's first import); only the command's output counts
    argv = [
        "data",
        "inspect",
        "--model_name_or_path",
        model,
        "--dataset_name",
        str(dataset),
        "--image_max_pixels",
        "1024",
    ]
    main([*argv, "--num_examples", "2", "--system_prompt", "Be brief."])
    out = capsys.readouterr().out
    assert out.startswith("Detected schema: prompt/response (prompt/response); image column: image_path\n")
    samples = out.split("== ")[1:3]
    assert samples[0].startswith(f"{dataset}, row 0 ==") and samples[1].startswith(f"{dataset}, row 2 ==")
    assert "image 0: 64x64 -> 32x32" in samples[0]
    assert "Be brief." in samples[0] and "What colour?" in samples[0]
    assert "<|im_start|>assistant\n[[red<|im_end|>]]" in samples[0]
    assert "<|im_start|>assistant\n[[green<|im_end|>]]" in samples[1]  # row 2; row 1 is the bad one
    assert "tokens: " in samples[0] and ", 4 image, " in samples[0]  # 32x32 pixels: 4 merged patches
    summary = out.split("== summary ==\n")[1]
    assert summary.startswith("train: 3 of 4 samples kept; 1 bad samples skipped; tokens min/median/max ")
    assert f"skipped: {dataset}, row 1, field 'image_path', image 0: image file not found" in summary


def test_inspect_colours_on_request_and_counts_trained_tokens(dataset, tiny_model_dir, capsys):
    model = tiny_model_dir("qwen2_vl")
    main(["data", "inspect", "--model_name_or_path", model, "--dataset_name", str(dataset), "--num_examples", "1",
          "--color", "always", "--train_on_prompt", "true"])  # fmt: skip
    out = capsys.readouterr().out
    assert "\x1b[1;32m" in out and "[[" not in out
    trained = int(out.split(" trained")[0].rsplit(", ", 1)[1])
    assert trained > 10  # the prompt text is trained too


def test_inspect_needs_a_model(dataset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "inspect", "--dataset_name", str(dataset)])
    assert exit_info.value.code == 2
    assert "--model_name_or_path is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["data"])
    assert exit_info.value.code == 2
    assert "usage: vlmtune data inspect" in capsys.readouterr().err
