"""The five seed systems' own commands and configs, run unchanged on vlmtune.

Each test takes a seed document's example command or config as written (../shared/seeds/), changes only the
model id (the tiny model of the same family) and the data location (a small local dataset of the seed's
schema written here), runs it, and checks what that seed's users look at afterwards. Where a run is capped
to stay fast, the one appended flag is named in the test.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from tests.data_files import png, write_rows
from vlmtune import compat
from vlmtune.cli import main
from vlmtune.config import aliases, make_parser, parse_args

COLOURS = ["red", "green", "blue"]


def run_cli(argv: list[str], capsys) -> str:
    """`vlmtune ...` in this process; its stdout. A failure shows its message instead of a bare exit."""
    try:
        main(argv)
    except SystemExit as exit_:
        captured = capsys.readouterr()
        pytest.fail(f"vlmtune {' '.join(argv[:1])} exited {exit_.code}:\n{captured.err[-3000:]}")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out


def warned(caplog, name: str) -> bool:
    return any(f"`--{name}`" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# --- seed 000: run_lora_vlm.py on Gaudi (LLaVA-1.6, ChartQA) -----------------------------------------------


def chartqa_folder(root: Path) -> Path:
    """HuggingFaceM4/ChartQA's shape: train/val/test with image, query, label (a list) and human_or_machine."""
    for split, n in (("train", 4), ("val", 4), ("test", 4)):
        rows = []
        for i in range(n):
            colour = COLOURS[i % 3]
            png(root / "images" / f"{split}{i}.png", colour)
            rows.append({"image": f"images/{split}{i}.png", "query": "Which colour fills the chart?",
                         "label": [colour], "human_or_machine": i % 2})
        write_rows(root / f"{split}.json", rows)
    return root


