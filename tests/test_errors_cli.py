"""Bad command lines, config files, model paths and output paths: each is one message naming the flag (or
file and key) with the fix, and an exit code (2 for usage, 1 for the rest), never a traceback.

Every case runs `vlmtune.cli.main` in-process, as a user's command would, and almost all of them stop
before a model loads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import pytest

from vlmtune.cli import main
from vlmtune.config import did_you_mean

USAGE, RUNTIME = 2, 1


@dataclass
class Case:
    argv: list[str]  # "{tmp}" is the test's folder, "{tiny}" a tiny Qwen2-VL, "{data}" the shapes train.csv
    code: int
    says: list[str]  # all must appear in stderr
    files: dict[str, str] = field(default_factory=dict)  # written under {tmp} first


TRAIN = ["train", "--model_name_or_path", "{tmp}/model", "--dataset_name", "{tmp}/d.csv", "--output_dir", "{tmp}/o"]
YAML = ["train", "{tmp}/run.yaml"]

CASES = {
    # --- command line ---------------------------------------------------------------------------
    "unknown command": Case(["trian"], USAGE, ["unknown command 'trian'", "train"]),
    "misspelt flag, no prefix matching": Case(
        [*TRAIN, "--learning_rat", "1e-4"], USAGE, ["unknown option --learning_rat", "did you mean --learning_rate?"]
    ),
    "misspelt foreign flag": Case([*TRAIN, "--epoch", "3"], USAGE, ["unknown option --epoch", "--num_train_epochs"]),
    "flag of another command": Case(
        ["predict", "--prompt", "hi", "--temperatur", "0.5"], USAGE, ["--temperatur", "did you mean --temperature?"]
    ),
    "positional argument": Case(
        ["train", "data.csv"], USAGE, ["unexpected argument 'data.csv'", "--dataset_name data.csv"]
    ),
    "value of the wrong type": Case([*TRAIN, "--lora_r", "abc"], USAGE, ["--lora_r", "invalid int value: 'abc'"]),
    "flag without its value": Case([*TRAIN, "--lora_r"], USAGE, ["--lora_r: expected one argument", "--lora_r=VALUE"]),
    "bad boolean": Case([*TRAIN, "--bf16", "maybe"], USAGE, ["--bf16", "maybe"]),
    "lora_r below 1": Case([*TRAIN, "--lora_r", "0"], USAGE, ["--lora_r must be at least 1, got 0"]),
    "lora_alpha not positive": Case([*TRAIN, "--lora_alpha", "0"], USAGE, ["--lora_alpha must be greater than 0"]),
    "lora_dropout of 1": Case([*TRAIN, "--lora_dropout", "1"], USAGE, ["--lora_dropout must be in [0, 1)"]),
    "batch size 0": Case([*TRAIN, "--per_device_train_batch_size", "0"], USAGE, ["--per_device_train_batch_size"]),
    "gradient accumulation 0": Case(
        [*TRAIN, "--gradient_accumulation_steps", "0"], USAGE, ["--gradient_accumulation_steps must be at least 1"]
    ),
    "val_split_ratio of 1": Case([*TRAIN, "--val_split_ratio", "1"], USAGE, ["--val_split_ratio must be in [0, 1)"]),
    "keyword arguments that are not JSON": Case(
        [*TRAIN, "--lr_scheduler_kwargs", "notjson"], USAGE, ["--lr_scheduler_kwargs must be a JSON object", "notjson"]
    ),
    "scheduler keyword the schedule does not take": Case(
        [*TRAIN, "--lr_scheduler_kwargs", '{"num_cycles": 2}'], USAGE, ["--lr_scheduler_kwargs", "num_cycles", "linear"]
    ),
    "negative learning rate": Case([*TRAIN, "--learning_rate=-1e-4"], USAGE, ["--learning_rate must be greater"]),
    "zero epochs, no max_steps": Case(
        [*TRAIN, "--num_train_epochs", "0"], USAGE, ["--num_train_epochs", "unless --max_steps"]
    ),
    "max_seq_length 0": Case([*TRAIN, "--max_seq_length", "0"], USAGE, ["--max_seq_length must be at least 1"]),
    "pixel limits crossed": Case(
        [*TRAIN, "--image_min_pixels", "1000", "--image_max_pixels", "10"], USAGE, ["--image_min_pixels", "10"]
    ),
    "choice misspelt": Case(
        [*TRAIN, "--on_bad_sample", "skp"], USAGE, ["--on_bad_sample must be one of error, skip", "did you mean skip?"]
    ),
    "unknown finetuning type": Case([*TRAIN, "--finetuning_type", "qlora"], USAGE, ["--finetuning_type", "lora"]),
    "transformers choice misspelt": Case(
        [*TRAIN, "--optim", "adamw_bnb"],
        USAGE,
        ["--optim: invalid choice: 'adamw_bnb'", "did you mean adamw_bnb_8bit?"],
    ),
    "unknown logger": Case(
        [*TRAIN, "--report_to", "tensorbord"],
        USAGE,
        ["--report_to cannot be 'tensorbord'", "did you mean tensorboard?"],
    ),
    "4-bit and 8-bit": Case(
        [*TRAIN, "--load_in_4bit", "true", "--load_in_8bit", "true"], USAGE, ["--load_in_4bit", "--load_in_8bit"]
    ),
    "early stopping without evaluations": Case(
        [*TRAIN, "--early_stopping_patience", "3"],
        USAGE,
        ["--early_stopping_patience needs evaluations", "--eval_strategy"],
    ),
    "streaming without max_steps": Case([*TRAIN, "--streaming", "true"], USAGE, ["--streaming needs --max_steps"]),
    "TrainingArguments' own check": Case(
        [*TRAIN, "--eval_strategy", "steps", "--save_strategy", "epoch", "--load_best_model_at_end", "true"],
        USAGE,
        ["--load_best_model_at_end", "strategy"],
    ),
    "--config without a file": Case(["train", "--config"], USAGE, ["--config needs a file"]),
    "unknown tiny family": Case(
        ["tiny-model", "--family", "qwen9", "--output_dir", "{tmp}/t"], USAGE, ["--family 'qwen9'", "qwen2_vl"]
    ),
    # --- config files -------------------------------------------------------------------------------
    "config: misspelt key": Case(
        YAML,
        USAGE,
        ["run.yaml: unknown key 'learning_rat'", "did you mean learning_rate?"],
        {"run.yaml": "lora_r: 8\nlearning_rat: 1.0e-4\n"},
    ),
    "config: value out of range": Case(
        YAML, USAGE, ["run.yaml: key 'lora_r' must be at least 1, got 0"], {"run.yaml": "lora_r: 0\n"}
    ),
    "config: value of the wrong type": Case(
        YAML, USAGE, ["run.yaml: key 'lora_r'", "invalid int value: 'many'"], {"run.yaml": "lora_r: many\n"}
    ),
    "config: a value the command line overrides is named as a flag": Case(
        [*YAML, "--lora_r", "-3"], USAGE, ["--lora_r must be at least 1, got -3"], {"run.yaml": "lora_r: 0\n"}
    ),
    "config: YAML syntax error": Case(
        YAML, USAGE, ["run.yaml, line 3", "not valid YAML"], {"run.yaml": "lora_r: 8\nlora_alpha: 16\n  x: [1\n"}
    ),
    "config: JSON syntax error": Case(
        ["train", "--config", "{tmp}/run.json"],
        USAGE,
        ["run.json, line 2", "not valid JSON"],
        {"run.json": '{"lora_r": 8,\n "lora_alpha": }\n'},
    ),
    "config: empty file": Case(YAML, USAGE, ["run.yaml is empty"], {"run.yaml": "# nothing yet\n"}),
    "config: a list, not a mapping": Case(
        YAML, USAGE, ["run.yaml: the top level must be a mapping", "list"], {"run.yaml": "- lora_r\n- 8\n"}
    ),
    "config: no such file": Case(["train", "{tmp}/nope.yaml"], USAGE, ["nope.yaml: no such file"]),
    # --- models ------------------------------------------------------------------------------------
    "model: not given": Case(
        ["train", "--dataset_name", "d.csv", "--output_dir", "{tmp}/o"], USAGE, ["--model_name_or_path is required"]
    ),
    "model: local path that does not exist": Case(
        [*TRAIN[:2], "./no/such/model", *TRAIN[3:]], RUNTIME, ["--model_name_or_path ./no/such/model: no such folder"]
    ),
    "model: hub id while offline": Case(
        [*TRAIN[:2], "vlmtune-tests/no-such-model", *TRAIN[3:]],
        RUNTIME,
        ["no such local folder", "cannot be downloaded (HF_HUB_OFFLINE is set)"],
    ),
    "model: folder that is not a model": Case(
        TRAIN, RUNTIME, ["model: not a model folder (no config.json)"], {"model/readme.txt": "hi"}
    ),
    "model: an adapter instead": Case(  # as train writes it: the base model's config.json beside the adapter
        TRAIN,
        RUNTIME,
        ["is a LoRA adapter, not a base model", "--adapter"],
        {"model/adapter_config.json": "{}", "model/config.json": "{}"},
    ),
    "model: ships remote code": Case(
        TRAIN,
        RUNTIME,
        ["--trust_remote_code true"],
        {"model/config.json": '{"model_type": "acme_vl", "auto_map": {"AutoConfig": "conf_acme.AcmeConfig"}}'},
    ),
    "model: its processor needs torchvision": Case(  # Llama 4's image processor exists only for torchvision
        TRAIN,
        RUNTIME,
        ["--model_name_or_path", "needs torchvision, which is not installed here", "pip install torchvision"],
        {
            "model/config.json": '{"model_type": "llama4"}',
            "model/preprocessor_config.json": '{"image_processor_type": "Llama4ImageProcessor", '
            '"processor_class": "Llama4Processor"}',
        },
    ),
    "adapter: no such folder": Case(
        ["predict", "--adapter", "{tmp}/nope", "--prompt", "hi"], RUNTIME, ["--adapter", "nope: no such folder"]
    ),
    "adapter: a full model instead": Case(
        ["predict", "--adapter", "{tiny}", "--prompt", "hi"],
        RUNTIME,
        ["no adapter_config.json", "--model_name_or_path"],
    ),
    "inspect: unknown split": Case(
        ["data", "inspect", "--model_name_or_path", "{tmp}/m", "--dataset_name", "d.csv", "--inspect_split", "val"],
        USAGE,
        ["--inspect_split must be one of train, eval, test, got 'val'"],
    ),
    "eval: not a device": Case(
        [
            "eval",
            "--model_name_or_path",
            "{tmp}/m",
            "--dataset_name",
            "d.csv",
            "--output_dir",
            "{tmp}/e",
            "--device",
            "gpu",
        ],
        USAGE,
        ["--device 'gpu' is not a device", "cuda"],
    ),
    "merge: unknown dtype": Case(
        ["merge", "--adapter", "{tmp}/a", "--output_dir", "{tmp}/m", "--dtype", "bf16"], USAGE, ["--dtype", "bfloat16"]
    ),
    "predict: no requests file": Case(
        ["predict", "--adapter", "{tmp}/a", "--requests", "{tmp}/r.jsonl"],
        RUNTIME,
        ["--requests", "r.jsonl: no such file"],
    ),
    "inspect: column not in the data (model loaded)": Case(
        ["data", "inspect", "--model_name_or_path", "{tiny}", "--dataset_name", "{data}", "--image_column", "picture"],
        RUNTIME,
        ["train.csv", "'picture'", "image_path"],
    ),
    # --- output folders ------------------------------------------------------------------------------
    "output: a file": Case(
        [*TRAIN[:-1], "{tmp}/taken.txt"], RUNTIME, ["--output_dir", "taken.txt is a file"], {"taken.txt": "mine"}
    ),
    "output: inside a file": Case(
        [*TRAIN[:-1], "{tmp}/taken.txt/run"], RUNTIME, ["cannot be created"], {"taken.txt": "mine"}
    ),
    "output: already holds a trained model": Case(
        TRAIN,
        RUNTIME,
        ["already holds a trained model", "--overwrite_output_dir"],
        {"o/adapter_model.safetensors": "x"},
    ),
    "merge: output is the adapter": Case(
        ["merge", "--adapter", "{tmp}/a", "--output_dir", "{tmp}/a"], USAGE, ["--output_dir must differ from --adapter"]
    ),
    "predict: output file is a folder": Case(
        ["predict", "--adapter", "{tmp}/a", "--requests", "{tmp}/r.jsonl", "--output_file", "{tmp}"],
        RUNTIME,
        ["--output_file", "is a folder"],
        {"r.jsonl": '{"prompt": "hi"}\n'},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_message_and_an_exit_code(name, tmp_path, capsys, request):
    case = CASES[name]
    for relative, text in case.files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    places = {"{tmp}": str(tmp_path)}
    if any("{tiny}" in a for a in case.argv):
        places["{tiny}"] = request.getfixturevalue("tiny_model_dir")("qwen2_vl")
    if any("{data}" in a for a in case.argv):
        places["{data}"] = str(request.getfixturevalue("shapes_data")["train"])
    argv = list(case.argv)
    for key, value in places.items():
        argv = [a.replace(key, value) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == case.code, err
    assert "Traceback" not in err, err
    message = err[err.index("vlmtune: error: ") :]  # after any progress bars
    assert message.count("\n") == 1, err  # one paragraph
    for text in case.says:
        assert text in message, (text, err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_suggestions_take_extra_names_that_map_to_options():
    """Aliases users bring from other tools are suggested as the option they stand for."""
    known = ["lora_r", "lora_alpha", "learning_rate"]
    assert did_you_mean("lora_rnk", known, {"lora_rank": "lora_r"}, "--") == "; did you mean --lora_r?"
    assert did_you_mean("zzz", known) == ""


def test_help_shows_each_options_allowed_values(capsys):
    main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "LoRA rank. [at least 1]" in text and "[in [0, 1)]" in text and "[one of error, skip]" in text


def test_a_tower_that_needs_a_missing_library_is_one_message(tmp_path, capsys):
    """Gemma 3n's vision tower is a timm model: without timm, deriving its facts (a weightless model is
    built) fails, and the user reads which library to install, not a traceback."""
    from vlmtune.models.tiny.generic import generic_build

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    config, processor = generic_build("gemma3n")
    config.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "d.csv").write_text("image_path,prompt,response\n")
    argv = [part.replace("{tmp}", str(tmp_path)) for part in TRAIN]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == RUNTIME and "Traceback" not in err
    assert "needs timm, which is not installed here: pip install timm" in err
