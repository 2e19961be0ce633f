"""Labels under the chat templates real checkpoints ship (tests/fixtures/chat_templates, sources in its
README), and `data inspect` showing exactly what training trains, for every registered family."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.data_files import data_args, png, write_rows
from tests.helpers import family_spec
from vlmtune.cli import main
from vlmtune.data import encode as encode_module
from vlmtune.data.collate import VlmCollator
from vlmtune.data.conversation import Conversation
from vlmtune.data.encode import IGNORE_INDEX, TemplateError, encode, prompt_text
from vlmtune.data.preview import inspect_sample
from vlmtune.data.splits import build_splits
from vlmtune.models.derive import family_for
from vlmtune.models.loading import load_processing
from vlmtune.models.registry import OVERRIDES
from vlmtune.models.tiny import BUILDERS
from vlmtune.models.tokenizer import build_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

# Per tiny family: the real template, what the trained text starts with after the generation prompt,
# what closes each trained answer (a pair where an answer a user turn follows closes differently from the
# last one), and whether the template trims answers (Gemma 3's does).
REAL = {
    "qwen2_vl": ("qwen2_vl", "", "<|im_end|>", False),
    "qwen2_5_vl": ("qwen2_vl", "", "<|im_end|>", False),
    "qwen3_vl": ("qwen3_vl", "", "<|im_end|>", False),
    # Qwen3-VL-MoE's Instruct checkpoints ship the Qwen3-VL-Instruct template (fixtures README).
    "qwen3_vl_moe": ("qwen3_vl", "", "<|im_end|>", False),
    "llava": ("llava_1_5", " ", "</s>", False),
    "llava_siglip": ("llava_1_5", " ", "</s>", False),
    "llava_next": ("llava_v1_6_mistral", "", "</s>", False),
    "mistral3": ("mistral3", "", "</s>", False),
    "llava_onevision": ("llava_onevision", "", "<|im_end|>", False),
    "internvl": ("internvl", "", "<|im_end|>", False),
    # GLM-4.1V's template closes no turn: the next <|user|> closes an answer, EOS is appended to the last.
    "glm4v": ("glm4v", "", ("<|user|>", "<|endoftext|>"), False),
    # GLM-4.5V's own template was not found (fixtures README): its tiny model is checked on GLM-4.1V's.
    "glm4v_moe": ("glm4v", "", ("<|user|>", "<|endoftext|>"), False),
    "gemma3": ("gemma3", "", "<end_of_turn>", True),
    "mllama": ("mllama", "", "<|eot_id|>", False),
    "idefics2": ("idefics2", " ", "<end_of_utterance>", False),
    "idefics3": ("idefics3", " ", "<end_of_utterance>", False),
    "smolvlm": ("smolvlm", " ", "<end_of_utterance>", False),
    # Qwen3.5 trims answers; its empty think block before the last answers is input, not trained.
    "qwen3_5": ("qwen3_5", "", "<|im_end|>", True),
    # Gemma 4 trims answers (its strip_thinking macro) and closes them with <turn|>.
    "gemma4": ("gemma4", "", "<turn|>", True),
}
IMAGE = "<image_soft_token>"
# Answers users write: trailing spaces, inner and trailing newlines.
ANSWERS = ("a red square  ", "two\nlines\n", "done")


def facts_of(family: str, source: str | None = None):
    """The tiny family's spec: its registry entry, or derived from its config and processor; with `source`
    (the saved tiny model), its generation config's stop tokens end turns too, as on loading."""
    config, processor = BUILDERS[family]()
    return family_for(config, processor, source)


