"""`--family_file`: the facts a user supplies when derivation refuses an architecture, and
`vlmtune.models.register` for the same in Python (docs/models.md)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.helpers import cli_error, short_run
from tests.test_models_derive import built
from tests.test_models_labels import MULTI_TURN, SINGLE_TURN, expected_labels
from vlmtune import models
from vlmtune.config.family import read_family_file
from vlmtune.data.collate import VlmCollator
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.data.prepare import Preparer
from vlmtune.data.schema import detect_schema
from vlmtune.models.derive import DerivationError, derive_spec
from vlmtune.models.loading import load_model, load_processing
from vlmtune.models.registry import FAMILIES


@pytest.fixture
def templateless(tiny_model_dir, tmp_path) -> tuple[str, str]:
    """A copy of the tiny Qwen3.5 without its chat template (a base checkpoint's case), and that template."""
    source = Path(tiny_model_dir("qwen3_5"))
    folder = tmp_path / "no_template"
    shutil.copytree(source, folder)
    (folder / "chat_template.jinja").unlink()
    return str(folder), (source / "chat_template.jinja").read_text()


def family_file(tmp_path, facts: dict) -> str:
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump(facts))
    return str(path)


def test_a_checkpoint_without_a_chat_template_is_refused_naming_the_family_file_key(templateless, tmp_path, capsys):
    folder, _ = templateless
    argv = ["train", "--model_name_or_path", folder, "--dataset_name", "x.csv", "--output_dir", str(tmp_path / "o")]
    code, message = cli_error(argv, capsys)
    assert code != 0
    assert "cannot derive the end of turn: the checkpoint ships no chat template" in message
    assert "`chat_template:` in a --family_file family.yaml" in message
    assert "vlmtune.models.register(FamilySpec(model_type='qwen3_5'" in message


def test_with_a_family_file_stating_the_template_it_trains_with_exact_labels(templateless, tmp_path, shapes_data):
    folder, template = templateless
    path = family_file(tmp_path, {"chat_template": template})
    result = short_run(folder, shapes_data, tmp_path / "out", family_file=path)
    assert result.trainer.state.global_step == 3
    loaded = load_model(folder, family=read_family_file(path))
    rows = [
        {"__index__": 0, "messages": MULTI_TURN, "images": [Image.new("RGB", (64, 64), "red")] * 2},
        {"__index__": 1, "messages": SINGLE_TURN, "images": [Image.new("RGB", (64, 64), "green")]},
    ]
    batch = VlmCollator(loaded.processor, Preparer(detect_schema(["messages", "images"]), loaded.spec.encoding))(rows)
    tokenizer = loaded.processor.tokenizer
    for i in range(len(rows)):
        length = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i, :length].tolist(), batch["labels"][i, :length].tolist()
        assert labels == expected_labels(tokenizer, ids, "qwen3_5", last_only=False)
    trained = tokenizer.decode([t for t in batch["labels"][1].tolist() if t != IGNORE_INDEX])
    assert trained == "square<|im_end|>"


def test_a_stated_image_token_replaces_a_missing_one_and_is_still_verified():
    config, processor, model = built("qwen3_5")
    object.__setattr__(config, "image_token_id", None)
    processor.image_token = None
    with pytest.raises(DerivationError, match="supply it as `image_token:` in a --family_file"):
        derive_spec(config, processor, model=model)
    spec = derive_spec(config, processor, model=model, given={"image_token": "<|image_pad|>"})
    assert spec.image_token == "<|image_pad|>" and spec.image_extra_tokens == ("<|vision_start|>", "<|vision_end|>")
    with pytest.raises(DerivationError, match="holds no '<|video_pad|>'"):
        derive_spec(config, processor, model=model, given={"image_token": "<|video_pad|>"})


def test_stated_module_facts_replace_the_derived_ones_and_the_rest_is_derived():
    config, processor, model = built("qwen3_5")
    spec = derive_spec(config, processor, model=model, given={"turn_end": ("<|endoftext|>",), "multi_image": False})
    assert spec.turn_end[0] == "<|endoftext|>" and not spec.multi_image
    assert spec.language_keys == ("model.language_model", "lm_head") and spec.image_token == "<|image_pad|>"


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"image_tokn": "<x>"}, "unknown key 'image_tokn'; did you mean image_token?"),
        ({"multi_image": "yes"}, "multi_image must be true or false, got 'yes'"),
        ({"turn_end": [1]}, "turn_end must be a list of strings (or one string), got [1]"),
    ],
)
def test_a_bad_key_or_value_is_a_usage_error_naming_file_and_key(tiny_model_dir, tmp_path, capsys, facts, expected):
    path = family_file(tmp_path, facts)
    argv = ["data", "inspect", "--model_name_or_path", tiny_model_dir("qwen3_5"), "--dataset_name", "x.csv",
            "--family_file", path]  # fmt: skip
    code, message = cli_error(argv, capsys)
    assert code != 0 and f"--family_file {path}: {expected}" in message
    if "unknown" in expected:
        assert "image_token, image_placeholder" in message  # the allowed keys


def test_register_in_python_serves_a_checkpoint_derivation_refuses(templateless):
    folder, template = templateless
    config, processor, model = built("qwen3_5")
    derived = derive_spec(config, processor, model=model)
    models.register(dataclasses.replace(derived, derived=False, default_chat_template=template))
    try:
        processor, spec = load_processing(folder)
    finally:
        FAMILIES.pop("qwen3_5")
    assert not spec.derived and processor.chat_template == template and spec.turn_end[0] == "<|im_end|>"
