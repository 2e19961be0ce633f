"""Fine-tuning methods: targets, DoRA, rsLoRA, QLoRA, per-part learning rates, gradient checkpointing,
attention fallback, early stopping with the best checkpoint kept, and exact resume."""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainerCallback

from tests.helpers import short_run
from tests.test_models_families import batch_for
from vlmtune.config import FinetuneArguments
from vlmtune.errors import UsageError
from vlmtune.models.loading import (
    apply_finetuning,
    expert_parameters,
    load_model,
    part_of,
    resolve_attn_implementation,
    strip_peft_prefix,
)

QWEN = "qwen2_vl"


def run(tiny_model_dir, shapes_data, out, family=QWEN, **overrides):
    return short_run(tiny_model_dir(family), shapes_data, out, **overrides)


def lora_parts(model, spec) -> dict[str, set[str]]:
    """Which parts carry LoRA layers, and the leaf names adapted in each."""
    parts: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        if ".lora_A." in name:
            module = strip_peft_prefix(name.split(".lora_A.")[0])
            parts.setdefault(part_of(module, spec), set()).add(module.rsplit(".", 1)[-1])
    return parts


# --- which modules get LoRA ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets, vision, expected",
    [
        (
            None,
            False,
            {"language_model": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}},
        ),
        (
            ["all-linear"],
            False,
            {"language_model": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}},
        ),
        # Names are looked up in the language model: the vision tower's "qkv" does not get adapted.
        (["q_proj", "v_proj", "qkv"], False, {"language_model": {"q_proj", "v_proj"}}),
        # A regex is the user's full control.
        ([r".*\.visual\.blocks\.\d+\.attn\.qkv"], False, {"vision_tower": {"qkv"}}),
        # --train_vision_lora: every vision-tower linear layer, never the projector's.
        (["q_proj"], True, {"language_model": {"q_proj"}, "vision_tower": {"qkv", "proj", "fc1", "fc2"}}),
    ],
)
def test_lora_targets(tiny_model_dir, targets, vision, expected):
    loaded = load_model(tiny_model_dir(QWEN))
    args = FinetuneArguments(lora_target_modules=targets, train_vision_lora=vision)
    model = apply_finetuning(loaded.model, loaded.spec, args)
    assert lora_parts(model, loaded.spec) == expected


# --- DoRA and rsLoRA -------------------------------------------------------------------------------


def test_dora_trains_magnitudes_and_reloads_in_plain_peft(tiny_model_dir, shapes_data, tmp_path):
    result = run(tiny_model_dir, shapes_data, tmp_path / "dora", finetuning_type="dora")
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    model = result.trainer.model.eval()
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(QWEN))
    base_weights = dict(base.named_parameters())
    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert magnitudes and all(p.requires_grad for p in magnitudes.values())
    # DoRA starts each magnitude at the norm of the frozen weight's rows; training moved them.
    name, magnitude = next(iter(magnitudes.items()))
    weight = base_weights[strip_peft_prefix(name.split(".lora_magnitude_vector")[0]) + ".weight"]
    assert not torch.allclose(magnitude.detach(), weight.norm(dim=1))
    plain = PeftModel.from_pretrained(base, str(result.output_dir)).eval()
    processor = load_model(tiny_model_dir(QWEN)).processor
    batch = batch_for(processor, result.trainer.spec)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, plain(**batch).logits, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_rslora_scales_by_the_square_root_of_the_rank(tiny_model_dir, rslora):
    loaded = load_model(tiny_model_dir(QWEN))
    args = FinetuneArguments(use_rslora=rslora, lora_r=16, lora_alpha=32)
    model = apply_finetuning(loaded.model, loaded.spec, args)
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
    assert scalings == {32 / math.sqrt(16) if rslora else 32 / 16}


# --- QLoRA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_and_saves_on_cpu_with_the_vision_tower_unquantised(tiny_model_dir, shapes_data, tmp_path, bits):
    import bitsandbytes as bnb

    result = run(tiny_model_dir, shapes_data, tmp_path / f"q{bits}", **{f"load_in_{bits}bit": True})
    model = result.trainer.model
    spec = result.trainer.spec
    quant_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantised = {part_of(strip_peft_prefix(n), spec) for n, m in model.named_modules() if isinstance(m, quant_cls)}
    assert quantised == {"language_model"}, "only the language model is quantised by default"
    vision = [m for n, m in model.named_modules() if part_of(strip_peft_prefix(n), spec) == "vision_tower"]
    assert not any(isinstance(m, quant_cls) for m in vision)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    log = json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]
    assert all(math.isfinite(e["loss"]) for e in log if "loss" in e)
    # The adapter saved from a quantised model loads onto the full-precision base.
    saved = load_file(result.output_dir / "adapter_model.safetensors")
    assert saved and all(".lora_" in k for k in saved)
    plain = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(tiny_model_dir(QWEN)), str(result.output_dir)
    )
    assert sum("lora_B" in n for n, _ in plain.named_parameters()) == len(lora_b)


