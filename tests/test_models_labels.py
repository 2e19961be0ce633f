"""Every family's label mask, token by token, against an independent reader of its chat format."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.helpers import family_spec
from vlmtune.data.collate import VlmCollator
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.data.prepare import Preparer
from vlmtune.data.schema import detect_schema
from vlmtune.models.loading import load_model
from vlmtune.models.processors import load_processor
from vlmtune.models.tiny import BUILDERS

# Per tiny family: the text that opens an assistant turn in the family's real chat format, and the
# token that closes it (trained, so the model learns to stop); a pair where an answer a user turn follows
# closes differently from the last one.
MARKERS = {
    "qwen2_vl": ("<|im_start|>assistant\n", "<|im_end|>"),
    "qwen2_5_vl": ("<|im_start|>assistant\n", "<|im_end|>"),
    "qwen3_vl": ("<|im_start|>assistant\n", "<|im_end|>"),
    "qwen3_vl_moe": ("<|im_start|>assistant\n", "<|im_end|>"),
    "llava": (" ASSISTANT:", "</s>"),
    "llava_siglip": (" ASSISTANT:", "</s>"),
    "llava_next": (" [/INST]", "</s>"),
    # Mistral Small 3.1's real template: the answer follows [/INST] directly and ends with </s>.
    "mistral3": ("[/INST]", "</s>"),
    "internvl": ("<|im_start|>assistant\n", "<|im_end|>"),
    "llava_onevision": ("<|im_start|>assistant\n", "<|im_end|>"),
    # GLM-4.1V's real template closes no turn: the next turn's <|user|> closes an answer (the generation
    # config stops on it), the tokenizer's EOS is appended to the last.
    "glm4v": ("<|assistant|>\n", ("<|user|>", "<|endoftext|>")),
    "glm4v_moe": ("<|assistant|>\n", ("<|user|>", "<|endoftext|>")),  # ships GLM-4.1V's template (see the recipe)
    "gemma3": ("<start_of_turn>model\n", "<end_of_turn>"),
    "mllama": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "idefics2": ("Assistant:", "<end_of_utterance>"),
    "idefics3": ("Assistant:", "<end_of_utterance>"),
    "smolvlm": ("Assistant:", "<end_of_utterance>"),
    # Prefix-LM: the answer (suffix) follows the prefix's closing newline and ends with EOS.
    "paligemma": ("\n", "<eos>"),
    # Qwen3.5's real template: the turns after the last user message open with an empty think block the
    # template writes whatever the answer: an input, never a target (skipped after the opener).
    "qwen3_5": ("<|im_start|>assistant\n", "<|im_end|>", "<think>\n\n</think>\n\n"),
    "qwen3_5_moe": ("<|im_start|>assistant\n", "<|im_end|>", "<think>\n\n</think>\n\n"),
    # Gemma 4's real template: its generation prompt (thinking off) ends in an empty thought channel that its
    # rendered history leaves out; training inserts it before each answer, as input, never a target.
    "gemma4": ("<|turn>model\n", "<turn|>", "<|channel>thought\n<channel|>"),
}

MULTI_TURN = [
    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And the second one?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a blue circle"}]},
]
SINGLE_TURN = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "square"}]},
]


def _closers(family: str) -> tuple[str, str]:
    """(what closes an answer a user turn follows, what closes the last answer)."""
    closer = MARKERS[family][1]
    return closer if isinstance(closer, tuple) else (closer, closer)


def expected_labels(tokenizer, ids: list[int], family: str, last_only: bool) -> list[int]:
    """Mark the tokens after each assistant opener up to and including the closing token."""
    opener = tokenizer(MARKERS[family][0], add_special_tokens=False)["input_ids"]
    closers = {tokenizer.convert_tokens_to_ids(t) for t in _closers(family)}
    skip = tokenizer(MARKERS[family][2], add_special_tokens=False)["input_ids"] if len(MARKERS[family]) > 2 else []
    labels, inside, turns, skipping = [IGNORE_INDEX] * len(ids), False, [], 0
    for i, tok in enumerate(ids):
        if skipping:
            skipping -= 1
        elif inside and not turns[-1] and skip and ids[i : i + len(skip)] == skip:
            skipping = len(skip) - 1
        elif inside:
            labels[i] = tok
            turns[-1].append(i)
            inside = tok not in closers
        elif ids[max(0, i - len(opener) + 1) : i + 1] == opener:
            inside = True
            turns.append([])
    if last_only:  # a prefix-LM family trains the final answer only
        for turn in turns[:-1]:
            for i in turn:
                labels[i] = IGNORE_INDEX
    return labels


def test_markers_cover_every_family():
    assert set(MARKERS) == set(BUILDERS)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_labels_cover_exactly_the_answers(tiny_model_dir, family):
    loaded = load_model(tiny_model_dir(family))
    processor, spec = loaded.processor, loaded.spec
    rows = [
        {
            "__index__": 0,
            "messages": MULTI_TURN,
            "images": [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (96, 64), "blue")],
        },
        {"__index__": 1, "messages": SINGLE_TURN, "images": [Image.new("RGB", (64, 64), "green")]},
    ]
    batch = VlmCollator(processor, Preparer(detect_schema(["messages", "images"]), spec.encoding))(rows)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(spec.image_token)
    last_only = spec.prefix_suffix
    for i in range(len(rows)):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        length = int(batch["attention_mask"][i].sum())
        assert batch["attention_mask"][i, :length].all(), "training batches are right-padded"
        assert labels[:length] == expected_labels(tokenizer, ids[:length], family, last_only)
        assert all(label == IGNORE_INDEX for label in labels[length:]), "padding must not be trained"
        # Each image expands to its feature tokens (Mllama's one token reaches them by cross-attention).
        assert ids.count(image_id) >= (1 if family == "mllama" else 4)
        assert all(lab == IGNORE_INDEX for tok, lab in zip(ids, labels) if tok == image_id)
    trained = [tokenizer.decode([t for t in batch["labels"][i].tolist() if t != IGNORE_INDEX]) for i in range(2)]
    between, eos = _closers(family)
    first = "" if last_only else f"red{between}"
    assert trained[0].replace(" ", "") == f"{first}abluecircle{eos}"
    assert trained[1].strip() == f"square{eos}"


def test_train_on_prompt_trains_the_text_but_never_image_tokens(tiny_model_dir):
    processor = load_processor(tiny_model_dir("qwen2_vl"))
    spec = family_spec("qwen2_vl")
    row = {"__index__": 0, "messages": SINGLE_TURN, "images": [Image.new("RGB", (64, 64), "green")]}
    preparer = Preparer(detect_schema(["messages", "images"]), spec.encoding)
    collator = VlmCollator(processor, preparer, train_on_prompt=True)
    batch = collator([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids(spec.image_token)
    trained_text = processor.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert "Shape?" in trained_text and "square<|im_end|>" in trained_text
    assert ids.count(image_id) >= 4
    assert not any(lab == image_id for lab in labels), "image tokens are inputs, never targets"
