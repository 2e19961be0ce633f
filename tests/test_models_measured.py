"""Every architecture transformers can load as image-text-to-text, measured on a tiny model: none trains
with wrong labels, a LoRA coverage gap or an adapted vision tower, and docs/models.md says what was measured.

A user reads docs/models.md's "Measured" table to learn whether vlmtune trains their architecture
correctly; a row that drifted from what vlmtune does now would mislead them, and a WRONG one is a bug.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from vlmtune.config import FinetuneArguments
from vlmtune.data.collate import VlmCollator
from vlmtune.data.prepare import Preparer
from vlmtune.data.schema import detect_schema
from vlmtune.eval import measure
from vlmtune.models import catalog
from vlmtune.models.derive import family_for
from vlmtune.models.loading import apply_finetuning
from vlmtune.models.registry import OVERRIDES

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
TYPES = sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


@pytest.fixture(scope="module")
def measured() -> dict[str, measure.Measured]:
    return {m.model_type: m for m in measure.measure_all()}


@pytest.mark.parametrize(
    "model_type",
    [
        pytest.param(t, marks=pytest.mark.xfail(strict=True, reason=measure.KNOWN_WRONG[t]))
        if t in measure.KNOWN_WRONG
        else t
        for t in TYPES
    ],
)
def test_no_architecture_measures_wrong(measured, model_type):
    found = measured[model_type]
    assert found.outcome in measure.OUTCOMES
    assert found.outcome != "WRONG", found.detail


def test_docs_list_every_architecture_with_the_outcome_measured_now(measured):
    text = DOCS.read_text()
    documented = re.search(r"Measured on \S+ with transformers (\S+) ", text).group(1)
    if documented != transformers.__version__:
        pytest.skip(f"docs/models.md was measured on transformers {documented}, this is {transformers.__version__}")
    rows = measure.read_section(text)
    assert sorted(rows) == TYPES
    stale = {t: (rows[t], (m.outcome, m.template)) for t, m in measured.items() if rows[t] != (m.outcome, m.template)}
    assert not stale, f"docs/models.md's Measured section is stale: run `{measure.COMMAND}` ({stale})"
    assert catalog.measured() == {t: m.outcome for t, m in measured.items()}, f"stale {catalog.MEASURED_FILE}"


def test_models_command_says_what_was_measured_for_derived_architectures(measured):
    """`vlmtune models` tells a user whose architecture is derived whether its tiny model trained."""
    verdicts = {a.model_type: a for a in catalog.architectures()}
    assert measured["janus"].outcome == "trains" and verdicts["janus"].status == "derived"
    assert "stand-in chat template trains with exact labels" in verdicts["janus"].reason
    assert "derivation refuses it" in verdicts["blip-2"].reason


def test_outcomes_users_rely_on(measured):
    registered = {t for t in OVERRIDES if t in measured} - set(measure.KNOWN_WRONG)
    assert registered and all(measured[t].outcome == "trains" for t in registered), "registered families train"
    assert all(measured[t].template == "real" for t in registered)
    llama4 = measured["llama4"]
    assert llama4.outcome == "not buildable here" and "torchvision" in llama4.detail and "untested" in llama4.detail
    assert measured["gemma3n"].outcome == "not buildable here" and "timm" in measured["gemma3n"].detail
    assert measured["janus"] == measure.Measured("janus", "trains", "stand-in", measured["janus"].detail)
    assert measured["blip-2"].outcome == "refused" and "image token" in measured["blip-2"].detail
    # Families users fine-tune whose tiny models need the checkpoints' geometry (InternVL's and Aya's pixel
    # shuffle, GLM's and ERNIE's rotary sections, OneVision's token count, VipLLaVA's five feature layers), and
    # Cosmos 3 Edge, whose processor returns its 3-D position inputs only when asked: all train.
    for model_type in ("internvl", "aya_vision", "glm4v", "ernie4_5_vl_moe", "llava_onevision", "vipllava",
                       "cosmos3_edge"):
        assert measured[model_type].outcome == "trains", (model_type, measured[model_type].detail)


def _qwen2_vl():
    config, processor, _ = measure._built("qwen2_vl")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    return model, processor, family_for(config, processor, model=model)


def test_the_checks_catch_a_wrong_label_and_a_coverage_gap():
    """The measurement can fail: one label too many, or LoRA on the attention only, is reported."""
    model, processor, spec = _qwen2_vl()
    row = measure.rows(multi_image=False)[1]
    collator = VlmCollator(processor, Preparer(detect_schema(["messages", "images"]), spec.encoding))
    labels = collator([row])["labels"][0].tolist()
    assert measure.label_problem(processor.tokenizer, spec, row, labels) is None
    first = next(i for i, label in enumerate(labels) if label != -100)
    labels[first - 1] = 42  # the token before the answer trained too
    assert "trained" in measure.label_problem(processor.tokenizer, spec, row, labels)
    expected = measure.lora_expected(model, spec)
    tuned = apply_finetuning(model, spec, FinetuneArguments(lora_target_modules=["q_proj"]))
    assert "coverage gap" in measure.coverage_problem(expected, tuned, spec)
