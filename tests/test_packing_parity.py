"""Packed batches are exact: per family, packing changes nothing a sample's training sees.

For every family the registry lets pack, samples of mixed lengths (different prompts and answers, two
images in one sample where the family takes several, images near a sample boundary) are encoded by the
real encoding path and packed with `pack_rows`. Then, in fp32: the loss equals the loss of the same
samples in an ordinary padded batch (same token-weighted mean) within 1e-5, LoRA gradients match, and
each sample's logits at its answer positions equal those of the sample run alone. The proof cannot pass
vacuously: without vlmtune's 3-D positions, Qwen-style batches give other numbers. Families packing
cannot keep apart are refused with their reason.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForImageTextToText, TrainingArguments

from tests.data_files import data_args, png, write_rows
from tests.helpers import family_spec
from tests.test_train_loss import lora, loss_and_grads
from vlmtune.data.collate import VlmCollator, pack_rows, pad_rows
from vlmtune.data.encode import IGNORE_INDEX, Encoded
from vlmtune.data.splits import build_splits
from vlmtune.errors import RunError, UsageError
from vlmtune.models import packing
from vlmtune.models.loading import with_chat_template
from vlmtune.models.loss import labelled_forward, labelled_positions
from vlmtune.models.packing import check_packing, multimodal_positions, packed_inputs, sample_spans
from vlmtune.models.processors import load_processor
from vlmtune.models.registry import OVERRIDES, UNCHECKED_PACKING, FamilySpec
from vlmtune.train.trainer import VlmTrainer

SUPPORTED = [name for name in OVERRIDES if not family_spec(name).packing_refusal]
REFUSED = [name for name in OVERRIDES if family_spec(name).packing_refusal]
# Families whose packed batches need more than restarting positions (what vlmtune adds on the model side).
HANDLED = [
    name for name in SUPPORTED if family_spec(name).packing_positions == "mrope" or family_spec(name).packing_masks
]
# Of those, the ones whose need is the model's own definition (3-D rotary positions derived per sample), not a
# gap in a transformers release's mask code that a later release may close (Gemma 3's and PaliGemma's masks:
# 5.24 builds PaliGemma's right by itself). For the mask families the guarantee is the parity above, whichever
# side builds the right mask.
DEFINITIONAL = [name for name in SUPPORTED if family_spec(name).packing_positions == "mrope"]
# Rows of two packs: [short + text-only (where there is one) + two-image sample], [long + padding tail].
PACKS = [[0, 3, 1], [2]]


def _message(role: str, *parts: dict) -> dict:
    return {"role": role, "content": list(parts)}


def _rows(folder, spec: FamilySpec) -> list[dict]:
    """Samples of different lengths. The first has its image after the question, so its image ends a few
    tokens before the next image-bearing sample's starts. The last has no image (PaliGemma's processor
    takes none: not for it)."""
    png(folder / "red.png", "red")
    png(folder / "wide.png", "blue", size=(96, 64))
    png(folder / "green.png", "green")
    image, text = {"type": "image"}, lambda t: {"type": "text", "text": t}
    second = ["wide.png", "green.png"] if spec.multi_image else ["wide.png"]
    rows = [
        {
            "messages": [_message("user", text("Colour?"), image), _message("assistant", text("red"))],
            "images": ["red.png"],
        },
        {
            "messages": [
                _message("user", *[image] * len(second), text("Are these two the same colour?")),
                _message("assistant", text("no: the first one is blue, the other green")),
            ],
            "images": second,
        },
        {
            "messages": [
                _message("user", image, text("Tell me, in one word, which colour fills the shape in this picture")),
                _message("assistant", text("green")),
            ],
            "images": ["green.png"],
        },
    ]
    text_only = [_message("user", text("And with no picture at all?")), _message("assistant", text("I cannot tell"))]
    return rows if spec.prefix_suffix else [*rows, {"messages": text_only}]


@dataclasses.dataclass
class Case:
    spec: FamilySpec
    model: torch.nn.Module
    samples: list[Encoded]
    pad: int

    def padded(self) -> dict:
        return pad_rows(self.samples, self.pad)

    @property
    def packs(self) -> list[list[int]]:
        return [[i for i in pack if i < len(self.samples)] for pack in PACKS]

    def packed(self) -> dict:
        return pack_rows([[self.samples[i] for i in pack] for pack in self.packs], self.pad)


@pytest.fixture(scope="session")
def case(tiny_model_dir, tmp_path_factory):
    """One family's tiny fp32 model (with the given attention implementation) and encoded samples, built
    once per session."""
    cases: dict[tuple[str, str], Case] = {}

    def get(family: str, attention: str = "sdpa") -> Case:
        if (family, attention) not in cases:
            spec = family_spec(family)
            folder = tmp_path_factory.mktemp(f"packing_{family}")
            path = write_rows(folder / "rows.jsonl", _rows(folder, spec))
            processor = with_chat_template(load_processor(tiny_model_dir(family)), spec.default_chat_template)
            splits = build_splits(data_args(str(path), val_split_ratio=0), spec.encoding, processor=processor)
            collator = VlmCollator(processor, splits.preparer)
            samples = [collator.encode(row) for row in splits.train]
            model = AutoModelForImageTextToText.from_pretrained(
                tiny_model_dir(family), dtype=torch.float32, attn_implementation=attention
            )
            cases[family, attention] = Case(spec, model, samples, processor.tokenizer.pad_token_id)
        return cases[family, attention]

    return get


@pytest.mark.parametrize("family", SUPPORTED)
def test_packed_loss_and_gradients_equal_the_padded_batch(family, case):
    c = case(family)
    lengths = [s.length for s in c.samples]
    assert len(set(lengths)) == len(lengths), "samples of different lengths"
    padded, packed = c.padded(), c.packed()
    assert (padded["labels"] != IGNORE_INDEX).sum() == (packed["labels"] != IGNORE_INDEX).sum()
    model = lora(c.model)
    model.train()  # dropout is 0 in these models and adapters
    try:
        padded_loss, padded_grads = loss_and_grads(model, lambda: labelled_forward(model, padded)[0])
        inputs = packed_inputs(model, c.spec, packed)  # through the PEFT wrapper, as training does
        packed_loss, packed_grads = loss_and_grads(model, lambda: labelled_forward(model, inputs)[0])
    finally:
        model.unload()  # the shared model without its adapter again
    assert abs(packed_loss - padded_loss) < 1e-5, (packed_loss, padded_loss)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _answer_logits(model, batch: dict) -> torch.Tensor:
    """Logits at the positions that predict an answer token, row by row."""
    keep = labelled_positions(batch["labels"])
    rest = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**rest, logits_to_keep=keep, use_cache=False).logits


# Masks are built per attention implementation (boolean for sdpa, additive for eager): both checked
# where vlmtune's handling builds or shapes them.
@pytest.mark.parametrize(
    "family,attention", [(f, "sdpa") for f in SUPPORTED] + [(f, "eager") for f in ("gemma3", "paligemma", "qwen2_vl")]
)
def test_each_packed_sample_has_the_logits_it_has_alone(family, attention, case):
    c = case(family, attention)
    model = c.model.eval()
    packed = _answer_logits(model, packed_inputs(model, c.spec, c.packed()))
    alone = [_answer_logits(model, pad_rows([c.samples[i]], c.pad)) for pack in c.packs for i in pack]
    assert packed.shape[0] == sum(a.shape[0] for a in alone) > len(alone)
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", SUPPORTED)
def test_under_flash_attention_packed_rows_go_as_one_row_with_the_same_loss(family, case, monkeypatch):
    """FlashAttention-2 keeps packed samples apart only in a one-row batch, so vlmtune lays the rows end
    to end for it. No flash kernel runs on CPU: the decision is forced, and the one row (with the
    block-diagonal mask sdpa builds from its positions) must give the padded batch's loss."""
    monkeypatch.setattr(packing, "is_flash_attention_requested", lambda config: True)
    c = case(family)
    model = c.model.eval()
    packed = c.packed()
    inputs = packed_inputs(model, c.spec, packed)
    assert inputs["input_ids"].shape == (1, packed["input_ids"].numel())
    with torch.no_grad():
        padded_loss = labelled_forward(model, c.padded())[0].item()
        one_row_loss = labelled_forward(model, inputs)[0].item()
    assert abs(one_row_loss - padded_loss) < 1e-5, (one_row_loss, padded_loss)


