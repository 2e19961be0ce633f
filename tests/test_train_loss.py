"""Loss only where labels are: the same loss and gradients as the model's own full-logits forward.

vlmtune never builds the `batch x length x vocabulary` logits; these tests hold it to the number a user
would get from `model(**batch).loss` (fp32, 1e-5) and to the same gradients, per family, with LoRA, with
the output layer trained (PEFT `modules_to_save` or LoRA on it) and with a full fine-tune.
"""

from __future__ import annotations

import csv

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

from tests.helpers import family_spec, short_run
from vlmtune.data.collate import VlmCollator
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.data.images import ImageOptions
from vlmtune.data.prepare import Preparer
from vlmtune.data.schema import detect_schema
from vlmtune.errors import UsageError
from vlmtune.models.loading import load_model
from vlmtune.models.loss import labelled_forward, labelled_nll_per_row, use_router_aux_loss
from vlmtune.models.processors import load_processor


def shapes_batch(model_dir: str, shapes_data, n: int = 3) -> dict:
    """`n` shapes rows collated by vlmtune's collator (answers labelled, everything else -100)."""
    processor = load_processor(model_dir)
    with open(shapes_data["train"]) as f:
        rows = [dict(row, __index__=i) for i, row in zip(range(n), csv.DictReader(f))]
    model_type = AutoModelForImageTextToText.from_pretrained(model_dir).config.model_type
    preparer = Preparer(detect_schema(list(rows[0])), family_spec(model_type).encoding)
    preparer.images = ImageOptions(base_dirs=(shapes_data["train"].parent,))
    return dict(VlmCollator(processor, preparer)(rows))


def lora(model, **extra):
    torch.manual_seed(0)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **extra}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    for name, param in peft_model.named_parameters():  # LoRA B starts at zero: give it values so grads differ
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return peft_model


def loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.item(), grads


def assert_same_as_full_forward(model, batch: dict, num_items_in_batch=None) -> None:
    model.train()  # dropout is 0 in these models and adapters: train mode, deterministic
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    full_loss, full_grads = loss_and_grads(model, lambda: model(**batch, **extra).loss)
    ours_loss, ours_grads = loss_and_grads(model, lambda: labelled_forward(model, batch, num_items_in_batch)[0])
    assert abs(full_loss - ours_loss) < 1e-5, (full_loss, ours_loss)
    assert full_grads.keys() == ours_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3", "mllama"])
def test_lora_loss_and_gradients_equal_the_full_forward(family, tiny_model_dir, shapes_data):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(family), dtype=torch.float32)
    batch = shapes_batch(tiny_model_dir(family), shapes_data)
    assert (batch["labels"] != IGNORE_INDEX).sum() < batch["attention_mask"].sum() / 2  # answers are a few tokens
    assert_same_as_full_forward(lora(model), batch)


@pytest.mark.parametrize("on_output_layer", ["modules_to_save", "lora"])
def test_output_layer_trained_gives_the_same_loss_and_gradients(on_output_layer, tiny_model_dir, shapes_data):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_vl"), dtype=torch.float32)
    model.config.tie_word_embeddings = False
    if on_output_layer == "modules_to_save":
        peft_model = lora(model, modules_to_save=["lm_head"])
    else:
        peft_model = lora(model, target_modules=["q_proj", "v_proj", "lm_head"])
    batch = shapes_batch(tiny_model_dir("qwen2_vl"), shapes_data)
    assert any("lm_head" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    # The Trainer passes the token count of the whole accumulated batch under gradient accumulation.
    assert_same_as_full_forward(peft_model, batch, num_items_in_batch=torch.tensor(11))


def test_full_fine_tuning_gives_the_same_loss_and_gradients(tiny_model_dir, shapes_data):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("llava"), dtype=torch.float32)
    assert_same_as_full_forward(model, shapes_batch(tiny_model_dir("llava"), shapes_data))


