"""A tiny model of an architecture that has no recipe, built from what transformers says about it.

For a `model_type` of `AutoModelForImageTextToText`'s mapping: its default config shrunk generically
(`tiny/shrink.py`), its real processor class with its PIL image processor (default image sizes), and
the shared BPE tokenizer (`build_tokenizer`) carrying the special tokens that processor reads (its
`*_token` arguments and attributes: ``image_token``, ``boi_token``...). The chat template is a
**stand-in**, ChatML turns writing the processor's image token per image, not the checkpoint's own: a
measurement on it checks vlmtune's encoding and LoRA targets, not the real template.

What cannot be built on this machine raises `NotBuildable` with the reason (an image processor only for
torchvision, a processor part vlmtune cannot make offline, a model that needs timm). Architectures that
need a different value than the generic one are small data in `OVERRIDES`, each with its reason.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, replace

import transformers
from transformers import CONFIG_MAPPING, PretrainedConfig, ProcessorMixin
from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

from ..checkpoint import missing_library
from ..processors import image_only, image_processor_names, torchvision_free
from ..tokenizer import build_tokenizer
from .shrink import shrink

# The stand-in chat template: ChatML turns, each image written as the processor's image token.
STAND_IN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}@IMAGE@"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>", "unk_token": "<unk>"}
TURN_TOKENS = ("<|im_start|>", "<|im_end|>")


class NotBuildable(Exception):  # noqa: N818 - the name the measurement reports: "not buildable here"
    """This architecture's tiny model cannot be built on this machine; the message says why."""


@dataclass(frozen=True)
class Override:
    """What one architecture needs beyond the generic build, and why."""

    reason: str
    config: dict = field(default_factory=dict)  # dotted config path -> value, after shrinking
    image_processor: dict = field(default_factory=dict)  # image processor kwargs
    tokens: dict = field(default_factory=dict)  # further named tokens (config `<name>_id` fields point at them)
    placeholder: str | None = None  # what the stand-in template writes per image (@IMAGE@: the image token)


