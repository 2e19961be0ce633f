"""Family facts derived from the checkpoint: they agree with the hand-written entries where those exist,
LoRA covers the whole language model and nothing else, and what cannot be derived is refused by name."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from transformers import Gemma4ImageProcessorPil, Gemma4Processor
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

from tests.test_packing import refused
from vlmtune.config import FinetuneArguments
from vlmtune.models.derive import DerivationError, derive_spec, family_for, meta_model
from vlmtune.models.loading import (
    apply_finetuning,
    language_lora_targets,
    linear_modules,
    load_model,
    part_of,
    strip_peft_prefix,
)
from vlmtune.models.processors import image_only, load_processor
from vlmtune.models.registry import FAMILIES
from vlmtune.models.tiny import RECIPES
from vlmtune.models.tokenizer import build_tokenizer

# What a registry entry states differently from derivation, and why it is still right.
OVERRIDDEN = {
    # No chat template to derive the turn end from: prompt as prefix, answer as suffix.
    "paligemma": {"*"},
    # The template writes the tokenizer's EOS itself; the entry leaves it to the EOS every family trains.
    "llava_next": {"turn_end"},
    # The entry names the usual CLIP block; derivation reads the tower's real one (SigLIP here).
    "llava_siglip": {"vision_layer"},
}
FACTS = ("vision_keys", "language_keys", "image_token", "turn_end", "vision_layer")


def built(family: str):
    config, processor = RECIPES[family].build()
    return config, processor, meta_model(config)


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_derived_facts_agree_with_the_registry_entries(family):
    config, processor, model = built(family)
    entry = FAMILIES.get(config.model_type)
    skip = OVERRIDDEN.get(family, set())
    if "*" in skip:
        with pytest.raises(DerivationError, match="no chat template"):
            derive_spec(config, processor, model=model)
        return
    spec = derive_spec(config, processor, model=model)
    assert {part_of(n, spec) for n, _ in model.named_parameters()} == {"vision_tower", "projector", "language_model"}
    if entry is None:
        return
    for fact in FACTS:
        if fact not in skip:
            assert getattr(spec, fact) == getattr(entry, fact), fact
    assert set(spec.projector_keys) == set(entry.projector_keys)
    assert set(spec.image_extra_tokens) == set(entry.image_extra_tokens)
    assert (spec.image_placeholder or spec.image_token) == (entry.image_placeholder or entry.image_token)
    assert set(spec.decoder_layers) <= set(entry.decoder_layers)


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_default_lora_adapts_every_language_model_linear_and_nothing_else(family):
    config, processor, model = built(family)
    spec = family_for(config, processor, model=model)
    pattern = language_lora_targets(model, spec)
    adapted = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)}
    language = set(linear_modules(model, spec, "language_model")) - {"lm_head"}
    routers = {n for n in language if n.rsplit(".", 1)[-1] in {"router", "shared_expert_gate"}}
    assert adapted == language - routers
    assert not adapted & set(linear_modules(model, spec, "vision_tower") + linear_modules(model, spec, "projector"))


def test_qwen3_5_lora_reaches_its_linear_attention_and_moe_shared_experts_not_routers():
    config, processor, model = built("qwen3_5_moe")
    pattern = language_lora_targets(model, family_for(config, processor, model=model))
    layer = "model.language_model.layers.1"
    for leaf in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"):
        assert re.fullmatch(pattern, f"{layer}.linear_attn.{leaf}"), leaf
    assert re.fullmatch(pattern, f"{layer}.mlp.shared_expert.up_proj")
    assert not re.fullmatch(pattern, f"{layer}.mlp.shared_expert_gate"), "a gate, not adapted"
    assert not re.fullmatch(pattern, "model.visual.blocks.0.attn.qkv")


def test_a_processor_without_an_image_token_is_refused_by_name():
    config, processor, model = built("qwen3_5")
    object.__setattr__(config, "image_token_id", None)  # (the config's field checks refuse None)
    processor.image_token = None
    with pytest.raises(DerivationError, match=r"qwen3_5: cannot derive the image token: .*register"):
        derive_spec(config, processor, model=model)


def test_an_image_token_the_processor_never_emits_is_refused():
    config, processor, model = built("qwen3_5")
    config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    with pytest.raises(DerivationError, match="holds no '<|video_pad|>'"):
        derive_spec(config, processor, model=model)


def test_packing_a_hybrid_linear_attention_model_is_refused_before_loading(
    tiny_model_dir, shapes_data, tmp_path, capsys
):
    model = tiny_model_dir("qwen3_5")
    argv = ["train", "--model_name_or_path", model, "--dataset_name", str(shapes_data["train"]),
            "--output_dir", str(tmp_path / "o"), "--padding_free", "true"]  # fmt: skip
    err = refused(argv, capsys)
    assert "--padding_free: qwen3_5 models cannot be trained on packed samples" in err
    assert "linear_attention layers" in err and "cu_seqlens" in err


def test_gemma4_processor_loads_and_processes_an_image_without_its_video_processor(tmp_path):
    """Gemma 4's processor hands ``video_processor`` on to ProcessorMixin even when it is None; the
    image-only processor (no torchvision here) must still load from a saved folder and expand an image."""
    tokenizer = build_tokenizer(
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
        ["<|turn>", "<turn|>"],
        # Gemma 4's tokenizer names its audio markers too (its processor insists, even for images).
        named_tokens={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                      "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"},
    )  # fmt: skip
    processor = image_only(Gemma4Processor)(
        Gemma4AudioFeatureExtractor(), Gemma4ImageProcessorPil(max_soft_tokens=70), tokenizer, image_seq_length=70
    )
    processor.save_pretrained(tmp_path)
    loaded = load_processor(str(tmp_path))
    assert isinstance(loaded, Gemma4Processor)
    ids = loaded(text=["<|image|> look"], images=[[Image.new("RGB", (64, 64), "red")]])["input_ids"][0]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image|>")) > 0


def test_gemma4_vision_lora_reaches_the_linears_inside_its_clipping_wrappers(tiny_model_dir):
    """Gemma 4's vision projections are `Gemma4ClippableLinear` modules holding the `nn.Linear` as
    ``.linear``: --train_vision_lora must adapt those inner linears (PEFT cannot wrap the wrapper), and the
    default must leave the whole tower alone."""
    loaded = load_model(tiny_model_dir("gemma4"))
    wrapped = {n for n, m in loaded.model.named_modules() if type(m).__name__ == "Gemma4ClippableLinear"}
    assert wrapped, "the tiny model has the real checkpoints' wrapped vision linears"
    model = apply_finetuning(loaded.model, loaded.spec, FinetuneArguments(train_vision_lora=True))
    adapted = {strip_peft_prefix(n.split(".lora_A.")[0]) for n, _ in model.named_parameters() if ".lora_A." in n}
    assert {f"{name}.linear" for name in wrapped} <= adapted
    plain = apply_finetuning(load_model(tiny_model_dir("gemma4")).model, loaded.spec, FinetuneArguments())
    assert not any(".vision_tower." in n for n, _ in plain.named_parameters() if ".lora_A." in n)


def test_gemma4_fsdp_wraps_only_the_blocks_the_model_has(tiny_model_dir, tmp_path):
    """Gemma 4 lists its audio block among those to keep whole even without an audio tower; FSDP told to
    wrap a class the model lacks fails, so vlmtune wraps the decoder and vision blocks it finds."""
    from vlmtune.config import VlmTrainingArguments
    from vlmtune.train.fsdp import default_fsdp_wrap

    loaded = load_model(tiny_model_dir("gemma4"))
    present = {type(m).__name__ for m in loaded.model.modules()}
    assert "Gemma4AudioLayer" in loaded.model._no_split_modules and "Gemma4AudioLayer" not in present
    args = VlmTrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True)
    classes = default_fsdp_wrap(args, loaded.model, loaded.spec)
    assert set(classes) == {"Gemma4TextDecoderLayer", "Gemma4VisionEncoderLayer"}
    assert set(classes) <= present


def test_an_image_only_processor_whose_init_passes_its_parts_positionally_keeps_the_tokenizer(tmp_path):
    """Video-LLaVA's `__init__` hands (image processor, video processor, tokenizer) on positionally: without
    its video processor (no torchvision here) the tokenizer must still land in its own place, and the
    processor load from a saved folder and expand an image."""
    from transformers import CLIPImageProcessorPil, VideoLlavaProcessor

    tokenizer = build_tokenizer({"eos_token": "</s>", "pad_token": "<pad>"}, ["<image>", "<video>"])
    processor = image_only(VideoLlavaProcessor)(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)
    assert processor.tokenizer is tokenizer
    processor.save_pretrained(tmp_path)
    loaded = load_processor(str(tmp_path))
    ids = torch.as_tensor(loaded(text=["<image> look"], images=[Image.new("RGB", (64, 64), "red")])["input_ids"][0])
    assert isinstance(loaded, VideoLlavaProcessor) and loaded.tokenizer.convert_tokens_to_ids("<image>") in ids
    assert ids.tolist().count(tokenizer.convert_tokens_to_ids("<image>")) > 1, "one image is several feature tokens"


def test_a_processor_that_takes_one_image_per_sample_is_derived_single_image():
    """ShieldGemma 2's processor refuses two images in a sample: derived, the family takes each sample's
    first image (as single-image registry entries do) instead of every two-image row being a data error."""
    from vlmtune.models.tiny.generic import generic_build

    config, processor = generic_build("shieldgemma2")
    assert not derive_spec(config, processor, model=meta_model(config)).multi_image
    config, processor, model = built("qwen3_5")
    assert derive_spec(config, processor, model=model).multi_image