def test_evaluation_nll_per_row_matches_the_full_logits(tiny_model_dir, shapes_data):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("gemma3"), dtype=torch.float32).eval()
    batch = shapes_batch(tiny_model_dir("gemma3"), shapes_data)
    with torch.no_grad():
        sums, counts = labelled_nll_per_row(model, batch)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
    torch.testing.assert_close(sums, nll.sum(dim=1), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()


def test_training_keeps_a_frozen_vision_tower_out_of_autograd(tiny_model_dir, shapes_data, tmp_path):
    """With gradient checkpointing on, transformers hooks the vision tower's patch embedding so its output
    requires grad; vlmtune removes that, so the frozen tower is neither stored for backward nor recomputed."""
    result = short_run(tiny_model_dir("qwen2_vl"), shapes_data, tmp_path, gradient_checkpointing=True)
    trainer, model = result.trainer, result.trainer.model
    assert model.base_model.model.is_gradient_checkpointing
    seen = []
    visual = model.base_model.model.model.visual
    handle = visual.register_forward_hook(lambda module, args, output: seen.append(output.pooler_output))
    batch = shapes_batch(tiny_model_dir("qwen2_vl"), shapes_data)
    model.train()
    loss = trainer.compute_loss(model, batch)
    handle.remove()
    loss.backward()
    assert seen and not seen[0].requires_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():  # the Trainer's loss is the plain forward's
        assert abs(loss.item() - model(**batch).loss.item()) < 1e-5


def moe_batch(loaded, shapes_data, n: int = 3) -> dict:
    """`n` shapes rows collated for `loaded` (its derived family's encoding)."""
    with open(shapes_data["train"]) as f:
        rows = [dict(row, __index__=i) for i, row in zip(range(n), csv.DictReader(f))]
    preparer = Preparer(detect_schema(list(rows[0])), loaded.spec.encoding)
    preparer.images = ImageOptions(base_dirs=(shapes_data["train"].parent,))
    return dict(VlmCollator(loaded.processor, preparer)(rows))


# Qwen3.5-MoE (routers beside a gated shared expert), Qwen3-VL-MoE (routers only, no shared expert) and
# GLM-4.5V (a dense first layer, then routers beside a shared expert).
MOE = ["qwen3_5_moe", "qwen3_vl_moe", "glm4v_moe"]


@pytest.mark.parametrize("family", MOE)
def test_moe_labelled_loss_keeps_the_router_load_balancing_loss(tiny_model_dir, shapes_data, family):
    loaded = load_model(tiny_model_dir(family))
    model, batch = loaded.model, moe_batch(loaded, shapes_data)
    assert use_router_aux_loss(model, None) == model.config.text_config.router_aux_loss_coef > 0
    with torch.no_grad():
        own = model(**batch)  # transformers adds coef * aux_loss to the loss when given labels
        loss, outputs, _ = labelled_forward(model, batch)
    assert float(loss) == pytest.approx(float(own.loss), abs=1e-5)
    lm_only = own.loss - model.config.text_config.router_aux_loss_coef * own.aux_loss
    assert float(own.aux_loss) > 0 and abs(float(loss - lm_only)) > 1e-4


@pytest.mark.parametrize("family", MOE)
def test_moe_training_loss_logged_includes_coef_times_router_loss(tiny_model_dir, shapes_data, tmp_path, family):
    first = {}
    for coef in (0.0, 1.0, 2.0):
        result = short_run(tiny_model_dir(family), shapes_data, tmp_path / str(coef), max_steps=1,
                           logging_steps=1, router_aux_loss_coef=coef)  # fmt: skip
        first[coef] = result.trainer.state.log_history[0]["loss"]
    aux = first[1.0] - first[0.0]  # step 1 runs before any update: the same LM loss and router loss
    assert aux > 0.1
    assert first[2.0] - first[0.0] == pytest.approx(2 * aux, abs=1e-3)


@pytest.mark.parametrize("family", MOE)
def test_moe_models_trained_with_the_router_loss_still_generate(tiny_model_dir, family):
    """Generation runs without router logits (GLM-4.5V's fail on cached steps in transformers 5.24), and the
    training setting is back afterwards."""
    from PIL import Image

    from vlmtune.data.conversation import Conversation
    from vlmtune.eval.generate import generate_answers

    loaded = load_model(tiny_model_dir(family))
    assert use_router_aux_loss(loaded.model, None) > 0
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    convs, images = [Conversation(messages=prompt, images=["x"])] * 2, [[Image.new("RGB", (64, 64))]] * 2
    answers = generate_answers(loaded.model, loaded.processor, convs, images, max_new_tokens=3, min_new_tokens=3)
    assert len(answers) == 2 and loaded.model.config.text_config.output_router_logits


def test_router_aux_loss_coef_on_a_dense_model_is_refused(tiny_model_dir):
    model = load_model(tiny_model_dir("qwen3_5")).model
    with pytest.raises(UsageError, match="--router_aux_loss_coef 0.1: qwen3_5_text is not a mixture-of-experts"):
        use_router_aux_loss(model, 0.1)
    assert use_router_aux_loss(model, None) == 0.0
