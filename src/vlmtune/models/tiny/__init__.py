"""Tiny, randomly initialised models of real VLM architectures, built offline.

Each family's recipe gives a real transformers config and a real processor (tokenizer + image processor +
chat template), sized so a model trains in seconds on a CPU. `build_tiny_model` writes them with
`save_pretrained`, so the result loads with `from_pretrained` exactly like a hub checkpoint. Tests, the
demo and `vlmtune tiny-model` use these; users can use them to try vlmtune without a GPU or a download.

Layout: `common.py` holds what all families share (the tiny sizes, the `TinyRecipe` record and how it is
built, opening zero-initialised image paths, saving); one file per lineage holds its families' recipes
and chat templates: `qwen.py` (Qwen-VL), `llava.py` (LLaVA-1.5, LLaVA-Next, LLaVA-OneVision), `gemma.py`
(Gemma 3, PaliGemma), `idefics.py` (Idefics2, Idefics3, SmolVLM), `llama.py` (Mllama), `mistral.py` (Mistral 3),
`internvl.py` (InternVL), `glm.py` (GLM-4.1V, GLM-4.5V).

Adding a family: add one `TinyRecipe` to the `RECIPES` dict of its lineage's file, written out or as
`dataclasses.replace` of a relative's recipe. Give the transformers classes, the special tokens and the
chat template the real checkpoints ship, and only the config values that differ from `common.TEXT`
(shared text sizes; vocab size and bos/eos/pad ids come from the tokenizer). Behaviour that data cannot
say goes in a short function beside the recipe, named by its `finish` field. A new lineage is a new file
with a `RECIPES` dict, listed in `_LINEAGES` below. Its facts are derived from the built checkpoint
(`models/derive.py`); a registry entry (`models/registry.py`) only where derivation gets one wrong, and a
line in docs/models.md; the tests then build, train and reload it. A real template too long to inline
lives in `templates/` (Qwen3.5's, Qwen3-VL-Instruct's, Gemma 4's, Mistral 3's, InternVL's, GLM-4.1V's,
LLaVA-OneVision's, Idefics2's).

An architecture with no recipe gets a generic tiny model (`generic.py`: its default config shrunk by
`shrink.py`, its real processor, a stand-in chat template), used by the measurement of every architecture
(`eval/measure.py`, docs/models.md's Measured section), not by `build_tiny_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, PretrainedConfig, ProcessorMixin

from ...errors import UsageError
from ..derive import family_for
from . import gemma, glm, idefics, internvl, llama, llava, mistral, qwen
from .common import HIDDEN, INIT_RANGE, TinyRecipe, generation_config, open_zero_paths, save

_LINEAGES = (qwen, llava, gemma, llama, idefics, mistral, internvl, glm)

RECIPES: dict[str, TinyRecipe] = {name: recipe for lineage in _LINEAGES for name, recipe in lineage.RECIPES.items()}
assert len(RECIPES) == sum(len(lineage.RECIPES) for lineage in _LINEAGES), "a family name is used twice"

# Families whose tiny model builds, encodes and reloads exactly but does not learn the shapes task to the bar
# with the default settings (`vlmtune models` says it): family -> what is seen. An unexplained gap is held
# by tests/test_models_learning.py as a strict expected failure, so a fix shows; Qwen3-VL-MoE's follows
# from its default LoRA (attention only), and the test proves it learns with its experts adapted instead;
# GLM-4.5V's from PEFT's rewrite of its MLP targets (held as a strict expected failure too).
LEARNING_GAPS: dict[str, str] = {
    "qwen3_vl_moe": "with the default LoRA (attention only: no shared expert, routed experts fused) the tiny "
    "Qwen3-VL-MoE learns the shapes task to ~68% held-out accuracy; with --lora_target_experts to ~83%",
    "glm4v_moe": "PEFT 0.21 leaves the tiny GLM-4.5V's dense MLP and shared experts unadapted "
    "(huggingface/peft#3711: attention-only LoRA), and with it the model learns the shapes task to ~70% "
    "held-out accuracy (~68% with --lora_target_experts); its labels are checked on GLM-4.1V's template "
    "(GLM-4.5V's own was not found)",
}

# family -> a function returning its tiny (config, processor).
BUILDERS: dict[str, Callable[[], tuple[PretrainedConfig, ProcessorMixin]]] = {
    name: recipe.build for name, recipe in RECIPES.items()
}


def build_tiny_model(family: str, output_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model of `family` with its processor to `output_dir` and return the path."""
    if family not in RECIPES:
        raise UsageError(f"--family {family!r}: no tiny builder for it; choose one of: {', '.join(sorted(RECIPES))}")
    torch.manual_seed(seed)
    config, processor = RECIPES[family].build()
    model = AutoModelForImageTextToText.from_config(config)
    open_zero_paths(model, family_for(config, processor, model=model))
    model.generation_config = generation_config(config, processor.tokenizer)
    return save(model, processor, output_dir)


__all__ = ["BUILDERS", "HIDDEN", "INIT_RANGE", "LEARNING_GAPS", "RECIPES", "TinyRecipe", "build_tiny_model"]
