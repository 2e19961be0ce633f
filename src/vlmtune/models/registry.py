"""A family's facts (`FamilySpec`), and the registry: per family, only what derivation gets wrong, with why.

Generic code asks a `FamilySpec` what it needs (which modules are the vision tower, the projector and the
language model; which image token the processor expands; whether several images per sample work) and
never branches on a model type. The facts are derived from the checkpoint (`models/derive.py`); a registry
entry (`OVERRIDES`) states the few that derivation cannot know or gets wrong for its family, each entry
saying why: packing facts checked by the parity tests, one image per sample for models trained so,
PaliGemma's prefix/suffix encoding. Where a family needs behaviour rather than data, a field names it (a
flag or a hook) and the code that honours it stays generic.

`register(FamilySpec(...))` is the user's way to state a whole family themselves (every fact, no
derivation); `--family_file` states a few facts and derives the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..data.encode import EncodingFacts
from .hooks import PALIGEMMA_TEMPLATE, image_block_packed_masks, prefix_packed_mask

# Why a family no entry states packing facts for is not packed.
UNCHECKED_PACKING = (
    "vlmtune has not checked how this architecture's positions and attention treat packed samples "
    "(Qwen-style 3-D positions and bidirectional image or prefix blocks need their own handling); "
    "register the family with its packing facts to pack it"
)


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
    image_token: str  # the token the processor repeats for each image's features
    # The token the chat template writes per image, when it is not `image_token` (the processor expands it).
    image_placeholder: str | None = None
    # Other tokens the processor puts around each image (begin/end markers): inputs, never targets.
    image_extra_tokens: tuple[str, ...] = ()
    # Text that closes an assistant turn and is trained with the answer (the model learns to stop).
    # The checkpoint's generation-config EOS tokens are added on loading; a template whose turns end
    # with none of these gets the tokenizer's EOS appended to each answer (LLaVA-1.5's).
    turn_end: tuple[str, ...] = ()
    # Classes of the language model's decoder blocks (FSDP wrapping, gradient checkpointing); empty:
    # read the classes off the loaded model's language model.
    decoder_layers: tuple[str, ...] = ()
    vision_layer: str | None = None
    multi_image: bool = True
    # Image inputs laid out one entry per row, not per image (Mllama's pixel_values: rows x images x tiles).
    row_inputs: tuple[str, ...] = ()
    # Used when a checkpoint ships no chat template (PaliGemma's).
    default_chat_template: str | None = None
    # Not a chat model: the prompt is the processor's text and the answer its `suffix=` (PaliGemma).
    prefix_suffix: bool = False
    # Padding-free packing (`--packing`, `--padding_free`): how a packed row's positions are made.
    # "text": positions restarting at each sample (transformers confines attention to each sample from
    # them); "mrope": Qwen's multimodal rotary positions, computed per sample by the model's own
    # rope-index function. `packing_refusal`: why packing cannot be correct for the family (refused).
    # `packing_masks(model, batch)`: the attention masks of a packed batch, for families whose own mask
    # code would not keep packed samples apart (see models/packing.py).
    packing_positions: str = "text"
    packing_refusal: str | None = None
    packing_masks: Callable | None = None
    derived: bool = False  # derived from the checkpoint with no registry entry for its family

    @property
    def encoding(self) -> EncodingFacts:
        """The facts `data/` needs to encode conversations for this family."""
        return EncodingFacts(
            name=self.model_type,
            image_token=self.image_token,
            image_placeholder=self.image_placeholder or self.image_token,
            image_tokens=(self.image_token, *self.image_extra_tokens),
            turn_end=self.turn_end,
            multi_image=self.multi_image,
            prefix_suffix=self.prefix_suffix,
            row_inputs=self.row_inputs,
        )


# A user's own families, every fact stated (`register`): used as they are, nothing derived.
FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add a whole family of the user's (every fact stated; derivation is skipped for it)."""
    FAMILIES[spec.model_type] = spec
    return spec


# Fields an entry may state (what a family file may state among them is verified like a family file's facts).
_FIELDS = frozenset(FamilySpec.__dataclass_fields__) - {"model_type", "derived"}


@dataclass(frozen=True)
class Override:
    """A registry entry: the facts derivation cannot know or gets wrong for one family, and why.

    `facts` are `FamilySpec` fields. Those a family file could state (`multi_image`, `turn_end`, ...) are
    given to derivation, which still verifies them against the checkpoint; the rest (packing, encoding
    mode, a default chat template) replace the derived values. `example_checkpoints` is documentation
    (docs/models.md lists them).
    """

    model_type: str
    why: str
    facts: dict
    example_checkpoints: tuple[str, ...] = ()


OVERRIDES: dict[str, Override] = {}


def _entry(model_type: str, why: str, examples: tuple[str, ...] = (), **facts) -> None:
    unknown = set(facts) - _FIELDS
    assert not unknown, f"{model_type}: not FamilySpec fields: {sorted(unknown)}"
    OVERRIDES[model_type] = Override(model_type, why, facts, examples)


