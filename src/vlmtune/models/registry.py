"""One entry per model family, as data.

Generic code asks a `FamilySpec` what it needs (which modules are the vision tower, the projector and the
language model; which image token the processor expands; whether several images per sample work) and
never branches on a model type. Where a family needs behaviour rather than data, the spec names it as a
small field (a flag or a hook) and the code that honours it stays generic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..data.encode import EncodingFacts
from ..errors import ModelError
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
    # The vision tower's block class (FSDP wrapping); None in an entry: read off the checkpoint's tower
    # (LLaVA's is CLIP or SigLIP, whichever the checkpoint has).
    vision_layer: str | None = None
    multi_image: bool = True
    example_checkpoints: tuple[str, ...] = ()
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
    notes: str = ""
    derived: bool = False  # built by `models/derive.py` from the checkpoint, not a registry entry

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
        )


FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add a family to the registry (also the hook for users' own families)."""
    FAMILIES[spec.model_type] = spec
    return spec


_QWEN_KEYS = dict(
    vision_keys=("model.visual",),
    projector_keys=("model.visual.merger",),
    language_keys=("model.language_model", "lm_head"),
    image_token="<|image_pad|>",
    image_extra_tokens=("<|vision_start|>", "<|vision_end|>"),
    turn_end=("<|im_end|>",),
    packing_positions="mrope",
)
# LLaVA-style composites: vision_tower -> multi_modal_projector -> language_model.
_LLAVA_KEYS = dict(
    vision_keys=("model.vision_tower",),
    projector_keys=("model.multi_modal_projector",),
    language_keys=("model.language_model", "lm_head"),
)
# Idefics3 and SmolVLM: vision_model -> connector (pixel shuffle + projection) -> text_model.
_IDEFICS_KEYS = dict(
    vision_keys=("model.vision_model",),
    projector_keys=("model.connector",),
    language_keys=("model.text_model", "lm_head"),
    image_token="<image>",
    image_extra_tokens=("<fake_token_around_image>", "<global-img>"),
    turn_end=("<end_of_utterance>",),
)

register(
    FamilySpec(
        model_type="qwen2_vl",
        **_QWEN_KEYS,
        decoder_layers=("Qwen2VLDecoderLayer",),
        vision_layer="Qwen2VLVisionBlock",
        example_checkpoints=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-72B-Instruct"),
    )
)

register(
    FamilySpec(
        model_type="qwen2_5_vl",
        **_QWEN_KEYS,
        decoder_layers=("Qwen2_5_VLDecoderLayer",),
        vision_layer="Qwen2_5_VLVisionBlock",
        example_checkpoints=(
            "Qwen/Qwen2.5-VL-3B-Instruct",
            "Qwen/Qwen2.5-VL-7B-Instruct",
            "Qwen/Qwen2.5-VL-32B-Instruct",
            "Qwen/Qwen2.5-VL-72B-Instruct",
        ),
    )
)

