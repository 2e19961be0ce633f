"""Damaged and foreign checkpoint files: in train, eval, predict and merge, each one is a single message that
names the file (with line and column for JSON), says what is wrong and what to do, and exits non-zero,
never a traceback.

The tiny models and adapters are built once per module; each case damages a copy (truncated weights, a
half-written JSON file, a model_type transformers does not know, a text-only LLM, an adapter trained on
another base) and runs the real command line in-process, as a user would.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import transformers

from tests.helpers import cli_error
from vlmtune.cli import main

QWEN, LLAVA = "qwen2_vl", "llava"


def _train(model: str, data: str, out: Path, steps: int = 1) -> Path:
    """A real `vlmtune train` run that saves a checkpoint every step (the adapters the cases use)."""
    main(
        ["train", "--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(out), "--use_cpu", "true"]
        + ["--max_steps", str(steps), "--save_steps", "1", "--per_device_train_batch_size", "2"]
        + ["--max_train_samples", "4", "--val_split_ratio", "0", "--eval_accuracy", "false"]
    )
    return out


def _sharded(model: str, out: Path) -> Path:
    """The tiny model saved as transformers saves a big one: several shards and an index."""
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(model)
    loaded.save_pretrained(out, max_shard_size="400KB")
    for file in Path(model).iterdir():
        if "safetensors" not in file.name:
            shutil.copy(file, out)
    return out


def _text_only(out: Path) -> Path:
    """A tiny Llama causal LM with its tokenizer: a text-only model a user might pass by mistake."""
    from vlmtune.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def made(tiny_model_dir, shapes_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    data = str(shapes_data["train"])
    qwen = tiny_model_dir(QWEN)
    return {
        "qwen": Path(qwen),
        "data": Path(data),
        "sharded": _sharded(qwen, root / "sharded"),
        "llama": _text_only(root / "llama"),
        "qwen_run": _train(qwen, data, root / "qwen_run", steps=2),
        "llava_run": _train(tiny_model_dir(LLAVA), data, root / "llava_run"),
    }


def truncate(path: Path) -> None:
    """Cut a file in half, as an interrupted download or copy leaves it."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble_header(path: Path) -> None:
    """Overwrite a safetensors file's header length, keeping its size (a bad disk or a wrong file)."""
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def json_position(path: Path) -> str:
    """Where `json` says the damaged file goes wrong: the line and column a message must name."""
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return f"line {err.lineno}, column {err.colno}"
    raise AssertionError(f"{path} is still valid JSON")


@dataclass
class Fault:
    damage: Callable[[Path], list[str]]  # damages the copied folder, returns what the message must say
    base: str = "qwen"  # which built model is copied


def _weights(name: str, damage=truncate) -> Callable[[Path], list[str]]:
    def fault(folder: Path) -> list[str]:
        damage(folder / name)
        return [str(folder / name), "truncated or corrupt", "download"]

    return fault


def _json(name: str) -> Callable[[Path], list[str]]:
    def fault(folder: Path) -> list[str]:
        truncate(folder / name)
        return [f"{folder / name}, {json_position(folder / name)}", "not valid JSON", "download"]

    return fault


def _chat_template(folder: Path) -> list[str]:
    (folder / "chat_template.jinja").write_text("{% for message in messages %}\n{{ message['content'] \n")
    return [f"{folder / 'chat_template.jinja'}, line", "not a valid Jinja template", "download"]


def _unknown_type(folder: Path) -> list[str]:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen9_vl"
    (folder / "config.json").write_text(json.dumps(config))
    return ["'qwen9_vl'", f"transformers {transformers.__version__}", "upgrade transformers", "--trust_remote_code"]


def _text_model(folder: Path) -> list[str]:
    return [str(folder), "is not a vision-language model", "'llama'", "vlmtune models"]


BASE_FAULTS = {
    "truncated model.safetensors": Fault(_weights("model.safetensors")),
    "corrupt model.safetensors header": Fault(_weights("model.safetensors", scramble_header)),
    "truncated shard": Fault(_weights("model-00002-of-00004.safetensors"), "sharded"),
    "broken shard index": Fault(_json("model.safetensors.index.json"), "sharded"),
    "tokenizer.json": Fault(_json("tokenizer.json")),
    "tokenizer_config.json": Fault(_json("tokenizer_config.json")),
    "preprocessor_config.json": Fault(_json("preprocessor_config.json")),
    "processor_config.json": Fault(_json("processor_config.json")),
    "chat_template.jinja": Fault(_chat_template),
    "unknown model_type": Fault(_unknown_type),
    "text-only LLM": Fault(_text_model, "llama"),
}