# Qwen-style rotary positions find each image by the start marker the template writes before its pads.
_VISION_MARKERS = Override(
    reason="its rope index finds each image by the <|vision_start|> the template writes before the image pads",
    tokens={"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    placeholder="<|vision_start|>@IMAGE@<|vision_end|>",
)
_GLM_MARKERS = Override(
    reason="its rope index finds each image by the begin-of-image marker the template writes before the pads",
    tokens={"image_start_token": "<|begin_of_image|>", "image_end_token": "<|end_of_image|>"},
    placeholder="<|begin_of_image|>@IMAGE@<|end_of_image|>",
)
OVERRIDES: dict[str, Override] = {
    # Its tower sees a checkpoint's full image (980 pixels: 4,900 patches per tile), far too slow for a
    # measurement: one 64-pixel tile of 16-pixel patches instead (as the idefics3 recipe has).
    "idefics2": Override(
        reason="its default image is 4,900 patches: one 64-pixel tile instead",
        image_processor=dict(size={"shortest_edge": 64, "longest_edge": 64}, do_image_splitting=False),
        config={"vision_config.image_size": 64, "vision_config.patch_size": 16},
    ),
    # Its pixel shuffle halves each side of the patch grid, which the default 384-pixel SigLIP tower (27
    # patches a side) cannot give: 364 pixels (26 patches), as Aya Vision's checkpoints have.
    "aya_vision": Override(
        reason="the default tower's 27-patch side cannot be halved by its pixel shuffle: 364 pixels instead",
        image_processor=dict(size={"height": 364, "width": 364}),
        config={"vision_config.image_size": 364},
    ),
    # Its processor counts 576 image tokens (a 384-pixel SigLIP, as the checkpoints have); the default tower
    # is 224 pixels (196 patches).
    "deepseek_vl": Override(
        reason="the processor's 576 image tokens are a 384-pixel tower's patches: that tower, not the 224 default",
        image_processor=dict(size={"height": 384, "width": 384}),
        config={"vision_config.image_size": 384},
    ),
    # Its projector takes 1,225 or 4,900 patches (490 or 980 pixels of 14-pixel patches, as the checkpoints'
    # tower); the default tower has 32-pixel patches.
    "aria": Override(
        reason="its projector takes a 490- or 980-pixel tower's 14-pixel patches: a 490-pixel one",
        image_processor=dict(max_image_size=490),
        config={"vision_config.image_size": 490, "vision_config.patch_size": 14},
    ),
    # Its full-attention layers always build the QSA token indexer, whose sizes the default config leaves unset.
    "qwen4_exp": replace(
        _VISION_MARKERS,
        reason=_VISION_MARKERS.reason + "; its default config leaves the QSA indexer's sizes unset",
        config={
            "text_config.indexer_n_heads": 4,
            "text_config.indexer_kv_heads": 1,
            "text_config.indexer_head_dim": 16,
            "text_config.indexer_budget": 64,
            "text_config.indexer_compress_ratio": 4,
        },
    ),
    "qwen3_vl_moe": _VISION_MARKERS,
    # Its text config does not flag `mrope_section` (`shrink._fit_mrope`), yet its rotary reads it.
    "paddleocr_vl": replace(
        _VISION_MARKERS,
        reason=_VISION_MARKERS.reason + "; its rotary sections must fit the tiny head",
        config={"text_config.rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [3, 3, 2]}},
    ),
    "cosmos3_edge": _VISION_MARKERS,
    "ernie4_5_vl_moe": Override(
        reason="its rope index finds each image by the start marker the template writes before the pads",
        placeholder="<|image_start|>@IMAGE@<|image_end|>",
    ),
    "hy_v4_vl": Override(
        reason="its rope index reads each run of image tokens as one image: images are kept apart by a newline",
        placeholder="@IMAGE@\n",
    ),
    "hunyuan_vl": Override(
        reason="its processor accepts an image token only between the image start and end tokens",
        placeholder="<|image_start|>@IMAGE@<|image_end|>",
    ),
    **dict.fromkeys(("glm4v", "glm4v_moe", "glm46v", "glm5_next"), _GLM_MARKERS),
}


def _processor_class(model_type: str) -> type[ProcessorMixin]:
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise NotBuildable("transformers has no multimodal processor for it")
    try:
        cls = processor_class_from_name(name)
        if hasattr(cls, "_backends"):  # transformers' stand-in for a class whose backend is missing: raise now
            cls.get_attributes()
    except ImportError as err:
        cls = torchvision_free(name)  # as loading does (Mistral Large 4's PixtralProcessor)
        if cls is None:
            needs = f"its processor {name} {_needs(err)}"
            raise NotBuildable(f"{needs}: untested here (vlmtune's code path is kept)") from err
    if cls is None:
        raise NotBuildable(f"its processor class {name} is not importable here")
    return cls


def _needs(err: ImportError) -> str:
    """'needs torchvision' (or the library the import error names)."""
    return f"needs {missing_library(str(err)) or 'a library not installed here'}"


def _image_processor(model_type: str, processor_cls: type, kwargs: dict):
    backends = image_processor_names(model_type, processor_cls.__name__)
    if "pil" not in backends:
        if "torchvision" in backends:
            raise NotBuildable(
                f"its image processor ({backends['torchvision']}) needs torchvision, which cannot run beside "
                "this machine's CPU torch: untested here (vlmtune's code path is kept)"
            )
        raise NotBuildable("transformers names no image processor for it")
    cls = getattr(transformers, backends["pil"], None)
    if cls is None:
        raise NotBuildable(f"its image processor class {backends['pil']} is not importable here")
    return cls(**{**_tower_sizes(model_type, cls()), **kwargs})


def _tower_sizes(model_type: str, image_processor) -> dict:
    """Image processor sizes equal to a fixed-size tower's image side (the default config's
    `vision_config.image_size`), where the processor states a fixed size: a checkpoint's processor config
    agrees with its tower, the classes' defaults need not (LLaVA-style: 224-pixel crops, a 336 tower)."""
    side = getattr(getattr(_default_config(model_type), "vision_config", None), "image_size", None)
    if isinstance(side, (list, tuple)) and len(set(side)) == 1:  # (448, 448): InternVL's square tiles
        side = side[0]
    if not isinstance(side, int):
        return {}
    sizes = {}
    for name in ("size", "crop_size"):
        size = getattr(image_processor, name, None)
        if getattr(size, "height", None) and getattr(size, "width", None):
            sizes[name] = {"height": side, "width": side}
        elif getattr(size, "shortest_edge", None) and not getattr(size, "longest_edge", None):
            sizes[name] = {"shortest_edge": side}
    return sizes


def _declared_tokens(processor_cls: type) -> dict[str, str]:
    """The special tokens the processor's `__init__` names with defaults (``image_token="<image>"``)."""
    params = inspect.signature(processor_cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.name.endswith("_token") and isinstance(p.default, str)}


def _tokenizer(tokens: dict[str, str]):
    named = {k: v for k, v in tokens.items() if k not in SPECIAL_TOKENS}
    return build_tokenizer(
        dict(SPECIAL_TOKENS),
        [*TURN_TOKENS, *named.values()],
        named_tokens=named or None,
    )


def _part(name: str, model_type: str, tokens: dict, image_processor):
    if name == "image_processor":
        return image_processor
    if name.endswith("tokenizer"):
        return _tokenizer(tokens)
    if name == "feature_extractor" and model_type in FEATURE_EXTRACTOR_MAPPING_NAMES:
        return getattr(transformers, FEATURE_EXTRACTOR_MAPPING_NAMES[model_type])()
    raise NotBuildable(f"its processor needs a {name}, which the generic tiny builder does not make")


# How a processor says that the tokenizer lacks a named token it reads (``tokenizer.image_token``).
_MISSING = re.compile(r"has no attribute '?(\w+?_token)(?:_id)?'?\b|missing required attribute '(\w+_token)'")


def _construct(cls: type[ProcessorMixin], model_type: str, tokens: dict, image_processor) -> ProcessorMixin:
    """`cls` from fresh parts, adding each named token the processor turns out to read off the tokenizer."""
    names = set(inspect.signature(cls.__init__).parameters)
    for _ in range(16):  # (MiniCPM-V 4.6 reads ten)
        parts = {name: _part(name, model_type, tokens, image_processor) for name in cls.get_attributes()}
        try:
            if set(parts) <= names:
                return cls(**parts)
            return cls(*parts.values())  # positionally, where the `__init__` names its parts differently
        except KeyError as err:  # the vocabulary lacks a token the processor looks up (Fuyu's |SPEAKER|)
            token = str(err.args[0])
            if token in tokens.values():
                raise
            tokens = {**tokens, f"{re.sub(r'[^a-z]', '', token.lower())}_token": token}
        except (AttributeError, ValueError) as err:
            missing = _MISSING.search(str(err))
            if missing is None:
                raise
            name = missing.group(1) or missing.group(2)
            if name in tokens:
                raise
            tokens = {**tokens, name: f"<|{name.removesuffix('_token')}|>"}
    raise NotBuildable("its processor keeps asking the tokenizer for more named tokens")


def build_processor(model_type: str, override: Override | None = None) -> ProcessorMixin:
    """The architecture's real processor around a tiny tokenizer and its PIL image processor, with the
    stand-in chat template (writing nothing for images where the processor names no image token)."""
    cls = _processor_class(model_type)
    if "video_processor" in cls.get_attributes():
        cls = image_only(cls)
    image_processor = _image_processor(model_type, cls, dict(override.image_processor) if override else {})
    tokens = {**_declared_tokens(cls), **(override.tokens if override else {})}
    for _ in range(2):  # once more with the tokens the processor turned out to hold
        processor = _construct(cls, model_type, tokens, image_processor)
        found = {k: v for k, v in vars(processor).items() if k.endswith("_token") and isinstance(v, str)}
        vocab = processor.tokenizer.get_vocab()
        if all(v in vocab for v in found.values()):
            break
        tokens = {**tokens, **found}
    image_token = getattr(processor, "image_token", None)
    image_token = image_token if isinstance(image_token, str) else ""
    placeholder = (override.placeholder if override and override.placeholder else "@IMAGE@").replace(
        "@IMAGE@", image_token
    )
    template = STAND_IN_TEMPLATE.replace("@IMAGE@", placeholder)
    processor.chat_template = processor.tokenizer.chat_template = template
    return processor


def _token_fields(config: PretrainedConfig, processor, tokenizer) -> None:
    """Point the config's ``<x>_token_id`` / ``<x>_token_index`` fields at the processor's ``<x>_token``."""
    vocab = tokenizer.get_vocab()
    for sub in (config, config.get_text_config()):
        for name, value in list(vars(sub).items()):
            if not isinstance(value, int) or not name.endswith(("_token_id", "_token_index")):
                continue
            base = name.rsplit("_", 1)[0]
            token_id = getattr(processor, f"{base}_id", None)
            token = getattr(processor, base, None) or getattr(tokenizer, base, None)
            if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):  # the token it expands (Aya's patch)
                setattr(sub, name, token_id)
            elif isinstance(token, str) and token in vocab:
                setattr(sub, name, vocab[token])


def _default_config(model_type: str) -> PretrainedConfig:
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # default configs of some types warn about their own defaults
    try:
        return CONFIG_MAPPING[model_type]()
    finally:
        transformers.logging.set_verbosity(verbosity)


def build_config(model_type: str, processor, override: Override | None = None) -> PretrainedConfig:
    """The default config shrunk, sized by the tokenizer, its token ids the processor's tokens."""
    tokenizer = processor.tokenizer
    config = _default_config(model_type)
    shrink(config, dict(override.config) if override else None)
    text = config.get_text_config()
    text.vocab_size = len(tokenizer)
    text.bos_token_id, text.eos_token_id, text.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    _token_fields(config, processor, tokenizer)
    _same_patches(config, processor)
    return config


# Image processor setting -> the vision config field that must agree with it (Qwen-style processors
# cut images into the tower's patches themselves).
PATCH_FIELDS = {
    "patch_size": "patch_size",
    "temporal_patch_size": "temporal_patch_size",
    "merge_size": "spatial_merge_size",
}


def _same_patches(config: PretrainedConfig, processor) -> None:
    """Give the image processor the vision config's patch geometry where both state it, and the processor
    the settings it counts image tokens with where it was left without (LLaVA-style ones: the checkpoint's
    processor config states them)."""
    vision = getattr(config, "vision_config", None)
    for name, source in (("patch_size", vision), ("vision_feature_select_strategy", config)):
        if hasattr(processor, name) and getattr(processor, name) is None:
            setattr(processor, name, getattr(source, name, None))
    side, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if getattr(processor, "num_image_tokens", 0) is None and isinstance(side, int) and isinstance(patch, int):
        processor.num_image_tokens = (side // patch) ** 2  # LLaVA-OneVision counts a base image's tokens so
    if getattr(config, "vision_feature_select_strategy", None) == "default" and hasattr(
        processor, "num_additional_image_tokens"
    ):
        processor.num_additional_image_tokens = 1  # the CLS token the "default" strategy drops
    image_processor = processor.image_processor
    merge = getattr(config, "spatial_merge_size", None)
    if isinstance(getattr(processor, "spatial_merge_size", None), int) and isinstance(merge, int):
        # Pixtral-style processors count rows of merged patches themselves (Mistral Large 4's)
        processor.spatial_merge_size, processor.patch_size = merge, patch
        if isinstance(getattr(image_processor, "patch_size", None), dict):
            image_processor.patch_size = {"height": patch, "width": patch}
    for setting, field_name in PATCH_FIELDS.items():
        value = getattr(vision, field_name, None)
        if isinstance(value, int) and isinstance(getattr(image_processor, setting, None), int):
            setattr(image_processor, setting, value)


def generic_build(model_type: str) -> tuple[PretrainedConfig, ProcessorMixin]:
    """A tiny (config, processor) for `model_type`, or `NotBuildable` saying why not."""
    if model_type not in CONFIG_MAPPING:
        raise NotBuildable("transformers has no config class for it")
    override = OVERRIDES.get(model_type)
    processor = build_processor(model_type, override)
    return build_config(model_type, processor, override), processor