_QWEN_PACKING = (
    "packing: Qwen's 3-D rotary positions are computed per packed sample by the model's own rope-index "
    "function (parity-tested)"
)
_ONE_IMAGE = "trained on one image per sample: extra images are dropped with a warning, their text kept"

_entry(
    "qwen2_vl",
    _QWEN_PACKING,
    ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-72B-Instruct"),
    packing_positions="mrope",
)
_entry(
    "qwen2_5_vl",
    _QWEN_PACKING,
    (
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen/Qwen2.5-VL-32B-Instruct",
        "Qwen/Qwen2.5-VL-72B-Instruct",
    ),
    packing_positions="mrope",
)
_entry(
    "qwen3_vl",
    _QWEN_PACKING,
    ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
    packing_positions="mrope",
)
_entry(
    "llava",
    f"{_ONE_IMAGE}; packing: positions restart per sample and causal attention keeps samples apart (parity-tested)",
    ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf", "llava-hf/llava-interleave-qwen-0.5b-hf"),
    multi_image=False,
    packing_positions="text",
)
_entry(
    "llava_next",
    f"{_ONE_IMAGE}; packing parity-tested as LLaVA's",
    ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf", "ibm-granite/granite-vision-3.2-2b"),
    multi_image=False,
    packing_positions="text",
)
_entry(
    "llava_onevision",
    "packing: positions restart per sample and causal attention keeps samples apart; each sample's image count "
    "(batch_num_images: one image is tiled, several are not) stays its own (parity-tested)",
    (
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "llava-hf/llava-onevision-qwen2-72b-ov-hf",
    ),
    packing_positions="text",
)
_entry(
    "gemma3",
    "packing: image tokens attend both ways within their image, which the model's own mask would let cross "
    "packed samples, so vlmtune builds the packed masks (parity-tested)",
    ("google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it"),
    packing_positions="text",
    packing_masks=image_block_packed_masks,
)
_entry(
    "mllama",
    f"{_ONE_IMAGE}; packing refused (cross-attention inputs are laid out per row)",
    ("meta-llama/Llama-3.2-11B-Vision-Instruct", "meta-llama/Llama-3.2-90B-Vision-Instruct"),
    multi_image=False,
    packing_refusal="Llama 3.2 Vision reads its images through cross-attention, whose inputs are laid out "
    "per row (pixel_values: batch x images x tiles; cross_attention_mask: batch x tokens x images x tiles), "
    "so packed samples' images would have to share one row's image slots with every token's mask re-pointed "
    "to its own sample's image, which vlmtune does not do",
)
_entry(
    "idefics2",
    "packing: positions restart per sample and causal attention keeps samples apart; each image's perceiver "
    "latents are its own (parity-tested)",
    ("HuggingFaceM4/idefics2-8b", "HuggingFaceM4/idefics2-8b-chatty"),
    packing_positions="text",
)
_entry(
    "idefics3",
    "packing: positions restart per sample and causal attention keeps samples apart (parity-tested)",
    ("HuggingFaceM4/Idefics3-8B-Llama3",),
    packing_positions="text",
)
_entry(
    "smolvlm",
    "packing parity-tested as Idefics3's",
    (
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        "HuggingFaceTB/SmolVLM-500M-Instruct",
        "HuggingFaceTB/SmolVLM-Instruct",
        "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
    ),
    packing_positions="text",
)
_entry(
    "internvl",
    "packing: positions restart per sample and causal attention keeps samples apart; each tile's features "
    "are its own (parity-tested)",
    ("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-2B-hf", "OpenGVLab/InternVL3-8B-hf"),
    packing_positions="text",
)
_entry(
    "glm4v",
    "packing: GLM-4.1V's 3-D rotary positions are computed per packed sample by the model's own rope-index "
    "function, as Qwen's (parity-tested)",
    ("zai-org/GLM-4.1V-9B-Thinking",),
    packing_positions="mrope",
)
_entry(
    "paligemma",
    "not a chat model: its checkpoints ship no chat template, the prompt is the processor's prefix and the "
    f"answer its suffix; {_ONE_IMAGE}; packing: the prefix attends both ways, so vlmtune builds the packed "
    "masks (parity-tested)",
    (
        "google/paligemma-3b-pt-224",
        "google/paligemma-3b-mix-224",
        "google/paligemma2-3b-pt-224",
        "google/paligemma2-3b-pt-448",
    ),
    multi_image=False,
    turn_end=(),  # its template renders only the prompt; the processor ends the suffix with EOS itself
    image_extra_tokens=(),  # derivation sees the <bos> the processor writes after the image tokens: text, not image
    default_chat_template=PALIGEMMA_TEMPLATE,
    prefix_suffix=True,
    packing_positions="text",
    packing_masks=prefix_packed_mask,
)


def default_chat_template(model_type: str) -> str | None:
    """The chat template a family's checkpoints lack and vlmtune supplies (PaliGemma's), if any."""
    if model_type in FAMILIES:
        return FAMILIES[model_type].default_chat_template
    return OVERRIDES[model_type].facts.get("default_chat_template") if model_type in OVERRIDES else None


def registered(model_type: str) -> bool:
    """Whether vlmtune's registry or the user's `register` holds an entry for the family."""
    return model_type in OVERRIDES or model_type in FAMILIES