def test_gemma3_packed_masks_hold_when_its_sliding_window_cuts_inside_samples(case):
    """The tiny Gemma 3's window (64) is longer than its samples; at 6 tokens (shorter than an image's 4
    tokens plus its markers) the window cuts inside every sample and across image blocks."""
    c = case("gemma3")
    text_config = c.model.config.get_text_config()
    window, text_config.sliding_window = text_config.sliding_window, 6
    try:
        with torch.no_grad():
            padded_loss = labelled_forward(c.model.eval(), c.padded())[0].item()
            packed_loss = labelled_forward(c.model, packed_inputs(c.model, c.spec, c.packed()))[0].item()
    finally:
        text_config.sliding_window = window
    assert abs(packed_loss - padded_loss) < 1e-5, (packed_loss, padded_loss)


@pytest.mark.parametrize("family", DEFINITIONAL)
def test_without_the_family_handling_packed_batches_differ(family, case):
    """Restarting 1-D positions alone cannot give Qwen-style models their 3-D positions: the parity above
    rests on vlmtune's handling, in every transformers release."""
    c = case(family)
    model = c.model.eval()
    with torch.no_grad():
        padded_loss = labelled_forward(model, c.padded())[0].item()
        plain_loss = labelled_forward(model, c.packed())[0].item()
    assert abs(plain_loss - padded_loss) > 1e-4, (plain_loss, padded_loss)


