"""Derive a family's facts from the checkpoint itself: config, processor and a weightless model.

vlmtune needs a few facts about an architecture (see `FamilySpec`). Rather than a hand-written entry per
family, they are read off what the checkpoint already says, without loading weights:

- module prefixes, from transformers v5's composite layout: the language model is what the base model's
  `get_decoder()` returns; the vision tower is the module `get_image_features` reads whose config is
  `config.vision_config`; the projector is every other module `get_image_features` reads, the tower's
  own children that map onto the language model's width (Qwen's mergers), and the base model's loose
  parameters (LLaVA-Next's `image_newline`);
- decoder and vision block classes: the model's `_no_split_modules` that really occur in its module
  tree (Gemma 4 lists an audio block that audio-less checkpoints lack), split by where they sit;
- the image token: `processor.image_token`, checked against `config.image_token_id` and against what
  the processor emits for one tiny image; the placeholder the chat template writes per image, and the
  special tokens the processor puts around each image's features;
- whether several images per sample work (ShieldGemma 2's processor refuses two), and which image inputs
  are laid out per row rather than per image (Mllama's: a text-only row in a batch gets zeros there), from
  the processor's output for one row of two images and two rows of one; and that the processor passes the
  prompt's text on at all (ShieldGemma 2's writes its own policy prompts: refused);
- the end of an assistant turn: the chat template rendered with a sentinel answer shows what follows an
  answer; the checkpoint's generation-config EOS tokens are cross-checked against it;
- packing: refused unless a registry entry says how; hybrid language models (linear-attention or state
  space layers carry a state across a packed row) with that reason.

What cannot be derived and verified is a `DerivationError` naming the fact and how to supply it, never a guess.
A registry entry (`registry.OVERRIDES`) states the few facts derivation cannot know for its family; a user's
whole `register`ed family replaces derivation; `family_for` is the one entry point.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from ..data.encode import SENTINEL, processor_inputs, template_messages
from ..errors import ModelError
from .registry import FAMILIES, OVERRIDES, UNCHECKED_PACKING, FamilySpec, Override, default_chat_template

logger = logging.getLogger(__name__)

# The facts a user can state in a `--family_file` (the `FamilySpec` field each key sets, or the processor's
# chat template), with the type its value must have. What the file gives replaces the derived fact.
FAMILY_FILE_KEYS: dict[str, type] = {
    "vision_keys": tuple,
    "projector_keys": tuple,
    "language_keys": tuple,
    "image_token": str,
    "image_placeholder": str,
    "image_extra_tokens": tuple,
    "turn_end": tuple,
    "decoder_layers": tuple,
    "vision_layer": str,
    "multi_image": bool,
    "chat_template": str,
}
# The family-file key that supplies each fact derivation can refuse.
FACT_KEYS = {
    "language model": "language_keys",
    "vision tower": "vision_keys",
    "image token": "image_token",
    "image placeholder": "image_placeholder",
    "end of turn": "turn_end",
}


class DerivationError(ModelError):
    """A fact vlmtune cannot derive from this checkpoint and will not guess; the message says how to supply it."""

    def __init__(self, model_type: str, fact: str, why: str, key: str | None = None):
        self.fact, self.why, self.key = fact, why, key or FACT_KEYS.get(fact, fact.replace(" ", "_"))
        super().__init__(
            f"{model_type}: cannot derive the {fact}: {why}; supply it as `{self.key}:` in a "
            f"--family_file family.yaml (docs/models.md), or in Python with "
            f"vlmtune.models.register(FamilySpec(model_type={model_type!r}, ...))"
        )


class UnsupportedModelError(DerivationError):
    """An architecture vlmtune refuses whatever facts are stated: no family file would make it right."""

    def __init__(self, model_type: str, why: str):
        self.fact, self.why, self.key = "training setup", why, None
        ModelError.__init__(self, f"{model_type}: vlmtune cannot fine-tune it: {why}")


@dataclass(frozen=True)
class Parts:
    """Module prefixes of the three parts, and the block classes found in each."""

    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: tuple[str, ...]
    decoder_layers: tuple[str, ...]
    vision_layers: tuple[str, ...]


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """The architecture with no weights (meta tensors): its module tree costs no memory."""
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)


def _names(model: torch.nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _read_by_image_features(base: torch.nn.Module) -> list[str]:
    """Attributes of `base` that its `get_image_features` reads (``self.visual``, ``self.connector``)."""
    method = getattr(type(base), "get_image_features", None)
    if method is None:
        return []
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return []
    return list(dict.fromkeys(re.findall(r"self\.(\w+)", source)))


def _last_linear_out(module: torch.nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].out_features if linears else None


def _block_classes(model: torch.nn.Module) -> set[str]:
    """`_no_split_modules` of every sub-model (the blocks to keep whole)."""
    classes: set[str] = set()
    for module in model.modules():
        classes |= set(getattr(module, "_no_split_modules", None) or ())
    return classes


def module_parts(model: torch.nn.Module, config: PretrainedConfig) -> Parts:
    """Vision tower, projector and language model prefixes (see the module docstring for the rule)."""
    model_type = config.model_type
    base = getattr(model, "model", model)
    names = _names(model)
    language = base.get_decoder() if hasattr(base, "get_decoder") else None
    if language is None or language is base or id(language) not in names:
        raise DerivationError(model_type, "language model", "the base model's get_decoder() names no sub-module")
    vision_config = getattr(config, "vision_config", None)
    # What get_image_features reads; without that method (Mllama's cross-attention), every sub-module.
    read = [getattr(base, a, None) for a in _read_by_image_features(base)] or [m for _, m in base.named_children()]
    read = [m for m in read if isinstance(m, torch.nn.Module) and m is not language]
    towers = [m for m in read if getattr(m, "config", None) is vision_config and vision_config is not None]
    if len(towers) != 1:
        raise DerivationError(
            model_type, "vision tower", "the base model holds no one module built from config.vision_config"
        )
    tower = towers[0]
    blocks = _block_classes(model)
    projector = [names[id(m)] for m in read if m is not tower]
    width = config.get_text_config().hidden_size
    for child_name, child in tower.named_children():  # a projector nested in the tower (Qwen's mergers)
        holds_blocks = any(type(m).__name__ in blocks for m in child.modules())
        if not holds_blocks and _last_linear_out(child) == width:
            projector.append(f"{names[id(tower)]}.{child_name}")
    projector += [f"{names[id(base)]}.{p}" for p, _ in base.named_parameters(recurse=False)]
    output = model.get_output_embeddings()
    lm_head = (names[id(output)],) if output is not None and id(output) in names else ()
    language_key, vision_key = names[id(language)], names[id(tower)]
    return Parts(
        vision=(vision_key,),
        projector=tuple(projector),
        language=(language_key, *lm_head),
        decoder_layers=_present_blocks(language, blocks),
        vision_layers=_present_blocks(tower, blocks),
    )


def _present_blocks(module: torch.nn.Module, blocks: set[str]) -> tuple[str, ...]:
    """The block classes that really occur under `module` as the repeated layers of a stack (members of a
    `ModuleList`; `_no_split_modules` also lists embeddings and attention modules), in order. Where the
    list names none of them (Idefics3's vision encoder), the stack members transformers marks as
    checkpointable blocks (`GradientCheckpointingLayer`)."""
    members = [m for stack in module.modules() if isinstance(stack, torch.nn.ModuleList) for m in stack]
    found = [type(m).__name__ for m in members if type(m).__name__ in blocks]
    if not found:
        found = [type(m).__name__ for m in members if isinstance(m, GradientCheckpointingLayer)]
    return tuple(dict.fromkeys(found))


# --- image tokens ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTokens:
    token: str
    placeholder: str | None
    extras: tuple[str, ...]


def _user(parts: list[dict]) -> list[dict]:
    return [{"role": "user", "content": parts}]


def _rendered(processor, messages: list[dict], **kwargs) -> str:
    return processor.apply_chat_template(template_messages(processor, messages), tokenize=False, **kwargs)


def image_tokens(processor, config: PretrainedConfig, given: str | None = None) -> ImageTokens:
    """The image token the processor expands (`given`: a family file's, verified the same way), the
    template's placeholder, and the markers around images, checked against the processor's output for one
    64x64 image."""
    model_type = config.model_type
    tokenizer = processor.tokenizer
    named = getattr(processor, "image_token", None)
    config_id = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
    # The model's own standard: config.image_token_id is the token its features replace; the processor's
    # `image_token` is that one or the placeholder it expands (Gemma 3's <start_of_image>).
    token = given or (tokenizer.convert_ids_to_tokens(config_id) if isinstance(config_id, int) else named)
    if not isinstance(token, str):
        raise DerivationError(model_type, "image token", "neither config.image_token_id nor processor.image_token")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise DerivationError(model_type, "image token", f"{token!r} is not in the tokenizer's vocabulary")
    text = [{"type": "text", "text": SENTINEL}]
    with_image = _rendered(processor, _user([{"type": "image"}, *text]), add_generation_prompt=True)
    without = _rendered(processor, _user(text), add_generation_prompt=True)
    try:
        inputs = processor_inputs(processor, [with_image], [[Image.new("RGB", (64, 64), "red")]])
    except ValueError as err:  # a placeholder count it disagrees with; GOT-OCR 2's takes no per-sample lists
        why = f"the processor refuses the template's prompt with one image for one sample ({err})"
        raise DerivationError(model_type, "image placeholder", why) from err
    ids = inputs["input_ids"][0].tolist()
    if SENTINEL not in tokenizer.decode(ids):
        raise UnsupportedModelError(
            model_type,
            "its processor does not pass the conversation's text on to the model (ShieldGemma 2's replaces it "
            "with its own policy prompts: an image classifier, not a model to fine-tune on prompts and answers)",
        )
    if token_id not in ids:
        raise DerivationError(model_type, "image token", f"the processor's output for one image holds no {token!r}")
    plain = set(tokenizer(without)["input_ids"])
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    extras = [tokenizer.convert_ids_to_tokens(i) for i in dict.fromkeys(ids) if i in special - plain - {token_id}]
    written = set(tokenizer.tokenize(with_image)) - set(tokenizer.tokenize(without))
    placeholder = None if token in written else next((t for t in (named, *extras) if t in written), None)
    if token not in written and placeholder is None:
        raise DerivationError(
            model_type, "image placeholder", "the chat template writes no token the processor expands"
        )
    return ImageTokens(token=token, placeholder=placeholder, extras=tuple(extras))


def image_layout(processor) -> tuple[bool, tuple[str, ...]]:
    """Whether the processor takes two images in one sample, and which of its image inputs it lays out one
    entry per row rather than per image (Mllama's `pixel_values`: rows x images x tiles), read off its
    output for one row of two images and for two rows of one: a per-row key has one entry in the first and
    two in the second, and a text-only row in a batch needs zeros there. A processor that refuses two images
    (ShieldGemma 2's: "at most one image per sample") gets one image per sample, the rest dropped with a
    warning, not a failing row; its layout cannot be told apart, and none is per row."""
    one = _rendered(processor, _user([{"type": "image"}, {"type": "text", "text": "Hi"}]))
    two = _rendered(processor, _user([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi"}]))
    red, blue = (Image.new("RGB", (64, 64), colour) for colour in ("red", "blue"))
    try:
        together = processor_inputs(processor, [two], [[red, blue]])
    except ValueError:  # what processors raise on an image count they do not take
        return False, ()
    try:
        apart = processor_inputs(processor, [one, one], [[red], [blue]])
    except ValueError:
        return True, ()
    skip = {"input_ids", "labels", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask"}
    per_row = tuple(
        key
        for key, value in together.items()
        if key not in skip and isinstance(value, torch.Tensor) and len(value) == 1 and len(apart.get(key, ())) == 2
    )
    return True, per_row


# --- end of turn -----------------------------------------------------------------------------------


def template_turn_end(processor, model_type: str) -> str | None:
    """The text the chat template writes right after an answer, up to the next line (``<|im_end|>``);
    None where it writes nothing there (the tokenizer's EOS is then appended to answers)."""
    if not getattr(processor, "chat_template", None):
        raise DerivationError(model_type, "end of turn", "the checkpoint ships no chat template", "chat_template")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": SENTINEL}]},
    ]
    text = _rendered(processor, messages)
    if SENTINEL not in text:
        raise DerivationError(model_type, "end of turn", "the chat template does not show the assistant's answer")
    closing = text[text.index(SENTINEL) + len(SENTINEL) :].split("\n", 1)[0].strip()
    if not closing and not processor.tokenizer.eos_token:
        raise DerivationError(model_type, "end of turn", "the template closes no turn and the tokenizer has no EOS")
    return closing or None


def generation_eos(processor, source: str | None) -> tuple[str, ...]:
    """The tokens the checkpoint's generation config stops at (none without a generation_config.json)."""
    from transformers import GenerationConfig

    if source is None:
        return ()
    try:
        eos = GenerationConfig.from_pretrained(source).eos_token_id
    except (OSError, ValueError):
        return ()
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return tuple(t for t in processor.tokenizer.convert_ids_to_tokens(ids) if t)


def turn_end(processor, model_type: str, declared: tuple[str, ...], source: str | None) -> tuple[str, ...]:
    """`declared` (a registry entry's, or the template's own marker) plus the generation config's stop tokens
    (what the checkpoint itself says ends a turn); says so when the generation config does not stop at the
    marker (loading adds it to the stops: `loading.load_model`)."""
    stops = generation_eos(processor, source)
    known = (*declared, processor.tokenizer.eos_token)
    if stops and declared and not set(declared) & {*stops, processor.tokenizer.eos_token}:
        logger.info(
            "%s: the chat template closes answers with %s, the generation config stops only at %s: generation "
            "stops at both.",
            model_type,
            ", ".join(declared),
            ", ".join(stops),
        )
    return declared + tuple(t for t in stops if t not in known)


# --- packing ---------------------------------------------------------------------------------------

_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "attention", "chunked_attention"}


def packing_refusal(config: PretrainedConfig) -> str | None:
    """Why the checkpoint's family is not packed (None: it is), from its config alone: what its registry
    entry or the user's `register`ed family says (an entry stating how packed positions are made has been
    checked by the parity tests), else a hybrid language model's recurrent layers, else unchecked."""
    user, entry = FAMILIES.get(config.model_type), OVERRIDES.get(config.model_type)
    if user is not None:
        return user.packing_refusal
    if entry is not None and {"packing_positions", "packing_refusal"} & set(entry.facts):
        return entry.facts.get("packing_refusal")
    kinds = set(getattr(config.get_text_config(), "layer_types", None) or ()) - _ATTENTION_LAYERS
    if kinds:
        return (
            f"its language model has {', '.join(sorted(kinds))} layers, whose state runs on across a packed "
            "row unless the packed samples' boundaries (cu_seqlens) reach those layers, and vlmtune's parity "
            "tests have not proven that they do"
        )
    return UNCHECKED_PACKING


# --- the spec --------------------------------------------------------------------------------------


def _derived_parts(config: PretrainedConfig, model, given: Mapping) -> dict:
    """The module facts: derived, with what `given` (a family file) states replacing them; where derivation
    cannot locate the parts, the file must name the vision tower and language model prefixes."""
    try:
        parts = module_parts(model if model is not None else meta_model(config), config)
        derived = dict(
            vision_keys=parts.vision,
            projector_keys=parts.projector,
            language_keys=parts.language,
            decoder_layers=parts.decoder_layers,
            vision_layer=parts.vision_layers[0] if parts.vision_layers else None,
        )
    except DerivationError:
        if not {"vision_keys", "language_keys"} <= set(given):
            raise
        derived = dict(projector_keys=(), decoder_layers=(), vision_layer=None)
    return derived | {k: given[k] for k in _PART_KEYS if k in given}


_PART_KEYS = ("vision_keys", "projector_keys", "language_keys", "decoder_layers", "vision_layer")


def derive_spec(
    config: PretrainedConfig,
    processor,
    source: str | None = None,
    model=None,
    given: Mapping | None = None,
    entry: Override | None = None,
) -> FamilySpec:
    """A `FamilySpec` built from derived facts, `given` (a family file's facts) replacing those it states and
    the registry `entry` what it states; raises `DerivationError` where a fact can be neither derived nor
    taken from either. Stated facts are still verified where the checkpoint can check them (an image token
    the processor never emits)."""
    stated = {k: v for k, v in (entry.facts if entry else {}).items() if k in FAMILY_FILE_KEYS}
    given = stated | dict(given or {})
    model_type = config.model_type
    parts = _derived_parts(config, model, given)
    marker = None if "turn_end" in given else template_turn_end(processor, model_type)
    declared = given.get("turn_end", (marker,) if marker else ())
    images = image_tokens(processor, config, given.get("image_token"))
    several, row_inputs = image_layout(processor)
    spec = FamilySpec(
        model_type=model_type,
        **parts,
        image_token=images.token,
        image_placeholder=given.get("image_placeholder", images.placeholder),
        image_extra_tokens=given.get("image_extra_tokens", images.extras),
        turn_end=turn_end(processor, model_type, declared, source),
        multi_image=given.get("multi_image", several),
        row_inputs=row_inputs,
        packing_refusal=packing_refusal(config),
        derived=entry is None,
    )
    if entry is not None:
        return _with_entry(spec, entry)
    description = describe(spec, set(given))
    if description not in _described:  # once per process and family
        _described.add(description)
        logger.warning(description)
    return spec


def _with_entry(spec: FamilySpec, entry: Override) -> FamilySpec:
    """The derived spec with the entry's facts that no family file states (packing, encoding mode)."""
    rest = {k: v for k, v in entry.facts.items() if k not in FAMILY_FILE_KEYS}
    return dataclasses.replace(spec, **rest)


_described: set[str] = set()


def describe(spec: FamilySpec, given: set[str] = frozenset()) -> str:
    """The derived facts, one per line, so a user can check them (printed once per derived family)."""
    stated = f" (from the family file: {', '.join(sorted(given))})" if given else ""
    return "\n".join(
        [
            f"{spec.model_type} is not in vlmtune's registry; these facts were derived from the checkpoint{stated}:",
            f"  vision tower: {', '.join(spec.vision_keys)}",
            f"  projector: {', '.join(spec.projector_keys) or '(none)'}",
            f"  language model: {', '.join(spec.language_keys)}",
            f"  decoder blocks: {', '.join(spec.decoder_layers) or '(none found)'}; vision blocks: {spec.vision_layer}",
            f"  image token: {spec.image_token} (template writes {spec.image_placeholder or spec.image_token}; "
            f"around it: {', '.join(spec.image_extra_tokens) or 'nothing'})",
            f"  end of turn: {', '.join(spec.turn_end) or 'none in the template: EOS appended to each answer'}",
            f"  images per sample: {'several' if spec.multi_image else 'one (the processor takes no more)'}",
            f"  packing: refused ({spec.packing_refusal})" if spec.packing_refusal else "  packing: allowed",
            "  LoRA: every linear layer of the language model except the output layer and MoE routers.",
        ]
    )


def family_for(
    config: PretrainedConfig, processor, source: str | None = None, model=None, given: Mapping | None = None
) -> FamilySpec:
    """The family's spec: derived facts with its registry entry's on top, `given` (a family file's facts)
    replacing what either says; a user's `register`ed family as stated (with `given` on top). Either way
    the checkpoint's own generation-config stop tokens are added to what ends a turn. A processor without
    a chat template is read with the entry's default one (PaliGemma's; `loading.with_chat_template` gives
    it to the processor for good) and left as it was."""
    spec = FAMILIES.get(config.model_type)
    if spec is None:
        entry, default = OVERRIDES.get(config.model_type), default_chat_template(config.model_type)
        own = getattr(processor, "chat_template", None)
        if own or not default:
            return derive_spec(config, processor, source, model, given, entry)
        processor.chat_template = default
        try:
            return derive_spec(config, processor, source, model, given, entry)
        finally:
            processor.chat_template = own
    fields = {k: v for k, v in (given or {}).items() if k != "chat_template"}
    spec = dataclasses.replace(spec, **fields) if fields else spec
    ends = turn_end(processor, spec.model_type, spec.turn_end, source)
    return dataclasses.replace(spec, turn_end=ends) if ends != spec.turn_end else spec
