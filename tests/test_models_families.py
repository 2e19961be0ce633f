"""Every family: build the tiny model, train LoRA, frozen parts untouched, plain-PEFT reload, generate."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText

from tests.helpers import short_run
from vlmtune.data.collate import VlmCollator
from vlmtune.data.prepare import Preparer
from vlmtune.data.schema import Conversation, detect_schema
from vlmtune.eval.generate import generate_answers
from vlmtune.models import derive
from vlmtune.models.loading import decoder_layer_classes, load_model, load_processing, part_of, strip_peft_prefix
from vlmtune.models.registry import OVERRIDES
from vlmtune.models.tiny import BUILDERS

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]


def batch_for(processor, spec, colours=("red", "blue")):
    """A two-row training batch built by vlmtune's own collator."""
    rows = [
        {
            "__index__": i,
            "messages": PROMPT + [{"role": "assistant", "content": [{"type": "text", "text": colour}]}],
            "images": [Image.new("RGB", (64, 64), colour)],
        }
        for i, colour in enumerate(colours)
    ]
    return VlmCollator(processor, Preparer(detect_schema(["messages", "images"]), spec.encoding))(rows)


def test_every_registered_family_has_a_tiny_builder():
    built_types = {"llava_siglip": "llava"}
    assert set(OVERRIDES) <= {built_types.get(f, f) for f in BUILDERS}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_family_trains_lora_keeps_frozen_parts_reloads_and_generates(family, tiny_model_dir, shapes_data, tmp_path):
    model_dir = tiny_model_dir(family)
    base = load_model(model_dir)
    spec = base.spec
    model_type = base.model.config.model_type
    assert spec.derived if model_type not in OVERRIDES else spec.model_type == model_type, "from config.model_type"
    # The registry's keys account for every parameter: nothing falls into "other".
    assert {part_of(n, spec) for n, _ in base.model.named_parameters()} == {
        "vision_tower",
        "projector",
        "language_model",
    }
    layers = decoder_layer_classes(base.model, spec)
    assert layers and set(layers) <= set(spec.decoder_layers)
    assert base.processor.tokenizer.convert_tokens_to_ids(spec.image_token) != base.processor.tokenizer.unk_token_id

    result = short_run(model_dir, shapes_data, tmp_path / "out")
    trained = result.trainer.model.eval()

    # Frozen parts bit-identical; LoRA only in the language model, and it moved.
    base_params = dict(base.model.named_parameters())
    seen, lora = set(), []
    for name, param in trained.named_parameters():
        if "lora_" in name:
            lora.append((name, param))
            continue
        seen.add(strip_peft_prefix(name))
        assert torch.equal(param, base_params[strip_peft_prefix(name)]), name
    assert seen == set(base_params)
    assert lora and all(part_of(strip_peft_prefix(n), spec) == "language_model" for n, _ in lora)
    assert any(p.abs().sum() > 0 for n, p in lora if "lora_B" in n), "training must change the adapter"

    # Plain PEFT reload of what was saved: identical logits, identical greedy answers.
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), str(result.output_dir))
    plain.eval()
    batch = batch_for(base.processor, spec)
    with torch.no_grad():
        ours, theirs = trained(**batch).logits, plain(**batch).logits
    assert torch.equal(ours, theirs)
    convs = [Conversation(messages=PROMPT, images=["x"])] * 2
    images = [[Image.new("RGB", (64, 64), "green")], [Image.new("RGB", (80, 64), "blue")]]
    kwargs = dict(max_new_tokens=4, min_new_tokens=4)  # 4 new tokens, whatever the weights
    answers = generate_answers(trained, base.processor, convs, images, **kwargs)
    assert answers == generate_answers(plain, base.processor, convs, images, **kwargs)
    assert all(isinstance(a, str) for a in answers)