# --- per-part learning rates ----------------------------------------------------------------------


@pytest.mark.parametrize("zero_rates", [False, True])
def test_vision_and_projector_learning_rates(tiny_model_dir, shapes_data, tmp_path, zero_rates):
    rates = dict(vision_lr=0.0, projector_lr=0.0) if zero_rates else {}
    result = run(tiny_model_dir, shapes_data, tmp_path / "lr", freeze_projector=False, train_vision_lora=True, **rates)
    model, spec = result.trainer.model, result.trainer.spec
    base = dict(AutoModelForImageTextToText.from_pretrained(tiny_model_dir(QWEN)).named_parameters())
    projector = {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and part_of(strip_peft_prefix(n), spec) == "projector"
    }
    assert projector, "the unfrozen projector trains (saved with the adapter)"
    projector_moved = any(
        not torch.equal(p, base[strip_peft_prefix(n).replace(".modules_to_save.default", "")])
        for n, p in projector.items()
    )
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    moved = {part_of(strip_peft_prefix(n), spec) for n, p in lora_b.items() if p.abs().sum() > 0}
    # The scheduler scales each group from its own starting rate.
    groups = {g["part"]: g["initial_lr"] for g in result.trainer.optimizer.param_groups} if zero_rates else {}
    if zero_rates:
        assert not projector_moved and moved == {"language_model"}
        assert groups["vision_tower"] == 0.0 and groups["projector"] == 0.0
        assert groups["language_model"] > 0
    else:
        assert projector_moved and moved == {"language_model", "vision_tower"}


# --- gradient checkpointing and attention ---------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, shapes_data, tmp_path):
    plain = run(tiny_model_dir, shapes_data, tmp_path / "plain")
    ckpt = run(tiny_model_dir, shapes_data, tmp_path / "ckpt", gradient_checkpointing=True)
    assert ckpt.trainer.model.base_model.model.is_gradient_checkpointing
    assert ckpt.trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    a = load_file(plain.output_dir / "adapter_model.safetensors")
    b = load_file(ckpt.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_flash_attention_falls_back_to_sdpa_without_a_gpu(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_attn_implementation("flash_attention_2") == "sdpa"
    assert "flash_attention_2" in caplog.text
    assert resolve_attn_implementation("eager") == "eager"
    loaded = load_model(tiny_model_dir(QWEN), attn_implementation="flash_attention_2")
    assert loaded.model.config._attn_implementation == "sdpa"


# --- early stopping and the best checkpoint -------------------------------------------------------

EVAL_EVERY_2 = dict(
    max_steps=40,
    per_device_train_batch_size=2,
    max_train_samples=20,
    max_eval_samples=4,
    eval_strategy="steps",
    eval_steps=2,
    save_strategy="steps",
    save_steps=2,
    logging_steps=2,
)


@pytest.mark.parametrize(
    "stopping, stop_step",
    [
        # No evaluation improves by 1e9: stop after `patience` evaluations past the first (steps 2, 4, 6).
        (dict(early_stopping_patience=2, early_stopping_threshold=1e9), 6),
        # 15% of 40 steps = 6 steps = 3 evaluations of patience (steps 2, 4, 6, 8).
        (dict(early_stopping_patience_ratio=0.15, early_stopping_threshold=1e9), 8),
    ],
)
def test_early_stopping_patience_in_evaluations_or_as_a_ratio(
    tiny_model_dir, shapes_data, tmp_path, stopping, stop_step
):
    result = run(tiny_model_dir, shapes_data, tmp_path / "es", eval_data=True, **EVAL_EVERY_2, **stopping)
    assert result.trainer.state.global_step == stop_step


def test_early_stopping_lets_an_improving_run_finish_and_keeps_the_best_checkpoint(
    tiny_model_dir, shapes_data, tmp_path
):
    settings = dict(EVAL_EVERY_2, max_steps=8, save_total_limit=None)
    result = run(
        tiny_model_dir,
        shapes_data,
        tmp_path / "best",
        eval_data=True,
        early_stopping_patience=3,
        load_best_model_at_end=True,
        **settings,
    )
    state = result.trainer.state
    assert state.global_step == 8, "eval loss keeps improving early in training: no stop"
    evals = {e["step"]: e["eval_loss"] for e in state.log_history if "eval_loss" in e}
    best_step = min(evals, key=evals.get)
    assert state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    final = load_file(result.output_dir / "adapter_model.safetensors")
    best = load_file(Path(state.best_model_checkpoint) / "adapter_model.safetensors")
    assert all(torch.equal(final[k], best[k]) for k in final)


def test_early_stopping_needs_evaluations(tiny_model_dir, shapes_data, tmp_path):
    with pytest.raises(UsageError, match="eval_strategy"):
        run(tiny_model_dir, shapes_data, tmp_path / "x", early_stopping_patience=2)


# --- resume ---------------------------------------------------------------------------------------


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


# Trains in a separate process that SIGKILLs itself once checkpoint-4 is on disk, as a preempted job dies:
# no exception unwinds, nothing is flushed or closed.
KILLED_RUN = """
import os, signal, sys
from transformers import TrainerCallback
from tests.helpers import short_run

class Kill(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

model_dir, train, out = sys.argv[1:4]
short_run(model_dir, {"train": train}, out, callbacks=[Kill()], save_strategy="steps", save_steps=4,
          max_steps=9, per_device_train_batch_size=2, lora_dropout=0.1, lr_scheduler_type="cosine", warmup_steps=2)
"""


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tiny_model_dir, shapes_data, tmp_path):
    # Dropout on (RNG state matters), 12 rows in batches of 2 (the run crosses an epoch boundary, so the
    # data order of the second epoch matters), a decaying schedule (the scheduler state matters).
    settings = dict(
        max_steps=9, per_device_train_batch_size=2, lora_dropout=0.1, lr_scheduler_type="cosine", warmup_steps=2
    )
    straight = run(tiny_model_dir, shapes_data, tmp_path / "straight", **settings)
    out = tmp_path / "resumed"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, tiny_model_dir(QWEN), str(shapes_data["train"]), str(out)],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "checkpoint-4").is_dir() and not (out / "adapter_model.safetensors").exists()
    counter = CountSteps()
    resumed = run(
        tiny_model_dir,
        shapes_data,
        out,
        save_strategy="steps",
        save_steps=4,
        resume_from_checkpoint="latest",
        callbacks=[counter],
        **settings,
    )
    assert resumed.trainer.state.global_step == 9 and counter.steps == 5, "continued from step 4"
    a = load_file(straight.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-7), key