@pytest.mark.parametrize("family", [n for n in SUPPORTED if family_spec(n).packing_positions == "mrope"])
def test_multimodal_positions_are_each_samples_own(family, case):
    """Row 0 keeps the restarting text positions (the sample boundaries); rows 1-3 are what the model's
    own rope-index function gives each sample alone, images included."""
    c = case(family)
    packed = c.packed()
    positions = multimodal_positions(c.model, packed)
    assert positions.shape == (4, *packed["input_ids"].shape)
    assert torch.equal(positions[0], packed["position_ids"])
    starts = iter(sample_spans(packed["position_ids"]))
    for pack in c.packs:
        for i in pack:
            row, start, end = next(starts)
            alone = {k: v for k, v in pad_rows([c.samples[i]], c.pad).items() if k not in ("labels", "pixel_values")}
            expected, _ = c.model.model.get_rope_index(**alone)
            assert torch.equal(positions[1:, row, start:end], expected[:, 0]), i
            has_image = "image_grid_thw" in alone
            assert has_image != torch.equal(expected[:, 0], expected[0, 0].expand(3, -1)), "3-D where images are"


def test_the_trainer_packs_its_batches_the_family_way(case, tmp_path):
    """`VlmTrainer.compute_loss` applies the family's handling to a packed batch (here Qwen2-VL's)."""
    c = case("qwen2_vl")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = VlmTrainer(model=c.model, args=args, spec=c.spec)
    c.model.eval()
    with torch.no_grad():
        packed_loss = trainer.compute_loss(c.model, c.packed()).item()
        padded_loss = labelled_forward(c.model, c.padded())[0].item()
    assert abs(packed_loss - padded_loss) < 1e-5, (packed_loss, padded_loss)


UNREGISTERED = FamilySpec("unregistered", (), (), (), "<image>", packing_refusal=UNCHECKED_PACKING)


@pytest.mark.parametrize("spec", [family_spec(n) for n in REFUSED] + [UNREGISTERED], ids=[*REFUSED, "unregistered"])
def test_families_packing_cannot_keep_apart_are_refused_with_the_reason(spec):
    with pytest.raises(UsageError) as err:
        check_packing(spec.packing_refusal, model_type=spec.model_type)
    message = str(err.value)
    assert "--packing" in message and spec.model_type in message and spec.packing_refusal in message
    with pytest.raises(UsageError):
        packed_inputs(torch.nn.Linear(1, 1), spec, {"position_ids": torch.zeros(1, 1)})


def test_paligemma_2_samples_longer_than_its_sliding_window_are_refused(case):
    """PaliGemma's packed mask serves every layer; with a sliding window (PaliGemma 2) that is exact only
    for samples no longer than the window, so a longer one stops with a message, not a wrong mask."""
    c = case("paligemma")
    text_config = c.model.config.get_text_config()
    unset = getattr(text_config, "sliding_window", None)
    text_config.sliding_window = 40
    try:
        with pytest.raises(RunError, match=r"sliding window \(40\).*--max_seq_length"):
            packed_inputs(c.model, c.spec, c.packed())
    finally:
        text_config.sliding_window = unset