def test_an_unregistered_architecture_is_derived_and_explicit_targets_still_win(
    tiny_model_dir, shapes_data, tmp_path, monkeypatch, caplog
):
    registered = load_processing(tiny_model_dir("qwen2_vl"))[1]
    monkeypatch.delitem(OVERRIDES, "qwen2_vl")
    monkeypatch.setattr(derive, "_described", set())  # printed once per process: not yet in this one
    with caplog.at_level(logging.WARNING):
        spec = load_processing(tiny_model_dir("qwen2_vl"))[1]
    assert spec.derived and "derived from the checkpoint" in caplog.text and "model.visual.merger" in caplog.text
    for fact in ("vision_keys", "projector_keys", "language_keys", "image_token", "turn_end", "decoder_layers"):
        assert getattr(spec, fact) == getattr(registered, fact), fact
    assert set(spec.image_extra_tokens) == set(registered.image_extra_tokens)
    assert spec.packing_refusal, "packing an unregistered family is refused"
    result = short_run(
        tiny_model_dir("qwen2_vl"), shapes_data, tmp_path / "out", lora_target_modules=["q_proj", "v_proj"]
    )
    lora = {n for n, _ in result.trainer.model.named_parameters() if "lora_A" in n}
    assert lora and all(".language_model." in n and (".q_proj." in n or ".v_proj." in n) for n in lora)
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert "q_proj" in str(config["target_modules"])


def test_models_docs_list_every_family_and_checkpoint():
    from pathlib import Path

    docs = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    for entry in OVERRIDES.values():
        assert f"(`{entry.model_type}`)" in docs, entry.model_type
        for checkpoint in entry.example_checkpoints:
            assert f"`{checkpoint}`" in docs, checkpoint
    for family in BUILDERS:
        assert f"`{family}`" in docs, family
    assert "docs/models.md" in (Path(__file__).parents[1] / "README.md").read_text()


@pytest.mark.parametrize(
    "family", ["mllama", "idefics3", "idefics2", "qwen2_vl", "internvl", "glm4v", "llava_onevision"]
)
def test_a_text_only_row_trains_in_a_batch_with_image_rows_as_it_would_alone(family, tiny_model_dir):
    """Mixed data (some rows without an image) batches with per-row image inputs too (Mllama's pixel_values
    and cross-attention mask, Idefics2's and Idefics3's pixel_values, LLaVA-OneVision's image count per row)
    and with per-image ones (Qwen2-VL's and GLM-4.1V's patches and 3-D positions, InternVL's tiles): the
    text-only row's loss in the batch is its loss alone, and the image rows' are theirs."""
    base = load_model(tiny_model_dir(family))
    model, collate = (
        base.model.eval(),
        VlmCollator(base.processor, Preparer(detect_schema(["messages", "images"]), base.spec.encoding)),
    )
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Say red."}]}, _answer("red")]
    rows = [
        {"__index__": 0, "messages": PROMPT + [_answer("blue")], "images": [Image.new("RGB", (64, 64), "blue")]},
        {"__index__": 1, "messages": text_only, "images": []},
        {"__index__": 2, "messages": PROMPT + [_answer("green")], "images": [Image.new("RGB", (64, 64), "green")]},
    ]

    def losses(batch) -> torch.Tensor:
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return (per_token * (labels != -100)).sum(1) / (labels != -100).sum(1)

    together = losses(collate(rows))
    alone = torch.cat([losses(collate([row])) for row in rows])
    if family == "mllama":
        # Alone, a text-only row skips the cross-attention layers; in a batch with images they attend to the
        # zero image of its row (transformers masks their MLP, not their attention, for such rows), as in any
        # batch the processor itself pads. The image rows are exact; the text-only row trains, close to alone.
        torch.testing.assert_close(together[[0, 2]], alone[[0, 2]], rtol=1e-4, atol=1e-4)
        assert torch.isfinite(together[1]) and abs(together[1] - alone[1]) < 0.1 * alone[1]
        return
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def _answer(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_generation_stops_at_the_templates_end_of_turn_where_the_checkpoint_names_only_eos(tiny_model_dir, tmp_path):
    """A checkpoint whose generation_config.json names only the tokenizer's EOS (Idefics2's turns end with
    `<end_of_utterance>`) still stops answering where its template ends an assistant turn: evaluation and
    `vlmtune predict` answers would otherwise run on past the turn."""
    model_dir = tmp_path / "idefics2"
    shutil.copytree(tiny_model_dir("idefics2"), model_dir)
    config_file = model_dir / "generation_config.json"
    processor, _ = load_processing(str(model_dir))
    eos, turn_end = processor.tokenizer.convert_tokens_to_ids(["</s>", "<end_of_utterance>"])
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "eos_token_id": eos}))
    assert turn_end in load_model(str(model_dir)).model.generation_config.eos_token_id