# --- FSDP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_fsdp_wraps_the_family_layers_unless_told(tiny_model_dir, tmp_path, family):
    from vlmtune.config import VlmTrainingArguments
    from vlmtune.train.fsdp import default_fsdp_wrap

    loaded = load_model(tiny_model_dir(family))
    args = VlmTrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True)
    classes = default_fsdp_wrap(args, loaded.model, loaded.spec)
    assert set(classes) == set(loaded.spec.decoder_layers) | {loaded.spec.vision_layer}
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == ",".join(classes)
    chosen = VlmTrainingArguments(
        output_dir=str(tmp_path), fsdp=True, fsdp_config={"transformer_layer_cls_to_wrap": ["X"]}, use_cpu=True
    )
    assert default_fsdp_wrap(chosen, loaded.model, loaded.spec) is None
    assert chosen.fsdp_config["transformer_layer_cls_to_wrap"] == ["X"]
    assert default_fsdp_wrap(VlmTrainingArguments(output_dir=str(tmp_path)), loaded.model, loaded.spec) is None


def expert_lora(model) -> dict[str, torch.Tensor]:
    """LoRA B matrices PEFT put on fused expert parameters (`target_parameters`), by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n}


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_vl_moe", "glm4v_moe"])
def test_lora_target_experts_adapts_the_fused_expert_weights_and_trains(tiny_model_dir, shapes_data, tmp_path, family):
    model_dir = tiny_model_dir(family)
    loaded = load_model(model_dir)
    default = apply_finetuning(loaded.model, loaded.spec, FinetuneArguments())
    assert not expert_lora(default), "experts are not adapted by default"
    result = short_run(model_dir, shapes_data, tmp_path / "out", lora_target_experts=True, learning_rate=1e-2)
    model = result.trainer.model
    adapted = [strip_peft_prefix(n).split(".lora_B")[0] for n in expert_lora(model)]
    # gate_up_proj and down_proj of each sparse layer's experts (GLM-4.5V's first layer is dense): one LoRA
    # each (PEFT nests the second).
    fused = expert_parameters(loaded.model, loaded.spec)
    assert fused and sorted(adapted) == sorted(p.rsplit(".", 1)[0] for p in fused)
    assert all(b.abs().sum() > 0 for b in expert_lora(model).values()), "B starts at zero: trained"
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert len(saved["target_parameters"]) == len(fused)


def test_lora_target_experts_on_a_dense_model_is_refused(tiny_model_dir):
    loaded = load_model(tiny_model_dir("qwen3_5"))
    with pytest.raises(UsageError, match="--lora_target_experts: qwen3_5 has no routed experts"):
        apply_finetuning(loaded.model, loaded.spec, FinetuneArguments(lora_target_experts=True))