def command(name: str, tmp: Path, made: dict[str, Path], model: Path | None, adapter: Path | None) -> list[str]:
    """`name`'s command line for `model` (and `adapter`), writing under `tmp`."""
    flag = "--adapter_name_or_path" if name == "train" else "--adapter"  # train continues the adapter
    given = (["--model_name_or_path", str(model)] if model else []) + ([flag, str(adapter)] if adapter else [])
    data = ["--dataset_name", str(made["data"])]
    return {
        "train": ["train", *given, *data, "--output_dir", str(tmp / "out"), "--use_cpu", "true", "--max_steps", "1"],
        "eval": ["eval", *given, *data, "--output_dir", str(tmp / "eval"), "--max_new_tokens", "2"],
        "predict": ["predict", *given, "--prompt", "What colour is the shape?", "--max_new_tokens", "2"],
        "merge": ["merge", *given, "--output_dir", str(tmp / "merged")],
    }[name]


@pytest.mark.parametrize("name", list(BASE_FAULTS))
@pytest.mark.parametrize("cmd", ["train", "eval", "predict", "merge"])
def test_a_damaged_or_foreign_base_model_is_named_with_the_fix(cmd, name, made, tmp_path, capsys):
    fault = BASE_FAULTS[name]
    folder = shutil.copytree(made[fault.base], tmp_path / "model")
    says = fault.damage(folder)
    adapter = made["qwen_run"] if cmd == "merge" else None  # merge folds an adapter into the damaged base
    code, message = cli_error(command(cmd, tmp_path, made, folder, adapter), capsys)
    assert code != 0
    for text in says:
        assert text in message, (text, message)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "eval").exists()


def _adapter_weights(folder: Path) -> list[str]:
    truncate(folder / "adapter_model.safetensors")
    return [str(folder / "adapter_model.safetensors"), "truncated or corrupt"]


def _adapter_config_syntax(folder: Path) -> list[str]:
    truncate(folder / "adapter_config.json")
    return [f"{folder / 'adapter_config.json'}, {json_position(folder / 'adapter_config.json')}", "not valid JSON"]


def _adapter_config_not_peft(folder: Path) -> list[str]:
    (folder / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}')
    return [str(folder / "adapter_config.json"), "not a PEFT adapter config", "peft_type"]


def _adapter_tokenizer(folder: Path) -> list[str]:  # the adapter's own processor files are the ones used
    truncate(folder / "tokenizer_config.json")
    return [f"{folder / 'tokenizer_config.json'}, {json_position(folder / 'tokenizer_config.json')}"]


ADAPTER_FAULTS = {
    "truncated adapter_model.safetensors": _adapter_weights,
    "adapter_config.json not JSON": _adapter_config_syntax,
    "adapter_config.json not a PEFT config": _adapter_config_not_peft,
    "the adapter's tokenizer_config.json": _adapter_tokenizer,
}


@pytest.mark.parametrize("name", list(ADAPTER_FAULTS))
@pytest.mark.parametrize("cmd", ["train", "eval", "predict", "merge"])
def test_a_damaged_adapter_is_named_with_the_fix(cmd, name, made, tmp_path, capsys):
    folder = shutil.copytree(made["qwen_run"], tmp_path / "adapter", ignore=shutil.ignore_patterns("checkpoint-*"))
    says = ADAPTER_FAULTS[name](folder)
    code, message = cli_error(command(cmd, tmp_path, made, made["qwen"], folder), capsys)
    assert code != 0
    for text in says:
        assert text in message, (text, message)


@pytest.mark.parametrize("cmd", ["train", "eval", "predict", "merge"])
def test_an_adapter_of_another_base_model_is_refused_naming_both(cmd, made, tmp_path, capsys):
    """A LLaVA adapter on a Qwen2-VL model: PEFT would load what matches by name and answer nonsense (train:
    continuing it with --adapter_name_or_path)."""
    code, message = cli_error(command(cmd, tmp_path, made, made["qwen"], made["llava_run"]), capsys)
    assert code != 0
    base = json.loads((made["llava_run"] / "adapter_config.json").read_text())["base_model_name_or_path"]
    for text in (str(made["llava_run"]), base, "'llava'", str(made["qwen"]), "'qwen2_vl'"):
        assert text in message, (text, message)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("damage", [truncate, scramble_header], ids=["truncated", "corrupt header"])
def test_resuming_from_a_damaged_checkpoint_names_the_file_and_the_others(damage, made, tmp_path, capsys):
    run = shutil.copytree(made["qwen_run"], tmp_path / "run")
    damaged = run / "checkpoint-2" / "adapter_model.safetensors"
    damage(damaged)
    argv = command("train", tmp_path, made, made["qwen"], None)
    argv[argv.index("--output_dir") + 1] = str(run)
    code, message = cli_error([*argv, "--resume_from_checkpoint", str(run / "checkpoint-2")], capsys)
    assert code != 0
    for text in (str(damaged), "truncated or corrupt", "checkpoint-1"):
        assert text in message, (text, message)