def _text(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def real_processor(family: str, gemma_end_of_turn_special: bool = True):
    """The tiny family's processor with the checkpoint's own chat template swapped in."""
    _, processor = BUILDERS[family]()
    template = (TEMPLATES / f"{REAL[family][0]}.jinja").read_text()
    if family == "gemma3" and not gemma_end_of_turn_special:
        # As in some Gemma 3 tokenizers: <end_of_turn> is an ordinary added token, not a special one.
        tokenizer = build_tokenizer(
            {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
            ["<start_of_turn>"],
            named_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": IMAGE},
        )
        tokenizer.add_tokens(["<end_of_turn>"])
        assert "<end_of_turn>" not in tokenizer.all_special_tokens
        processor = type(processor)(processor.image_processor, tokenizer, image_seq_length=4)
    processor.chat_template = template
    return processor


def conversation(family: str, system: bool, images: int) -> tuple[Conversation, list]:
    """Three user/assistant turns (answers from `ANSWERS`); `images` images spread over the user turns."""
    first = [{"type": "image"} for _ in range(min(images, 2))]
    later = [{"type": "image"} for _ in range(images - len(first))]
    messages = [_text("system", "Be brief.")] if system else []
    messages += [
        {"role": "user", "content": first + [{"type": "text", "text": "What is it?"}]},
        _text("assistant", ANSWERS[0]),
        {"role": "user", "content": later + [{"type": "text", "text": "More?"}]},
        _text("assistant", ANSWERS[1]),
        _text("user", "Last one."),
        _text("assistant", ANSWERS[2]),
    ]
    pictures = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")[:images]]
    return Conversation(messages, images=pictures, meta={"source": "chat.jsonl", "row": 7}), pictures


def trained_text(processor, encoded) -> str:
    ids = [t for t in encoded.labels if t != IGNORE_INDEX]
    return processor.tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def expected_trained(family: str) -> str:
    _, lead, end, trims = REAL[family]
    between, last = end if isinstance(end, tuple) else (end, end)
    ends = [between] * (len(ANSWERS) - 1) + [last]
    return "".join(lead + (a.strip() if trims else a) + close for a, close in zip(ANSWERS, ends, strict=True))


def _cases(family: str) -> list[tuple[bool, int]]:
    spec = facts_of(family)
    many = 3 if spec.multi_image else 1
    if family == "mllama":  # its template refuses a system message next to images
        return [(True, 0), (False, many)]
    return [(True, many), (False, 0)]


@pytest.mark.parametrize("family", sorted(REAL))
def test_real_templates_train_each_answer_as_written_then_its_turn_end(family, tiny_model_dir):
    processor = real_processor(family)
    facts = facts_of(family, tiny_model_dir(family)).encoding
    eos_id = processor.tokenizer.eos_token_id
    for system, images in _cases(family):
        conv, pictures = conversation(family, system, images)
        encoded = encode(processor, conv, pictures, facts)
        assert trained_text(processor, encoded) == expected_trained(family), (system, images)
        image_ids = {processor.tokenizer.convert_tokens_to_ids(t) for t in facts.image_tokens}
        assert not any(label in image_ids for label in encoded.labels)
        if images and family != "mllama":  # each image expanded to its feature tokens
            assert encoded.input_ids.count(processor.tokenizer.convert_tokens_to_ids(facts.image_token)) >= 4 * images
        if system:
            text = encoded.rendered.text
            assert "Be brief." in text and "'type'" not in text, "the system text reaches the model as written"
        if REAL[family][0] in ("llava_1_5", "llava_v1_6_mistral"):  # EOS appended (1.5) or by the template (1.6)
            assert encoded.input_ids.count(eos_id) == len(ANSWERS), "one EOS per answer, never doubled"


def test_qwen3_5_trains_reasoning_only_where_the_answer_has_it_and_the_template_keeps_it():
    """An answer with its own think block trains the reasoning (what the model must produce after the
    generation prompt's ``<think>\\n``); an earlier turn's reasoning, which the template drops once a later
    user turn follows, is not trained; the empty think block the template writes is never trained."""
    processor = real_processor("qwen3_5")
    facts = facts_of("qwen3_5").encoding
    thought = "<think>\nit is red\n</think>\n\nred"
    turns = [_text("user", "Colour?"), _text("assistant", thought)]
    last = encode(processor, Conversation(turns), [], facts)
    assert trained_text(processor, last) == "it is red\n</think>\n\nred<|im_end|>"
    later = encode(processor, Conversation([*turns, _text("user", "And?"), _text("assistant", "blue")]), [], facts)
    assert "it is red" not in later.rendered.text, "the template drops earlier reasoning"
    assert trained_text(processor, later) == "red<|im_end|>blue<|im_end|>"
    assert later.rendered.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nblue<|im_end|>\n")


def test_gemma4_trains_each_answer_after_the_empty_thought_channel_its_generation_prompt_ends_with():
    """Gemma 4's generation prompt (thinking off) ends with an empty ``<|channel>thought\n<channel|>`` that its
    rendered history leaves out: each answer is trained after it (input, never a target), as the model
    answers at inference. Reasoning in an answer is stripped by the template, so it is neither seen nor
    trained."""
    processor = real_processor("gemma4")
    facts = facts_of("gemma4").encoding
    empty = "<|channel>thought\n<channel|>"
    turns = [_text("user", "Colour?"), _text("assistant", "<|channel>thought\nit is red<channel|>red")]
    turns += [_text("user", "And?"), _text("assistant", "blue")]
    encoded = encode(processor, Conversation(turns), [], facts)
    assert trained_text(processor, encoded) == "red<turn|>blue<turn|>"
    assert "it is red" not in encoded.rendered.text
    assert encoded.rendered.text.count(f"<|turn>model\n{empty}") == 2
    assert prompt_text(processor, turns[:1]).endswith(f"<|turn>model\n{empty}")


def test_glm4v_trains_reasoning_as_written_in_every_turn_its_template_keeps_it(tiny_model_dir):
    """GLM-4.1V-Thinking's template writes each answer as given, in every turn, and its generation prompt ends
    with ``<|assistant|>\n``: an answer without reasoning trains exactly that answer (nothing is inserted to
    train or not), an answer holding ``<think>...</think><answer>...</answer>`` trains it all, earlier turns
    included (this template drops no reasoning, so the model sees and learns it there too)."""
    processor = real_processor("glm4v")
    facts = facts_of("glm4v", tiny_model_dir("glm4v")).encoding
    thought = "<think>it is red</think><answer>red</answer>"
    turns = [_text("user", "Colour?"), _text("assistant", thought), _text("user", "And?"), _text("assistant", "blue")]
    encoded = encode(processor, Conversation(turns), [], facts)
    assert trained_text(processor, encoded) == f"{thought}<|user|>blue<|endoftext|>"
    assert encoded.rendered.text.endswith("<|assistant|>\nblue<|endoftext|>")
    assert prompt_text(processor, turns[:1]).endswith("Colour?<|assistant|>\n")


def test_llava_answer_keeps_its_trailing_whitespace_before_the_appended_eos():
    processor = real_processor("llava")
    conv, pictures = conversation("llava", system=False, images=1)
    rendered = encode(processor, conv, pictures, family_spec("llava").encoding).rendered
    assert "ASSISTANT: a red square  </s> USER:" in rendered.text
    assert "ASSISTANT: two\nlines\n</s> USER:" in rendered.text
    trained = [rendered.text[s:e] for s, e in rendered.spans]
    assert trained == [" a red square  </s>", " two\nlines\n</s>", " done</s>"]


def test_gemma3_end_of_turn_as_an_ordinary_token_still_ends_the_turn():
    processor = real_processor("gemma3", gemma_end_of_turn_special=False)
    conv, pictures = conversation("gemma3", system=True, images=1)
    encoded = encode(processor, conv, pictures, family_spec("gemma3").encoding)
    assert processor.tokenizer.eos_token_id not in encoded.input_ids, "no <eos> after <end_of_turn>"
    assert trained_text(processor, encoded) == expected_trained("gemma3")


def test_llama_vision_gets_its_system_message_as_a_plain_string():
    processor = real_processor("mllama")
    conv, _ = conversation("mllama", system=True, images=0)
    text = encode(processor, conv, [], family_spec("mllama").encoding).rendered.text
    assert "Today Date: " in text and "\n\nBe brief.<|eot_id|>" in text
    assert "[{" not in text
    assert prompt_text(processor, conv.prompt_messages()).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_template_refusing_a_conversation_names_the_row():
    processor = real_processor("mllama")
    conv, pictures = conversation("mllama", system=True, images=1)
    with pytest.raises(TemplateError, match=r"^chat.jsonl, row 7: .*incompatible with system messages"):
        encode(processor, conv, pictures, family_spec("mllama").encoding)


@pytest.mark.parametrize("family", sorted(OVERRIDES))
def test_data_inspect_shows_what_training_trains(tmp_path, tiny_model_dir, family, capsys):
    """The token counts and trained text `data inspect` prints equal the training batch's, row by row."""
    spec = family_spec(family)
    model = tiny_model_dir(family)
    png(tmp_path / "a.png", "red", size=(64, 64))
    png(tmp_path / "b.png", "blue", size=(96, 64))
    images = ["a.png", "b.png"] if spec.multi_image else ["a.png"]
    messages = [
        {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red  "},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "a blue\ncircle"},
    ]
    rows = [{"messages": messages, "images": images}, {"messages": messages[:2], "images": images}]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    main(["data", "inspect", "--model_name_or_path", model, "--dataset_name", str(path), "--num_examples", "2",
          "--val_split_ratio", "0", "--color", "never"])  # fmt: skip
    shown = capsys.readouterr().out.split("== ")[1:3]
    processor, spec = load_processing(model)
    splits = build_splits(data_args(str(path), val_split_ratio=0), spec.encoding, processor=processor)
    batch = VlmCollator(processor, splits.preparer)(list(splits.train))
    image_id = processor.tokenizer.convert_tokens_to_ids(spec.image_token)
    for i, sample in enumerate(shown):
        length = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i, :length].tolist(), batch["labels"][i, :length].tolist()
        inspected = inspect_sample(processor, splits.preparer, splits.train[i], train_on_prompt=False)[3]
        assert (inspected.input_ids, inspected.labels) == (ids, labels)
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert f"tokens: {length} total, {ids.count(image_id)} image, {len(trained)} trained" in sample
        marked = "".join(re.findall(r"\[\[(.*?)\]\]", sample, flags=re.S))
        assert marked == processor.tokenizer.decode(trained, clean_up_tokenization_spaces=False)


def test_the_checkpoints_generation_config_says_what_else_ends_a_turn(tmp_path, tiny_model_dir):
    """A stop token the checkpoint's generation config lists counts as a turn end, beside the registry's."""
    import shutil

    folder = shutil.copytree(tiny_model_dir("qwen2_vl"), tmp_path / "model")
    processor, spec = load_processing(str(folder))
    assert "<|endoftext|>" not in spec.turn_end
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps(config))
    processor, spec = load_processing(str(folder))
    assert spec.turn_end == ("<|im_end|>", "<|endoftext|>")
    assert family_spec("qwen2_vl").turn_end == ("<|im_end|>",), "the registry entry itself is unchanged"


def test_a_system_message_for_a_template_without_a_system_turn_is_folded_into_the_prompt(
    tiny_model_dir, caplog, monkeypatch
):
    """PaliGemma's template renders user turns only: the system text goes before the first user text, with a
    warning, and is never trained; for templates with a system turn nothing changes."""
    monkeypatch.setattr(encode_module, "_warned_system", set())  # warned once per process: not yet in this test
    processor, spec = load_processing(tiny_model_dir("paligemma"))
    facts = spec.encoding
    picture = Image.new("RGB", (64, 64), "red")
    messages = [
        _text("system", "Answer in one word."),
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        _text("assistant", "red"),
    ]
    conv = Conversation(messages, images=[picture], meta={"source": "chat.jsonl", "row": 0})
    with caplog.at_level("WARNING"):
        encoded = encode(processor, conv, [picture], facts)
        prompt = prompt_text(processor, conv.prompt_messages())
    assert prompt.endswith("Answer in one word.\n\nWhat colour?")
    assert "Answer in one word." in encoded.rendered.text
    assert trained_text(processor, encoded).strip().startswith("red")
    assert "Answer in one word" not in trained_text(processor, encoded)
    assert caplog.text.count("has no system turn") == 1, "one warning per template"

    qwen = real_processor("qwen2_vl")  # a template with a system turn renders it there, unfolded
    text = prompt_text(qwen, [messages[0], messages[1]])
    assert "<|im_start|>system\nAnswer in one word.<|im_end|>" in text and "Answer in one word.\n\nWhat" not in text


def test_each_fixture_is_the_copy_its_source_row_records():
    """Every template here is a recorded public copy: its size and SHA-256 stand in its README row, so an
    edit (to a fixture, or to a tiny model's template that a fixture links to) cannot pass unnoticed."""
    readme = (TEMPLATES / "README.md").read_text().splitlines()
    for path in sorted(TEMPLATES.glob("*.jinja")):
        row = next((line for line in readme if line.startswith(f"| `{path.name}`")), None)
        assert row is not None, f"{path.name} has no row in the fixtures README"
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() in row and f"{len(data)} bytes" in row, path.name
