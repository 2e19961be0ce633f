"""One entry per model family, as data.

Generic code asks a `FamilySpec` what it needs (which modules are the vision tower, the projector and the
language model; which image token the processor expands; whether several images per sample work) and
never branches on a model type. Where a family needs behaviour rather than data, the spec names it as a
small field (a flag or a hook) and the code that honours it stays generic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Leaf names of the linear layers of every decoder block we know; LoRA's default targets are the
# language model's linear layers whose leaf name is one of these.
TEXT_LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FamilySpec:
    """What vlmtune needs to know about one architecture (keyed by `config.model_type`).

    Module keys are dotted prefixes of parameter names in the transformers (v5) model; a parameter
    belongs to the part whose key is its longest matching prefix, so a projector nested inside the
    vision tower (Qwen2-VL's ``model.visual.merger``) is still its own part.
    """

    model_type: str
    vision_keys: tuple[str, ...]
    projector_keys: tuple[str, ...]
    language_keys: tuple[str, ...]
    image_token: str
    decoder_layer: str | None = None  # None: read the class of the language model's first layer
    vision_layer: str | None = None
    multi_image: bool = True
    example_checkpoints: tuple[str, ...] = ()
    lora_leaves: tuple[str, ...] = TEXT_LINEAR_LEAVES
    notes: str = ""
    extra: dict = field(default_factory=dict)


FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add a family to the registry (also the hook for users' own families)."""
    FAMILIES[spec.model_type] = spec
    return spec


register(
    FamilySpec(
        model_type="qwen2_vl",
        vision_keys=("model.visual",),
        projector_keys=("model.visual.merger",),
        language_keys=("model.language_model", "lm_head"),
        image_token="<|image_pad|>",
        decoder_layer="Qwen2VLDecoderLayer",
        vision_layer="Qwen2VLVisionBlock",
        example_checkpoints=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
    )
)

register(
    FamilySpec(
        model_type="llava",
        vision_keys=("model.vision_tower",),
        projector_keys=("model.multi_modal_projector",),
        language_keys=("model.language_model", "lm_head"),
        image_token="<image>",
        multi_image=False,
        example_checkpoints=("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf"),
        notes="Trained on one image per sample; extra images are dropped with a warning.",
    )
)

GENERIC = FamilySpec(
    model_type="generic",
    vision_keys=("model.vision_tower", "model.visual", "vision_model", "model.vision_model"),
    projector_keys=("model.multi_modal_projector", "model.connector", "model.visual.merger"),
    language_keys=("model.language_model", "language_model", "lm_head"),
    image_token="<image>",
)


def get_family(model_type: str) -> FamilySpec:
    """Return the spec for `model_type`, or a generic processor-first fallback with a warning."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    logger.warning(
        "Model type %r is not in vlmtune's registry; using generic processor-first handling. "
        "Pass --lora_target_modules if the default LoRA targets miss your language model.",
        model_type,
    )
    return GENERIC
