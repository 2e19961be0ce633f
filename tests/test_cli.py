"""The `vlmtune` command as users run it: config files, overrides, help, predict, tiny-model, demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from transformers import AutoConfig, AutoModelForImageTextToText

from vlmtune.cli import main
from vlmtune.config import parse_args
from vlmtune.demo import DemoArguments, run_demo
from vlmtune.errors import OutputError
from vlmtune.models.processors import load_processor


def test_config_file_with_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct",
                "dataset_name": "data.csv",
                "output_dir": "out",
                "learning_rate": 1e-4,
                "lora_r": 8,
                "lora_target_modules": ["q_proj", "v_proj"],
                "gradient_checkpointing_kwargs": {"use_reentrant": False},
                "num_train_epochs": 2,
            }
        )
    )
    model, data, finetune, training = parse_args([str(config), "--learning_rate", "5e-5", "--lora_r", "32"])
    assert model.model_name_or_path == "Qwen/Qwen2-VL-2B-Instruct" and data.dataset_name == "data.csv"
    assert training.learning_rate == 5e-5 and finetune.lora_r == 32  # command line wins
    assert finetune.lora_target_modules == ["q_proj", "v_proj"] and training.num_train_epochs == 2
    assert training.gradient_checkpointing_kwargs == {"use_reentrant": False}
    # Any TrainingArguments field passes through by name; JSON configs work the same way.
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"output_dir": "o", "warmup_steps": 7, "lr_scheduler_type": "cosine"}))
    *_, training = parse_args(["--config", str(json_config), "--weight_decay", "0.1"])
    assert (training.warmup_steps, training.lr_scheduler_type.value, training.weight_decay) == (7, "cosine", 0.1)


def test_train_help_explains_the_arguments(capsys):
    main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--model_name_or_path",
        "--dataset_name",
        "--lora_r",
        "--finetuning_type",
        "--max_train_samples",
        "--per_device_train_batch_size",
        "--report_to",
        "--eval_strategy",
    ):
        assert flag in text, flag
    assert "assistant turns only" in text and "LoRA rank" in text


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "vlmtune.cli", "--help"], capture_output=True, text=True, check=True)
    assert "tiny-model" in out.stdout and "predict" in out.stdout


def test_python_dash_m_vlmtune_is_the_command(tmp_path):
    """`python -m vlmtune` (what torchrun/accelerate `-m` and job scripts run) does the command's work and
    ends a user's mistake with its message and exit code, like `vlmtune`."""
    out = subprocess.run(
        [sys.executable, "-m", "vlmtune", "tiny-model", "--family", "qwen2_vl", "--output_dir", str(tmp_path / "m")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "qwen2_vl"
    typo = subprocess.run([sys.executable, "-m", "vlmtune", "trian"], capture_output=True, text=True)
    assert typo.returncode == 2
    assert "unknown command 'trian'" in typo.stderr and "Traceback" not in typo.stderr


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_tiny_model_command_writes_a_loadable_checkpoint(tmp_path, capsys, family):
    main(["tiny-model", "--family", family, "--output_dir", str(tmp_path / family)])
    assert AutoConfig.from_pretrained(tmp_path / family).model_type == family
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / family)
    processor = load_processor(str(tmp_path / family))
    assert processor.chat_template and len(processor.tokenizer) <= model.config.get_text_config().vocab_size
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_unknown_tiny_family_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "--family", "nope", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--family 'nope'" in err and "choose one of" in err and "Traceback" not in err


def test_train_then_predict_from_the_command_line(tmp_path, tiny_model_dir, shapes_data, capsys):
    out = tmp_path / "run"
    main(
        [
            "train",
            "--model_name_or_path",
            tiny_model_dir("llava"),
            "--dataset_name",
            str(shapes_data["train"]),
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "2",
            "--use_cpu",
            "true",
            "--max_eval_samples",
            "4",
            "--max_new_tokens",
            "4",
        ]
    )
    printed = capsys.readouterr().out
    assert f"Saved to {out}" in printed and "eval_exact_match" in printed
    assert "Detected schema: prompt/response (prompt/response); image column: image_path" in printed
    image = shapes_data["validation"].parent / "images" / "validation_0000.png"
    main(["predict", "--adapter", str(out), "--image", str(image), "--prompt", "What colour?", "--max_new_tokens", "3"])
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert answer.strip() and len(answer) < 100


def test_demo_learns_from_near_zero_to_ninety_percent(tmp_path, capsys):
    result = run_demo(DemoArguments(output_dir=str(tmp_path / "demo")))
    printed = capsys.readouterr().out
    assert result["before"] <= 0.3 and result["after"] >= 0.9
    assert "Held-out accuracy after fine-tuning" in printed and "vlmtune predict" in printed


def test_demo_never_clobbers_a_users_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(OutputError, match="not made by `vlmtune demo`"):
        run_demo(DemoArguments(output_dir=str(tmp_path)))
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_error_boundary_message_exit_code_and_debug(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A user's mistake is one message and an exit code; --debug adds the traceback; a bug says so."""
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown command 'trian'" in err and "Traceback" not in err

    missing = str(tmp_path / "nope.csv")
    argv = ["data", "inspect", "--model_name_or_path", tiny_model_dir("qwen2_vl"), "--dataset_name", missing]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "nope.csv: no such file or folder" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main([*argv, "--debug"])
    assert "Traceback (most recent call last)" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr("vlmtune.data.preview.build_splits", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" in err and "This is a bug in vlmtune" in err
