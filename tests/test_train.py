"""End-to-end fine-tuning: learning on held-out images, what is saved, and how it reloads."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from tests.helpers import train_args
from vlmtune.data.encode import processor_inputs
from vlmtune.errors import OutputError
from vlmtune.models.loading import load_for_inference, load_model, part_of
from vlmtune.train.run import run_training


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, shapes_data, tmp_path_factory):
    """One LoRA run on the shapes task, shared by the tests below (about 15 s on 2 cores). 400 steps: 95-98%
    held out on seeds 0-2 (88% on seed 1 at 350)."""
    out = tmp_path_factory.mktemp("lora_run")
    args = train_args(
        tiny_model_dir("qwen2_vl"),
        str(shapes_data["train"]),
        str(out),
        str(shapes_data["validation"]),
        max_steps=400,
        per_device_train_batch_size=8,
        lr_scheduler_type="cosine",
        warmup_steps=10,
    )
    return run_training(*args)


def test_lora_learns_the_task_from_the_image(lora_run):
    # 6 colours: chance is 17%; the untrained model scores 0% (see the demo test).
    assert lora_run.metrics["eval_exact_match"] >= 0.9
    log = json.loads((lora_run.output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert losses[-1] < losses[0] / 5


def test_output_dir_holds_what_users_need(lora_run):
    out = lora_run.output_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
        "vlmtune_config.json",
        "processor_config.json",
        "tokenizer.json",
        "predictions.jsonl",
        # AutoProcessor builds Qwen2-VL's video processor from this where torchvision is installed
        "preprocessor_config.json",
    ):
        assert (out / name).is_file(), name
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    config = json.loads((out / "vlmtune_config.json").read_text())
    assert config["max_steps"] == 400 and config["lora_r"] == 16 and config["finetuning_type"] == "lora"


def test_lora_targets_only_the_language_model_and_vision_is_untouched(lora_run, tiny_model_dir):
    base = load_model(tiny_model_dir("qwen2_vl"))
    adapter_config = json.loads((lora_run.output_dir / "adapter_config.json").read_text())
    lora_names = [n for n, _ in lora_run.trainer.model.named_parameters() if "lora_" in n]
    assert lora_names and all(".language_model.layers." in n for n in lora_names)
    assert adapter_config["modules_to_save"] is None
    # The trained model in memory: vision tower weights bit-identical to the checkpoint's.
    after = dict(lora_run.trainer.model.named_parameters())
    for name, param in base.model.named_parameters():
        if part_of(name, base.spec) == "vision_tower":
            assert torch.equal(param, after[f"base_model.model.{name}"]), name


def test_plain_peft_reload_gives_vlmtune_logits(lora_run, tiny_model_dir):
    ours = load_for_inference(tiny_model_dir("qwen2_vl"), str(lora_run.output_dir))
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_vl"))
    plain = PeftModel.from_pretrained(base, str(lora_run.output_dir)).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = ours.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor_inputs(ours.processor, [text], [[Image.new("RGB", (64, 64), (30, 60, 220))]])
    with torch.no_grad():
        a, b = ours.model(**inputs).logits, plain(**inputs).logits
    assert torch.equal(a, b)
    with torch.no_grad(), plain.disable_adapter():
        assert not torch.allclose(plain(**inputs).logits, a), "the adapter must change the answer"


def test_training_continues_the_adapter_it_is_given(lora_run, tiny_model_dir, shapes_data, tmp_path):
    """--adapter_name_or_path: the run starts from the trained adapter, not from a fresh LoRA (which answers
    no shape right), and saves it under the same names."""
    args = train_args(
        tiny_model_dir("qwen2_vl"),
        str(shapes_data["train"]),
        str(tmp_path),
        str(shapes_data["validation"]),
        adapter_name_or_path=str(lora_run.output_dir),
        max_steps=2,
        learning_rate=1e-6,
    )
    result = run_training(*args)
    assert result.metrics["eval_exact_match"] >= 0.9
    before = load_file(lora_run.output_dir / "adapter_model.safetensors")
    after = load_file(tmp_path / "adapter_model.safetensors")
    assert after.keys() == before.keys()
    assert all(torch.allclose(after[k], before[k], atol=1e-4) for k in before)


def test_full_finetune_learns_and_keeps_vision_frozen(tiny_model_dir, shapes_data, tmp_path):
    args = train_args(
        tiny_model_dir("qwen2_vl"),
        str(shapes_data["train"]),
        str(tmp_path / "full"),
        str(shapes_data["validation"]),
        finetuning_type="full",
        max_steps=150,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        lr_scheduler_type="cosine",
        warmup_steps=10,
    )
    result = run_training(*args)
    assert result.metrics["eval_exact_match"] >= 0.9
    assert (result.output_dir / "model.safetensors").is_file()
    reloaded = AutoModelForImageTextToText.from_pretrained(result.output_dir)
    base = load_model(tiny_model_dir("qwen2_vl"))
    trained = dict(reloaded.named_parameters())
    changed = {part_of(n, base.spec) for n, p in base.model.named_parameters() if not torch.equal(p, trained[n])}
    assert changed == {"language_model", "projector"}


def test_refuses_to_overwrite_a_trained_model(lora_run, tiny_model_dir, shapes_data):
    args = train_args(tiny_model_dir("qwen2_vl"), str(shapes_data["train"]), str(lora_run.output_dir), max_steps=1)
    before = (lora_run.output_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="--overwrite_output_dir"):
        run_training(*args)
    assert (lora_run.output_dir / "adapter_model.safetensors").read_bytes() == before