def test_seed_000_run_lora_vlm_command(tiny_model_dir, tmp_path, capsys, caplog):
    data = chartqa_folder(tmp_path / "ChartQA")
    seed_command = (
        "--model_name_or_path {model} --dataset_name {data} --output_dir {out} "
        "--do_train --max_train_samples 1000 --do_eval --max_eval_samples 200 "
        "--per_device_train_batch_size 1 --gradient_accumulation_steps 1 --num_train_epochs 3 "
        "--learning_rate 1e-4 --lora_rank 16 --use_habana --bf16 --gaudi_config_name Habana/gpt2"
    )
    model = tiny_model_dir("llava_next")
    out = tmp_path / "output_llava"
    with caplog.at_level(logging.WARNING):
        printed = run_cli(["train", *seed_command.format(model=model, data=data, out=out).split()], capsys)

    assert warned(caplog, "lora_rank") and warned(caplog, "use_habana") and warned(caplog, "gaudi_config_name")
    assert "bf16 needs a GPU" in printed  # no such hardware here: said, then run in float32
    assert "--use_habana: no Gaudi HPU here" in printed
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 12, "4 rows x 3 epochs at batch size 1"
    for metric in ("eval_perplexity", "eval_loss", "train_samples_per_second", "train_steps_per_second"):
        assert f"{metric}:" in printed
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_perplexity"] > 1

    # `--do_eval` alone evaluates the model without training it.
    eval_only = tmp_path / "eval_only"
    argv = f"--model_name_or_path {model} --dataset_name {data} --output_dir {eval_only} --do_eval --bf16"
    printed = run_cli(["train", *argv.split()], capsys)
    assert "eval_perplexity:" in printed and "train_runtime" not in printed
    assert json.loads((eval_only / "eval_results.json").read_text())["eval_perplexity"] > 1
    assert not (eval_only / "adapter_model.safetensors").exists()
    # `--do_train false` does not train; evaluating during training does not turn training off.
    base = ["--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(eval_only)]
    assert compat.run_steps(parse_args([*base, "--do_train", "false"])[-1]) == (False, True)
    assert compat.run_steps(parse_args([*base, "--eval_strategy", "steps"])[-1]) == (True, False)


# --- seed 001: fms-hf-tuning JSON config (Granite Vision = LLaVA-Next) ------------------------------------


def test_seed_001_fms_json_config(tiny_model_dir, tmp_path, capsys, caplog):
    rows = []
    for i in range(8):
        colour = COLOURS[i % 3]
        first, second = png(tmp_path / f"img{i}.png", colour), png(tmp_path / f"other{i}.png", "white")
        rows.append({
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Which colour is this?"}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": colour}]},
            ],
            # Several images for a single-image family: the seed documents that the first one is used.
            "images": [str(first), str(second)] if i % 2 else [str(first)],
        })
    data = write_rows(tmp_path / "llava-instruct-mix.jsonl", rows)
    config = {  # the seed's sample configuration, model and data paths replaced
        "model_name_or_path": tiny_model_dir("llava_next"),
        "training_data_path": str(data),
        "dataset_text_field": "messages",
        "dataset_image_field": "images",
        "output_dir": str(tmp_path / "test"),
        "num_train_epochs": 1.0,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-4,
        "bf16": True,
        "torch_dtype": "bfloat16",
        "use_flash_attn": True,
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "accelerate_launch_args": {"fsdp_transformer_layer_cls_to_wrap": "GraniteDecoderLayer"},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        run_cli(["train", str(path)], capsys)

    for name in ("training_data_path", "torch_dtype", "use_flash_attn", "dataset_kwargs", "accelerate_launch_args"):
        assert warned(caplog, name), name
    messages = [r.getMessage() for r in caplog.records]
    assert any("flash_attention_2 needs" in m for m in messages), "no flash-attn here: said, sdpa used"
    assert any("using the first image" in m for m in messages)
    resolved = json.loads((tmp_path / "test" / "vlmtune_config.json").read_text())
    assert resolved["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["GraniteDecoderLayer"]
    assert resolved["gradient_checkpointing"] is True
    assert (tmp_path / "test" / "adapter_model.safetensors").exists()


# --- seed 002: Axolotl / mixtrain workflow (LLaVA-1.5, CSV) ------------------------------------------------


def test_seed_002_axolotl_command(tiny_model_dir, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = []
    for i in range(4):
        colour = COLOURS[i % 3]
        rows.append({"image_path": str(png(tmp_path / "data" / "vlm" / f"img{i}.png", colour)),
                     "prompt": "What colour is the picture?", "response": f"It is {colour}"})
    data = write_rows(tmp_path / "training_data.csv", rows)
    seed_command = (  # the advanced example; --deepspeed_config is checked below (it needs DeepSpeed's GPU setup)
        "--dataset_name {data} --output_model_name my-finetuned-llava --base_model {model} --model_type llava "
        "--num_epochs 5 --batch_size 4 --learning_rate 0.00002 --gradient_accumulation_steps 8 "
        "--lora_r 128 --lora_alpha 32 --wandb_project my-vlm-experiments --use_flash_attention true"
    )
    argv = seed_command.format(data=data, model=tiny_model_dir("llava")).split()
    with caplog.at_level(logging.WARNING):
        printed = run_cli(["train", *argv], capsys)

    for name in ("output_model_name", "base_model", "num_epochs", "batch_size", "wandb_project"):
        assert warned(caplog, name), name
    assert "wandb is not installed" in printed
    out = tmp_path / "my-finetuned-llava"  # the seed's output files
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "trainer_state.json", "config.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (128, 32)
    assert json.loads((out / "trainer_state.json").read_text())["num_train_epochs"] == 5

    # Their DeepSpeed shortcut becomes ours; a model type that is not the checkpoint's is refused.
    known = set(make_parser().option_names())
    assert aliases.translate(["--deepspeed_config", "zero3"], known) == ["--deepspeed", "zero3"]
    with pytest.raises(SystemExit) as exit_:
        wrong_type = [("qwen2_vl" if a == "llava" else a) for a in argv]  # one value per option (merge.py)
        main(["train", *wrong_type, "--output_dir", str(tmp_path / "other")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--model_type qwen2_vl" in err and "llava" in err and "Traceback" not in err


# --- seed 003: VizSage YAML (Llama 3.2 Vision = Mllama) and its test step ---------------------------------


def vizsage_data(root: Path) -> None:
    """`data/AQUA/{train,val,test}.json`, `data/Images/`, and a SemArt-like knowledge table (tab-separated)."""
    knowledge = ["IMAGE_FILE\tDESCRIPTION\tAUTHOR"]
    for split, n in (("train", 8), ("val", 4), ("test", 6)):
        rows = []
        for i in range(n):
            colour = COLOURS[i % 3]
            name = f"{split}{i:03d}.png"
            png(root / "Images" / name, colour)
            knowledge.append(f"{name}\tA painting in {colour} tones.\tAnon")
            rows.append({"image": name, "question": "What is the dominant colour?", "answer": colour,
                         "need_external_knowledge": i % 2 == 0})
        write_rows(root / "AQUA" / f"{split}.json", rows)
    (root / "semart.csv").write_text("\n".join(knowledge) + "\n", encoding="latin-1")


def test_seed_003_vizsage_yaml_train_then_test(tiny_model_dir, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vizsage_data(tmp_path / "data")
    config = {  # the seed's full configuration example plus its other documented keys; model id replaced
        "model_name": tiny_model_dir("mllama"),
        "load_in_4bit": True,
        "use_gradient_checkpointing": "unsloth",
        "name_trained_model": "VizSage_final_model",
        "lora_r": 32, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none",
        "batch_size": 2, "grad_accum": 4, "epochs": 3, "lr": "2e-4", "use_bf16": True, "max_seq_length": 2048,
        "use_text_normalization": True, "debug_exact_match": False,
        "use_early_stopping": True, "early_stopping_patience_ratio": 0.1, "early_stopping_threshold": 0.001,
        "dataset": "AQUA", "base_path": "data", "use_streaming": False, "stream_buffer_size": 1000,
        "external_knowledge": True, "external_knowledge_path": "data/semart.csv",
        "use_wandb": True, "wandb_project": "vizsage-training",
        "output_dir": "outputs",
    }
    Path("config.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.WARNING):
        printed = run_cli(["train", "config.yaml"], capsys)
    for name in ("model_name", "batch_size", "grad_accum", "epochs", "lr", "use_bf16", "dataset", "name_trained_model"):
        assert warned(caplog, name), name
    model_dir = tmp_path / "outputs" / "VizSage_final_model"
    assert (model_dir / "adapter_model.safetensors").exists()
    state = json.loads((model_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3, "8 rows, batch 2 x accumulation 4, 3 epochs"
    resolved = json.loads((model_dir / "vlmtune_config.json").read_text())
    assert resolved["context_file"] == "data/semart.csv" and resolved["load_in_4bit"] is True
    assert resolved["early_stopping_patience_ratio"] == 0.1 and resolved["eval_strategy"] == "steps"
    assert "bf16 needs a GPU" in printed

    # The seed's test step: the same YAML, evaluated on data/AQUA/test.json with its summary.
    printed = run_cli(["eval", "config.yaml"], capsys)
    for line in ("Total samples:         6", "Correct predictions:", "Incorrect predictions:", "Exact match score:",
                 "need_external_knowledge=True: 3 samples", "need_external_knowledge=False: 3 samples"):
        assert line in printed, line
    metrics = json.loads((model_dir / "eval" / "metrics.json").read_text())
    assert metrics["samples"] == 6 and set(metrics["groups"]["need_external_knowledge"]) == {"True", "False"}
    assert (model_dir / "adapter_model.safetensors").exists(), "the trained adapter is left as it was"
    predictions = [json.loads(line) for line in (model_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert predictions[0]["images"][0].endswith("test000.png")


# --- seed 004: the TRL Qwen2-VL QLoRA recipe --------------------------------------------------------------


def test_seed_004_trl_qlora_recipe_with_evaluation(tiny_model_dir, tmp_path, capsys, caplog):
    system = "You are a Vision Language Model specialized in interpreting visual data from chart images."
    for split, n in (("train", 8), ("val", 4)):
        rows = []
        for i in range(n):
            colour = COLOURS[i % 3]
            image = png(tmp_path / "charts" / f"{split}{i}.png", colour)
            rows.append({"messages": [
                {"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": [{"type": "image", "image": str(image)},
                                             {"type": "text", "text": "Which colour is the bar?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": colour}]},
            ]})
        write_rows(tmp_path / "chartqa" / f"{split}.jsonl", rows)
    config = {  # SFTConfig, LoraConfig and BitsAndBytesConfig as the recipe sets them
        "model_name_or_path": tiny_model_dir("qwen2_vl"), "dataset_name": str(tmp_path / "chartqa"),
        "torch_dtype": "bfloat16", "device_map": "auto",
        "load_in_4bit": True, "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "bfloat16",
        "lora_alpha": 16, "lora_dropout": 0.05, "r": 8, "bias": "none", "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "output_dir": str(tmp_path / "qwen2-7b-instruct-trl-sft-ChartQA"),
        "num_train_epochs": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 8, "gradient_checkpointing": True, "optim": "adamw_torch_fused",
        "learning_rate": 2e-4, "lr_scheduler_type": "constant", "logging_steps": 10, "eval_steps": 10,
        "eval_strategy": "steps", "save_strategy": "steps", "save_steps": 20, "metric_for_best_model": "eval_loss",
        "greater_is_better": False, "load_best_model_at_end": True, "bf16": True, "tf32": True,
        "max_grad_norm": 0.3, "warmup_ratio": 0.03, "report_to": "wandb",
        "gradient_checkpointing_kwargs": {"use_reentrant": False}, "dataset_text_field": "",
        "dataset_kwargs": {"skip_prepare_dataset": True}, "remove_unused_columns": False,
        # push_to_hub: True is left out: these tests have no network.
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    # Appended so that evaluation happens during this short run: every step, 2 steps, checkpoints every 2.
    with caplog.at_level(logging.WARNING):
        printed = run_cli(["train", str(path), "--eval_steps", "1", "--save_steps", "2", "--max_steps", "2"], capsys)

    assert "tf32 needs an NVIDIA Ampere" in printed and "bf16 needs a GPU" in printed
    assert warned(caplog, "warmup_ratio") and warned(caplog, "r") and warned(caplog, "target_modules")
    out = Path(config["output_dir"])
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [e["step"] for e in log if "eval_loss" in e]
    assert evals[:2] == [1, 2], "QLoRA trains on after an evaluation"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert adapter_targets(out) == {"q_proj", "v_proj"}
    resolved = json.loads((out / "vlmtune_config.json").read_text())
    assert resolved["warmup_steps"] == 0.03


def adapter_targets(out: Path) -> set[str]:
    """Names of the layers the saved adapter has LoRA weights for (e.g. {"q_proj", "v_proj"})."""
    from safetensors.torch import load_file

    keys = load_file(out / "adapter_model.safetensors")
    return {key.split(".lora_A")[0].rsplit(".", 1)[-1] for key in keys if ".lora_A" in key}


# --- the ready configs and the docs ----------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "coming-from"


@pytest.mark.parametrize(
    "name, model, lora_r, learning_rate",
    [
        ("seed-000-gaudi-llava-next-chartqa.yaml", "llava-hf/llava-v1.6-mistral-7b-hf", 16, 1e-4),
        ("seed-001-fms-granite-vision.json", "ibm-granite/granite-vision-3.2-2b", 16, 1e-4),
        ("seed-002-axolotl-llava.yaml", "llava-hf/llava-1.5-7b-hf", 128, 2e-5),
        ("seed-003-vizsage-llama-vision.yaml", "meta-llama/Llama-3.2-11B-Vision-Instruct", 32, 2e-4),
        ("seed-004-trl-qwen2-vl-qlora.yaml", "Qwen/Qwen2-VL-7B-Instruct", 8, 2e-4),
    ],
)
def test_example_configs_reproduce_the_seed_runs_in_our_names(name, model, lora_r, learning_rate, caplog):
    with caplog.at_level(logging.WARNING):
        model_args, _, finetune, training = parse_args([str(EXAMPLES / name)])
    assert (model_args.model_name_or_path, finetune.lora_r, training.learning_rate) == (model, lora_r, learning_rate)
    assert not [r for r in caplog.records if r.name == aliases.logger.name], "examples use vlmtune's own names"


def test_every_foreign_name_is_documented():
    table = (DOCS / "README.md").read_text()
    assert [name for name in aliases.ALIAS_NAMES if f"`{name}`" not in table] == []
    for page in ("gaudi-run-lora-vlm.md", "fms-hf-tuning.md", "axolotl-mixtrain.md", "vizsage.md", "trl-qwen2-vl.md"):
        assert page in table and (DOCS / page).exists()


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("bias", "all", "accepted: none"),
        ("peft_method", "pt", "accepted: lora, none"),
        ("warmup_ratio", "3", "below 1"),
    ],
)
def test_a_foreign_value_without_equivalent_is_a_message(tmp_path, capsys, flag, value, says):
    argv = ["train", "--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path)]
    argv += [f"--{flag}", value]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--{flag}" in err and says in err and "Traceback" not in err
