"""`vlmtune models`: every architecture transformers can load, with an honest verdict, and the docs agree.

A user looks up their checkpoint's `model_type` before renting a GPU; a family listed as checked that is
not tested, a torchvision-only family listed as trainable here, or docs that drift from the command would
each send them the wrong way.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from vlmtune.cli import main
from vlmtune.models import catalog
from vlmtune.models.registry import OVERRIDES
from vlmtune.models.tiny import RECIPES

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def _by_type() -> dict[str, catalog.Architecture]:
    return {a.model_type: a for a in catalog.architectures()}


def test_every_architecture_of_the_mapping_is_listed_once():
    listed = [a.model_type for a in catalog.architectures()]
    assert sorted(listed) == sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    assert all(a.status in catalog.STATUSES and a.reason for a in catalog.architectures())


def test_checked_means_a_tiny_model_that_the_suite_builds_and_trains():
    tiny_types = {recipe.config_cls.model_type for recipe in RECIPES.values()}
    checked = {t for t, a in _by_type().items() if a.status == "checked"}
    assert checked == tiny_types
    families = {"qwen2_vl", "llava", "gemma3", "paligemma", "qwen3_5", "gemma4", "qwen3_vl_moe", "mistral3"}
    assert families | {"internvl", "glm4v", "glm4v_moe", "llava_onevision", "idefics2"} <= checked
    assert set(OVERRIDES) <= checked, "every registry entry has a tiny model"


def test_torchvision_only_and_encoder_decoder_architectures_are_not_offered_as_trainable():
    found = _by_type()
    assert found["llama4"].status == "untested here" and "torchvision" in found["llama4"].reason
    assert found["t5gemma2"].status == "refused" and "encoder-decoder" in found["t5gemma2"].reason


def test_every_architecture_offered_as_trainable_has_a_processor_class_that_imports_here():
    """transformers replaces a class whose backends are missing by a placeholder that fails on use (its
    Pixtral processor, marked torchvision-only): an architecture listed as checked or derived must have a
    real processor class here, transformers' own or vlmtune's torchvision-free import of it."""
    from transformers.utils.import_utils import DummyObject

    from vlmtune.models.processors import torchvision_free

    for arch in catalog.architectures():
        if arch.status in {"checked", "derived"}:
            cls = torchvision_free(arch.processor_class) or getattr(transformers, arch.processor_class)
            assert not isinstance(cls, DummyObject), arch.model_type


def test_models_command_filters_and_names_a_mistyped_model_type(capsys):
    main(["models", "--status", "checked"])
    out = capsys.readouterr().out
    assert "qwen2_vl" in out and "derived  " not in out.split("\n", 1)[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--model_type", "qwen35"])
    assert exit_info.value.code != 0
    assert "did you mean qwen3_5" in capsys.readouterr().err


def test_docs_table_is_the_commands_output():
    text = DOCS.read_text()
    table = re.search(r"<!-- vlmtune models: begin -->\n(.*)\n<!-- vlmtune models: end -->", text, re.S).group(1)
    documented = re.search(r"Read from transformers (\S+)'s", table).group(1)
    if documented != transformers.__version__:
        pytest.skip(f"docs/models.md was generated on transformers {documented}, this is {transformers.__version__}")
    assert table == catalog.as_markdown(catalog.architectures()), (
        "docs/models.md's table is stale: regenerate it with `vlmtune models --format markdown`"
    )