register(
    FamilySpec(
        model_type="qwen3_vl",
        vision_keys=("model.visual",),
        # The final merger and the "deepstack" mergers that feed early vision layers into the LM.
        projector_keys=("model.visual.merger", "model.visual.deepstack_merger_list"),
        language_keys=("model.language_model", "lm_head"),
        image_token="<|image_pad|>",
        image_extra_tokens=("<|vision_start|>", "<|vision_end|>"),
        turn_end=("<|im_end|>",),
        packing_positions="mrope",
        decoder_layers=("Qwen3VLTextDecoderLayer",),
        vision_layer="Qwen3VLVisionBlock",
        example_checkpoints=("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
        notes="Dense Qwen3-VL; the MoE variants (qwen3_vl_moe) use the generic fallback.",
    )
)

register(
    FamilySpec(
        model_type="llava",
        **_LLAVA_KEYS,
        image_token="<image>",
        decoder_layers=("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"),
        # No vision_layer: CLIP or SigLIP, read off the checkpoint's tower (models.derive.family_for).
        multi_image=False,
        example_checkpoints=(
            "llava-hf/llava-1.5-7b-hf",
            "llava-hf/llava-1.5-13b-hf",
            "llava-hf/llava-interleave-qwen-0.5b-hf",
        ),
        notes="CLIP or SigLIP tower (llava-interleave); trained on one image per sample: extra images are "
        "dropped with a warning. The decoder class follows the checkpoint's language model (those listed "
        "are the common ones); the loaded model's own is used.",
    )
)

register(
    FamilySpec(
        model_type="llava_next",
        vision_keys=("model.vision_tower",),
        # image_newline is the learned separator between rows of image tiles: trained with the projector.
        projector_keys=("model.multi_modal_projector", "model.image_newline"),
        language_keys=("model.language_model", "lm_head"),
        image_token="<image>",
        decoder_layers=("MistralDecoderLayer", "LlamaDecoderLayer", "GraniteDecoderLayer"),
        # No vision_layer: the block of whichever tower the checkpoint has, read off it (as for llava).
        multi_image=False,
        example_checkpoints=(
            "llava-hf/llava-v1.6-mistral-7b-hf",
            "llava-hf/llava-v1.6-vicuna-7b-hf",
            "ibm-granite/granite-vision-3.2-2b",
        ),
        notes="LLaVA-1.6 (AnyRes tiling); Granite Vision uses this architecture. The decoder class "
        "follows the language model; the loaded model's own is used.",
    )
)

register(
    FamilySpec(
        model_type="gemma3",
        **_LLAVA_KEYS,
        image_token="<image_soft_token>",
        image_placeholder="<start_of_image>",
        image_extra_tokens=("<start_of_image>", "<end_of_image>"),
        # An ordinary added token in some tokenizers (not in `all_special_tokens`): a family fact.
        turn_end=("<end_of_turn>",),
        decoder_layers=("Gemma3DecoderLayer",),
        vision_layer="SiglipEncoderLayer",
        packing_masks=image_block_packed_masks,
        example_checkpoints=("google/gemma-3-4b-it", "google/gemma-3-12b-it", "google/gemma-3-27b-it"),
        notes="The processor returns token_type_ids (image tokens attend bidirectionally); they pass "
        "through to the model.",
    )
)

register(
    FamilySpec(
        model_type="mllama",
        vision_keys=("model.vision_model",),
        projector_keys=("model.multi_modal_projector",),
        language_keys=("model.language_model", "lm_head"),
        image_token="<|image|>",
        turn_end=("<|eot_id|>",),
        decoder_layers=("MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"),
        vision_layer="MllamaVisionEncoderLayer",
        multi_image=False,
        packing_refusal="Llama 3.2 Vision reads its images through cross-attention, whose inputs are laid out "
        "per row (pixel_values: batch x images x tiles; cross_attention_mask: batch x tokens x images x tiles), "
        "so packed samples' images would have to share one row's image slots with every token's mask re-pointed "
        "to its own sample's image, which vlmtune does not do",
        example_checkpoints=(
            "meta-llama/Llama-3.2-11B-Vision-Instruct",
            "meta-llama/Llama-3.2-90B-Vision-Instruct",
        ),
        notes="Images enter through cross-attention layers (part of the language model, LoRA-adapted "
        "with it); one image per sample.",
    )
)

register(
    FamilySpec(
        model_type="idefics3",
        **_IDEFICS_KEYS,
        decoder_layers=("LlamaDecoderLayer",),
        vision_layer="Idefics3EncoderLayer",
        example_checkpoints=("HuggingFaceM4/Idefics3-8B-Llama3",),
    )
)

register(
    FamilySpec(
        model_type="smolvlm",
        **_IDEFICS_KEYS,
        decoder_layers=("LlamaDecoderLayer",),
        vision_layer="SmolVLMEncoderLayer",
        example_checkpoints=(
            "HuggingFaceTB/SmolVLM-256M-Instruct",
            "HuggingFaceTB/SmolVLM-500M-Instruct",
            "HuggingFaceTB/SmolVLM-Instruct",
            "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        ),
        notes="Needs the num2words package (installed with vlmtune).",
    )
)

register(
    FamilySpec(
        model_type="paligemma",
        **_LLAVA_KEYS,
        image_token="<image>",
        decoder_layers=("GemmaDecoderLayer", "Gemma2DecoderLayer"),
        vision_layer="SiglipEncoderLayer",
        multi_image=False,
        default_chat_template=PALIGEMMA_TEMPLATE,
        prefix_suffix=True,
        packing_masks=prefix_packed_mask,
        example_checkpoints=(
            "google/paligemma-3b-pt-224",
            "google/paligemma-3b-mix-224",
            "google/paligemma2-3b-pt-224",
            "google/paligemma2-3b-pt-448",
        ),
        notes="Not a chat model: the prompt is the prefix, the answer the suffix (the last answer of a "
        "conversation is trained). PaliGemma 2 checkpoints (Gemma 2 decoder) use the same entry.",
    )
)


def get_family(model_type: str) -> FamilySpec:
    """The registry entry for `model_type`. Unregistered families get their facts derived from the
    checkpoint (`models.derive.family_for`, which needs its config and processor)."""
    if model_type not in FAMILIES:
        raise ModelError(
            f"{model_type!r} has no registry entry; its facts are derived when the checkpoint loads "
            "(vlmtune.models.derive.family_for(config, processor))"
        )
    return FAMILIES[model_type]
