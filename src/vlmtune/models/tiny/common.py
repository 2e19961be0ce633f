"""What every tiny family shares: the sizes, the recipe record, and building, opening and saving a model.

A `TinyRecipe` is the whole of one family's tiny build as data: which transformers classes, the tokenizer's
special tokens and chat template, the image processor's and processor's settings, and the config values
that differ from the shared tiny defaults. `TinyRecipe.build` turns it into a real config and a real
processor, in the one order that always works: tokenizer, processor (which may add tokens, PaliGemma's
1152 `<loc>`/`<seg>`), then the config sized by the finished tokenizer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from ..loading import part_of
from ..processors import image_only
from ..registry import FamilySpec
from ..tokenizer import build_tokenizer

HIDDEN = 64  # a multiple of 64: frozen 4-bit (QLoRA) layers crash on other sizes
NUM_HEADS = 4
HEAD_DIM = HIDDEN // NUM_HEADS
# A larger init than the default keeps a LoRA-only tiny model from stalling: with 0.02 the frozen
# output layer caps the logits and loss plateaus near ln(vocab).
INIT_RANGE = 0.2

# The tiny language model every family starts from; a recipe's `text_config` overrides or adds to it.
TEXT = dict(
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=NUM_HEADS,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=INIT_RANGE,
)

# A tiny ViT-style tower (CLIP, SigLIP, Idefics3's): add the image and patch sizes.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def token_ids(tokenizer: PreTrainedTokenizerBase, names: Mapping[str, str]) -> dict[str, int]:
    """`{"image_token_id": "<image>"}` -> `{"image_token_id": <its id>}`."""
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


@dataclass(frozen=True)
class TinyRecipe:
    """One family's tiny model, as data (a new family is one of these; see the package docstring).

    The tokenizer's bos/eos/pad ids and its length fill the text config by themselves; name a token in
    `ids` only for the other config fields that hold token ids. Mappings are copied on building, so
    recipes may share them.
    """

    config_cls: type[PretrainedConfig]
    processor_cls: type[ProcessorMixin]  # built without its video processor where it has one
    image_processor_cls: type
    image_processor_kwargs: Mapping = field(default_factory=dict)
    # An audio feature extractor, for processors that require one even for images (Gemma 4's).
    feature_extractor_cls: type | None = None
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # bos_token, eos_token, pad_token, unk_token
    extra_tokens: tuple[str, ...] = ()  # further tokens that must never split (image, turn markers)
    named_tokens: Mapping[str, str] = field(default_factory=dict)  # read by the processor as tokenizer attributes
    chat_template: str | None = None  # None: the checkpoints ship none either (the registry supplies one)
    template_of: str | None = None  # whose template `chat_template` is, where not the family's own (not found)
    processor_kwargs: Mapping = field(default_factory=dict)
    text_config: Mapping = field(default_factory=dict)  # on top of TEXT
    vision_config: Mapping = field(default_factory=dict)
    config_kwargs: Mapping = field(default_factory=dict)  # the composite config's other fields
    ids: Mapping[str, str] = field(default_factory=dict)  # composite config field -> the token whose id it holds
    stop_tokens: tuple[str, ...] = ()  # tokens that end generation besides EOS (the text config's eos list)
    # Behaviour data cannot say, run on the config once built: `finish(config, processor)`.
    finish: Callable[[PretrainedConfig, ProcessorMixin], None] | None = None

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The family's tokenizer: shared BPE, its special tokens and chat template."""
        return build_tokenizer(
            dict(self.special_tokens),
            list(self.extra_tokens),
            chat_template=self.chat_template,
            named_tokens=dict(self.named_tokens) or None,
        )

    def processor(self) -> ProcessorMixin:
        """The family's real processor around a fresh tokenizer (image-only where torchvision would be needed)."""
        cls = self.processor_cls
        if "video_processor" in cls.get_attributes():
            cls = image_only(cls)
        parts = {
            "image_processor": self.image_processor_cls(**copy.deepcopy(dict(self.image_processor_kwargs))),
            "tokenizer": self.tokenizer(),
        }
        if self.feature_extractor_cls is not None:
            parts["feature_extractor"] = self.feature_extractor_cls()
        kwargs = copy.deepcopy(dict(self.processor_kwargs))
        # Positionally, in the processor's own order: some `__init__`s name their parts differently.
        ordered = [parts[name] for name in cls.get_attributes()]
        return cls(*ordered, chat_template=self.chat_template, **kwargs)

    def config(self, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
        """The tiny config, its vocabulary and token ids read off the finished `tokenizer`."""
        eos = tokenizer.eos_token_id
        if self.stop_tokens:
            eos = [eos, *(tokenizer.convert_tokens_to_ids(t) for t in self.stop_tokens)]
        roles = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
        text = {**TEXT, "vocab_size": len(tokenizer), **roles, **copy.deepcopy(dict(self.text_config))}
        return self.config_cls(
            text_config=text,
            vision_config=copy.deepcopy(dict(self.vision_config)),
            **copy.deepcopy(dict(self.config_kwargs)),
            **token_ids(tokenizer, self.ids),
        )

    def build(self) -> tuple[PretrainedConfig, ProcessorMixin]:
        """The family's tiny config and processor."""
        processor = self.processor()
        config = self.config(processor.tokenizer)
        if self.finish is not None:
            self.finish(config, processor)
        return config, processor


def open_zero_paths(model: torch.nn.Module, spec: FamilySpec) -> None:
    """Open the image paths that transformers initialises shut, as trained checkpoints have them open:
    zero projector matrices (Gemma 3's) get random values, zero tanh gates (Mllama's cross-attention)
    get 1. Otherwise a random tiny model could not see its images at all."""
    for name, param in model.named_parameters():
        if param.any():
            continue
        with torch.no_grad():
            if param.dim() >= 2 and part_of(name, spec) == "projector":
                param.normal_(0.0, INIT_RANGE)
            elif name.rsplit(".", 1)[-1].endswith("_gate"):
                param.fill_(1.0)


def generation_config(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Stop where the model's turns stop: the text config's stop list where it has one (Gemma 3's <eos> and
    <end_of_turn>), else the tokenizer's EOS."""
    eos = config.get_text_config().eos_token_id
    return GenerationConfig(
        eos_token_id=eos if isinstance(eos, list) else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def save(model: PreTrainedModel, processor: ProcessorMixin, output_dir: str | Path) -> Path:
    """Write model and processor with `save_pretrained`, so the folder loads like a hub checkpoint."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
