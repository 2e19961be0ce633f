"""One setting given twice, under two names (`lr` and `learning_rate`) or one name twice, is a mistake named
with both values and where each came from, never a silent pick; the command line still overrides a file.

Everything goes through `vlmtune.config.parse_args`, what `vlmtune train` runs on its argv (the config files,
the alias table, the parser), and one case through the command itself.
"""

from __future__ import annotations

import pytest
import yaml

from vlmtune.cli import main
from vlmtune.config import aliases, make_parser, parse_args
from vlmtune.config.files import read_config_file
from vlmtune.errors import UsageError

BASE = ["--model_name_or_path", "m", "--dataset_name", "d.csv", "--output_dir", "out"]


def _config(tmp_path, values: dict, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def _refused(argv: list[str]) -> str:
    with pytest.raises(UsageError) as refused:
        parse_args(argv)
    return str(refused.value)


def _training(argv: list[str]):
    return parse_args(argv)[-1]


OPTIONS = make_parser()._option_string_actions  # `vlmtune train`'s options by flag


def _two_values(ours: str) -> tuple[str, str]:
    """Two different valid values of our option `ours`, as text (from its type in the parser)."""
    action = OPTIONS[f"--{ours}"]
    kind = getattr(action.type, "__name__", "")
    if kind == "string_to_bool":
        return "true", "false"
    if action.type in (int, float):
        return "2", "3"
    return "a", "b"


# Every foreign name that is another name for one of our options (`rename`-like rules), from the table.
RENAMES = sorted(
    (foreign, ours)
    for foreign, ours in aliases.suggestion_names().items()
    if ours != foreign and f"--{ours}" in OPTIONS
)


def test_the_table_has_the_pairs_users_mix():
    assert {("lr", "learning_rate"), ("num_epochs", "num_train_epochs"), ("lora_rank", "lora_r")} <= set(RENAMES)
    assert ("base_model", "model_name_or_path") in RENAMES and len(RENAMES) >= 15


@pytest.mark.parametrize("foreign, ours", RENAMES)
def test_a_foreign_name_and_ours_that_differ_in_one_file_are_refused(tmp_path, foreign, ours):
    theirs, mine = _two_values(ours)
    config = _config(tmp_path, {foreign: theirs, ours: mine})
    message = _refused([config, *BASE])
    assert f"`{foreign}: {theirs}`" in message and f"`{ours}: {mine}`" in message  # both names, both values
    assert message.count(f"in {config}") == 2  # where each came from
    assert "keep one" in message


def test_a_foreign_name_and_ours_on_the_command_line_are_refused():
    message = _refused([*BASE, "--lr", "2e-4", "--learning_rate", "5e-5"])
    assert "`--lr 2e-4` (on the command line, meaning --learning_rate 2e-4)" in message
    assert "`--learning_rate 5e-5` (on the command line)" in message and "keep one" in message


def test_one_flag_repeated_on_the_command_line_is_an_override_but_two_spellings_are_refused():
    # `$COMMON --max_steps 7`, as scripts append overrides: the later wins, as argparse has it.
    assert _training([*BASE, "--max_steps", "5", "--max_steps", "7"]).max_steps == 7
    assert _training([*BASE, "--max_steps", "5", "--max_steps", "5"]).max_steps == 5
    negated = _refused([*BASE, "--eval_accuracy", "true", "--no_eval_accuracy"])  # two flags, one setting
    assert "`--eval_accuracy true`" in negated and "`--no_eval_accuracy`" in negated


def test_equal_values_under_two_names_are_one_setting(tmp_path):
    config = _config(
        tmp_path,
        {
            "lr": "1e-4",  # text in YAML; the same number as learning_rate's float
            "learning_rate": 0.0001,
            "num_epochs": 3,
            "num_train_epochs": 3.0,
            "lora_rank": 16,
            "lora_r": 16,
            "base_model": "org/model",
            "model_name_or_path": "org/model",
            "use_gradient_checkpointing": True,
            "gradient_checkpointing": "true",
        },
    )
    model, _, finetune, training = parse_args([config, "--dataset_name", "d.csv", "--output_dir", "out"])
    assert (training.learning_rate, training.num_train_epochs, finetune.lora_r) == (1e-4, 3, 16)
    assert model.model_name_or_path == "org/model" and training.gradient_checkpointing


def test_the_command_line_overrides_a_file_under_either_name(tmp_path):
    """Documented (README, troubleshooting): flags override the file, whatever name either uses; a later
    --config file overrides an earlier one. Only within one source do two values clash."""
    config = _config(tmp_path, {"lr": 2e-4, "num_epochs": 5})
    training = _training([config, *BASE, "--learning_rate", "5e-5", "--num_train_epochs", "1"])
    assert (training.learning_rate, training.num_train_epochs) == (5e-5, 1)
    later = _config(tmp_path, {"learning_rate": 3e-5}, "later.yaml")
    assert _training([config, "--config", later, *BASE]).learning_rate == 3e-5
    message = _refused([config, *BASE, "--lr", "1e-5", "--learning_rate", "5e-5"])
    assert "on the command line" in message and config not in message


def test_a_value_out_of_range_is_named_by_the_key_the_user_wrote(tmp_path):
    config = _config(tmp_path, {"lr": -1})
    assert _refused([config, *BASE]).startswith(f"{config}: key 'lr' must be greater than 0")


def test_axolotl_micro_batch_and_total_batch_give_the_accumulation_steps(tmp_path):
    config = _config(tmp_path, {"micro_batch_size": 2, "batch_size": 16})
    training = _training([config, *BASE])
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (2, 8)
    agreeing = _training([config, *BASE, "--gradient_accumulation_steps", "8"])
    assert agreeing.gradient_accumulation_steps == 8


def test_batch_size_alone_stays_the_per_device_batch_of_mixtrain_and_vizsage():
    training = _training([*BASE, "--batch_size", "4", "--gradient_accumulation_steps", "8"])
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (4, 8)


def test_a_total_batch_that_does_not_divide_is_refused_with_the_arithmetic(tmp_path, monkeypatch):
    config = _config(tmp_path, {"micro_batch_size": 3, "batch_size": 16})
    message = _refused([config, *BASE])
    assert "`batch_size: 16`" in message and "`micro_batch_size: 3`" in message
    assert "16 / (3 x 1 process) = 5.33333" in message and "multiple of 3" in message
    monkeypatch.setenv("WORLD_SIZE", "3")  # the launcher's processes count (refused before any launch check)
    message = _refused([*BASE, "--micro_batch_size", "4", "--batch_size", "16"])
    assert "16 / (4 x 3 processes)" in message and "multiple of 12" in message


def test_accumulation_steps_that_disagree_with_the_total_batch_name_all_three(tmp_path):
    config = _config(tmp_path, {"micro_batch_size": 2, "batch_size": 16, "gradient_accumulation_steps": 4})
    message = _refused([config, *BASE])
    for said in ("`batch_size: 16`", "`micro_batch_size: 2`", "`gradient_accumulation_steps: 4`", "= 8"):
        assert said in message, said


def test_warmup_as_a_fraction_and_as_steps_both_non_zero_is_refused():
    message = _refused([*BASE, "--warmup_ratio", "0.1", "--warmup_steps", "100"])
    assert "`--warmup_ratio 0.1`" in message and "`--warmup_steps 100`" in message and "give one" in message
    assert _training([*BASE, "--warmup_ratio", "0.1", "--warmup_steps", "0"]).warmup_steps == 0.1
    assert _training([*BASE, "--warmup_ratio", "0", "--warmup_steps", "100"]).warmup_steps == 100


def test_bf16_and_fp16_both_on_name_what_asked_for_each(tmp_path):
    config = _config(tmp_path, {"torch_dtype": "float16", "use_bf16": True})
    message = _refused([config, *BASE])
    assert "`torch_dtype: float16`" in message and "meaning --fp16 true" in message
    assert "`use_bf16: True`" in message and "two mixed precisions" in message


def test_vlmtune_train_with_two_learning_rates_in_its_file_exits_2_with_the_message(tmp_path, capsys):
    config = _config(tmp_path, {"lr": 2e-4, "learning_rate": 1e-4, "dataset_name": "d.csv"})
    with pytest.raises(SystemExit) as exit_:
        main(["train", config, "--model_name_or_path", "m", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "`lr: 0.0002`" in err and "`learning_rate: 0.0001`" in err and config in err
    assert not (tmp_path / "out").exists()


def test_a_key_written_twice_in_one_file_is_refused_with_its_lines(tmp_path):
    """YAML and JSON parsers keep the last of two equal keys without a word; vlmtune names both."""
    config = tmp_path / "run.yaml"
    config.write_text("lr: 2.0e-4\nlora_r: 8\nlr: 1.0e-4\n")
    assert _refused([str(config), *BASE]) == f"{config}, lines 1 and 3: key 'lr' is written twice; keep one"
    json_config = tmp_path / "run.json"
    json_config.write_text('{"lora_r": 8, "lora_r": 16}')
    assert "key 'lora_r' is written twice" in _refused(["--config", str(json_config), *BASE])
    shared = tmp_path / "anchors.yaml"  # a YAML merge (<<) may be overridden: that is what it is for
    shared.write_text("lr_scheduler_kwargs:\n  <<: {num_cycles: 1, power: 2}\n  num_cycles: 2\n")
    assert read_config_file(str(shared)) == {"lr_scheduler_kwargs": {"num_cycles": 2, "power": 2}}


def test_vizsage_use_wandb_false_beside_its_project_name_turns_wandb_off(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    off = _config(tmp_path, {"use_wandb": False, "wandb_project": "vizsage-training"}, "off.yaml")
    assert "wandb" not in _training([off, *BASE]).report_to  # ("none": transformers keeps no back-end)
    on = _config(tmp_path, {"use_wandb": True, "wandb_project": "vizsage-training"}, "on.yaml")
    _training([on, *BASE])  # agreeing: accepted (W&B itself is dropped with a warning where not installed)
