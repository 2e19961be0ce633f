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
from vlmtune.data.encode import SENTINEL
from vlmtune.models.derive import (
    FAMILY_FILE_KEYS,
    DerivationError,
    UnsupportedModelError,
    derive_spec,
    family_for,
    meta_model,
)
from vlmtune.models.loading import (
    apply_finetuning,
    expert_parameters,
    language_lora_targets,
    linear_modules,
    load_model,
    part_of,
    strip_peft_prefix,
)
from vlmtune.models.processors import image_only, load_processor
from vlmtune.models.registry import OVERRIDES
from vlmtune.models.tiny import RECIPES
from vlmtune.models.tokenizer import build_tokenizer

# The facts each architecture really has (transformers 5's module layout, the processors' image tokens, the
# templates' turn ends): what vlmtune uses must be these. Registry entries state none of them: derivation
# finds them all.
_QWEN = dict(
    vision_keys=("model.visual",),
    projector_keys={"model.visual.merger"},
    language_keys=("model.language_model", "lm_head"),
    image_token="<|image_pad|>",
    image_extra_tokens={"<|vision_start|>", "<|vision_end|>"},
    turn_end=("<|im_end|>",),
)
_LLAVA = dict(
    vision_keys=("model.vision_tower",),
    projector_keys={"model.multi_modal_projector"},
    language_keys=("model.language_model", "lm_head"),
    image_token="<image>",
    image_extra_tokens=set(),
    turn_end=(),  # LLaVA-1.5's template closes no turn: the tokenizer's EOS is appended to each answer
)
_IDEFICS = dict(
    vision_keys=("model.vision_model",),
    projector_keys={"model.connector"},
    language_keys=("model.text_model", "lm_head"),
    image_token="<image>",
    image_extra_tokens={"<fake_token_around_image>", "<global-img>"},
    turn_end=("<end_of_utterance>",),
    decoder_layers=("LlamaDecoderLayer",),
)
EXPECTED = {
    "qwen2_vl": _QWEN | dict(decoder_layers=("Qwen2VLDecoderLayer",), vision_layer="Qwen2VLVisionBlock"),
    "qwen2_5_vl": _QWEN | dict(decoder_layers=("Qwen2_5_VLDecoderLayer",), vision_layer="Qwen2_5_VLVisionBlock"),
    "qwen3_vl": _QWEN
    | dict(
        projector_keys={"model.visual.merger", "model.visual.deepstack_merger_list"},
        decoder_layers=("Qwen3VLTextDecoderLayer",),
        vision_layer="Qwen3VLVisionBlock",
    ),
    "qwen3_vl_moe": _QWEN
    | dict(
        projector_keys={"model.visual.merger", "model.visual.deepstack_merger_list"},
        decoder_layers=("Qwen3VLMoeTextDecoderLayer",),
        vision_layer="Qwen3VLMoeVisionBlock",
    ),
    "qwen3_5": _QWEN | dict(decoder_layers=("Qwen3_5DecoderLayer",), vision_layer="Qwen3_5VisionBlock"),
    "qwen3_5_moe": _QWEN | dict(decoder_layers=("Qwen3_5MoeDecoderLayer",), vision_layer="Qwen3_5MoeVisionBlock"),
    "llava": _LLAVA | dict(decoder_layers=("LlamaDecoderLayer",), vision_layer="CLIPEncoderLayer", multi_image=False),
    "llava_siglip": _LLAVA
    | dict(decoder_layers=("LlamaDecoderLayer",), vision_layer="SiglipEncoderLayer", multi_image=False),
    "llava_next": _LLAVA
    | dict(
        projector_keys={"model.multi_modal_projector", "model.image_newline"},
        turn_end=("</s>",),  # the template writes the EOS after each answer itself
        decoder_layers=("MistralDecoderLayer",),
        vision_layer="CLIPEncoderLayer",
        multi_image=False,
    ),
    "llava_onevision": _LLAVA
    | dict(
        projector_keys={"model.multi_modal_projector", "model.image_newline"},
        turn_end=("<|im_end|>",),
        decoder_layers=("Qwen2DecoderLayer",),
        vision_layer="SiglipEncoderLayer",
    ),
    "gemma3": _LLAVA
    | dict(
        image_token="<image_soft_token>",
        image_placeholder="<start_of_image>",
        image_extra_tokens={"<start_of_image>", "<end_of_image>"},
        turn_end=("<end_of_turn>",),
        decoder_layers=("Gemma3DecoderLayer",),
        vision_layer="SiglipEncoderLayer",
    ),
    "gemma4": _LLAVA
    | dict(
        projector_keys={"model.embed_vision"},
        image_token="<|image|>",
        image_extra_tokens={"<|image>", "<image|>"},
        turn_end=("<turn|>",),
        decoder_layers=("Gemma4TextDecoderLayer",),
        vision_layer="Gemma4VisionEncoderLayer",
    ),
    "paligemma": _LLAVA
    | dict(decoder_layers=("GemmaDecoderLayer",), vision_layer="SiglipEncoderLayer", multi_image=False),
    "mllama": dict(
        vision_keys=("model.vision_model",),
        projector_keys={"model.multi_modal_projector"},
        language_keys=("model.language_model", "lm_head"),
        image_token="<|image|>",
        image_extra_tokens=set(),
        turn_end=("<|eot_id|>",),
        decoder_layers=("MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"),
        vision_layer="MllamaVisionEncoderLayer",
        multi_image=False,
    ),
    "mistral3": _LLAVA
    | dict(
        image_token="[IMG]",
        image_extra_tokens={"[IMG_BREAK]", "[IMG_END]"},
        turn_end=("</s>",),
        decoder_layers=("MistralDecoderLayer",),
        vision_layer="PixtralAttentionLayer",
    ),
    "internvl": _LLAVA
    | dict(
        image_token="<IMG_CONTEXT>",
        image_extra_tokens={"<img>", "</img>"},
        turn_end=("<|im_end|>",),
        decoder_layers=("Qwen2DecoderLayer",),
        vision_layer="InternVLVisionLayer",
    ),
    "glm4v": _QWEN
    | dict(
        image_token="<|image|>",
        image_extra_tokens={"<|begin_of_image|>", "<|end_of_image|>"},
        turn_end=(),  # the template closes no turn; the generation config's stop tokens are added on loading
        decoder_layers=("Glm4vTextDecoderLayer",),
        vision_layer="Glm4vVisionBlock",
    ),
    "glm4v_moe": _QWEN
    | dict(
        image_token="<|image|>",
        image_extra_tokens={"<|begin_of_image|>", "<|end_of_image|>"},
        turn_end=(),
        decoder_layers=("Glm4vMoeTextDecoderLayer",),
        vision_layer="Glm4vMoeVisionBlock",
    ),
    "idefics2": _IDEFICS
    | dict(
        image_extra_tokens={"<fake_token_around_image>"},
        decoder_layers=("MistralDecoderLayer",),
        vision_layer="Idefics2EncoderLayer",
    ),
    "idefics3": _IDEFICS | dict(vision_layer="Idefics3EncoderLayer"),
    "smolvlm": _IDEFICS | dict(vision_layer="SmolVLMEncoderLayer"),
}


def built(family: str):
    config, processor = RECIPES[family].build()
    return config, processor, meta_model(config)


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_every_family_gets_the_facts_its_architecture_really_has(family):
    config, processor, model = built(family)
    spec = family_for(config, processor, model=model)
    assert {part_of(n, spec) for n, _ in model.named_parameters()} == {"vision_tower", "projector", "language_model"}
    expected = {"image_placeholder": None, "multi_image": True, **EXPECTED[family]}
    found = {fact: getattr(spec, fact) for fact in expected}
    found = {k: set(v) if isinstance(expected[k], set) else v for k, v in found.items()}
    assert found == expected
    assert spec.derived == (config.model_type not in OVERRIDES)


@pytest.mark.parametrize("family", sorted(OVERRIDES))
def test_registry_entries_state_only_what_derivation_cannot_know(family):
    """Each fact of an entry that derivation could find (the family-file facts) differs from what it finds
    alone; the rest (packing, PaliGemma's prefix/suffix encoding) are beyond derivation. Each entry says why."""
    config, processor, model = built(family)
    entry = OVERRIDES[family]
    assert entry.why
    derivable = {k: v for k, v in entry.facts.items() if k in FAMILY_FILE_KEYS}
    if family == "paligemma":  # its template renders no answer: derivation alone refuses it
        processor.chat_template = entry.facts["default_chat_template"]
        with pytest.raises(DerivationError, match="does not show the assistant's answer"):
            derive_spec(config, processor, model=model)
        derivable.pop("turn_end")
    alone = derive_spec(config, processor, model=model, given={"turn_end": ()} if family == "paligemma" else None)
    for fact, value in derivable.items():
        assert getattr(alone, fact) != value, f"{family}: {fact} is derived already; drop it from the entry"


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


@pytest.mark.parametrize(("family", "block"), [("llava", "CLIPEncoderLayer"), ("llava_siglip", "SiglipEncoderLayer")])
def test_llava_reports_the_vision_block_of_its_own_tower_and_fsdp_wraps_it(family, block, tiny_model_dir, tmp_path):
    """One LLaVA entry, two towers: the vision block is read off the checkpoint (it was CLIP's for a SigLIP
    tower, so FSDP left the SigLIP blocks unwrapped)."""
    from vlmtune.config import VlmTrainingArguments
    from vlmtune.train.fsdp import default_fsdp_wrap

    config, processor, model = built(family)
    assert "vision_layer" not in OVERRIDES["llava"].facts, "not a family fact: the checkpoint's tower decides"
    assert family_for(config, processor).vision_layer == block
    loaded = load_model(tiny_model_dir(family))
    assert loaded.spec.vision_layer == block
    args = VlmTrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True)
    assert block in default_fsdp_wrap(args, loaded.model, loaded.spec)


def test_qwen3_5_lora_reaches_its_linear_attention_and_moe_shared_experts_not_routers():
    config, processor, model = built("qwen3_5_moe")
    pattern = language_lora_targets(model, family_for(config, processor, model=model))
    layer = "model.language_model.layers.1"
    for leaf in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"):
        assert re.fullmatch(pattern, f"{layer}.linear_attn.{leaf}"), leaf
    assert re.fullmatch(pattern, f"{layer}.mlp.shared_expert.up_proj")
    assert not re.fullmatch(pattern, f"{layer}.mlp.shared_expert_gate"), "a gate, not adapted"
    assert not re.fullmatch(pattern, "model.visual.blocks.0.attn.qkv")


def test_qwen3_vl_moe_lora_adapts_attention_only_its_router_is_no_linear_and_experts_are_fused():
    """Qwen3-VL-MoE's sparse block holds a router (`mlp.gate`, its own module with a 2-D weight, not an
    `nn.Linear`) and the routed experts as fused 3-D parameters, and no shared expert: the default LoRA
    adapts the attention projections and nothing in the MLP; only --lora_target_experts reaches the experts."""
    config, processor, model = built("qwen3_vl_moe")
    spec = family_for(config, processor, model=model)
    layer = "model.language_model.layers.1"
    router = model.get_submodule(f"{layer}.mlp.gate")
    assert not isinstance(router, torch.nn.Linear) and router.weight.shape == (4, config.text_config.hidden_size)
    assert not any("shared_expert" in n for n, _ in model.named_modules())
    pattern = language_lora_targets(model, spec)
    adapted = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)}
    assert {n.split(".layers.")[1].split(".", 1)[1] for n in adapted} == {
        f"self_attn.{p}_proj" for p in ("q", "k", "v", "o")
    }
    assert expert_parameters(model, spec) == [
        f"model.language_model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    ]


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


def test_a_processor_that_takes_one_image_per_sample_gets_one(monkeypatch):
    """Whether several images work is read off the processor: one that refuses two (as ShieldGemma 2's does)
    gets one image per sample, the others dropped with a warning, instead of every such row failing."""
    config, processor, model = built("qwen3_5")
    assert derive_spec(config, processor, model=model).multi_image
    call = type(processor).__call__

    def one_image_only(self, images=None, text=None, **kwargs):
        if images and any(len(sample) > 1 for sample in images):
            raise ValueError("this processor takes at most one image per sample")
        return call(self, images=images, text=text, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", one_image_only)
    assert not derive_spec(config, processor, model=model).multi_image


def test_a_processor_that_replaces_the_users_text_is_refused(monkeypatch):
    """ShieldGemma 2's processor renders its own policy prompts whatever text it is given: training on it
    would never show the model the user's prompts, so it is refused by name, before any weights load."""
    config, processor, model = built("qwen3_5")
    call = type(processor).__call__

    def own_prompts(self, images=None, text=None, **kwargs):
        return call(self, images=images, text=[t.replace(SENTINEL, "Is this image safe?") for t in text], **kwargs)

    monkeypatch.setattr(type(processor), "__call__", own_prompts)
    with pytest.raises(
        UnsupportedModelError, match="qwen3_5: vlmtune cannot fine-tune it: its processor does not"
    ):
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


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "mistral3", "glm4v_moe"])
def test_packing_a_derived_family_is_refused_before_loading_with_the_reason(
    family, tiny_model_dir, shapes_data, tmp_path, capsys
):
    """Qwen3-VL-MoE and Mistral 3 are checked but not registered: no parity test has proven their packed
    batches yet, so packing them is refused, saying why, before any weights load."""
    argv = ["train", "--model_name_or_path", tiny_model_dir(family), "--dataset_name", str(shapes_data["train"]),
            "--output_dir", str(tmp_path / "o"), "--padding_free", "true"]  # fmt: skip
    err = refused(argv, capsys)
    assert f"--padding_free: {family} models cannot be trained on packed samples" in err
    assert "vlmtune has not checked how this architecture's positions and attention treat packed samples" in err


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


def test_mistral3_processor_loads_and_expands_an_image_without_torchvision(tiny_model_dir):
    """transformers 5.24 marks Pixtral's processor torchvision-only for one size helper it imports; vlmtune
    loads the real class from a saved folder all the same, and the torchvision module's stand-in is gone
    afterwards. A 64x64 image is 4x4 merged patches: four rows of [IMG], each closed by [IMG_BREAK] but the
    last, closed by [IMG_END]."""
    import importlib.util
    import sys

    import transformers

    loaded = load_processor(tiny_model_dir("mistral3"))
    assert type(loaded).__name__ == "PixtralProcessor" and type(loaded) is not transformers.PixtralProcessor
    if importlib.util.find_spec("torchvision") is None:
        assert "transformers.models.pixtral.image_processing_pixtral" not in sys.modules
    text = loaded(text=["[IMG]look"], images=[[Image.new("RGB", (64, 64), "red")]])["input_ids"][0]
    row = ["[IMG]"] * 4
    assert loaded.tokenizer.convert_ids_to_tokens(text)[:20] == [*row, "[IMG_BREAK]"] * 3 + [*row, "[IMG_END]"]


def test_internvl_writes_its_context_tokens_per_tile_and_the_model_fills_each(tiny_model_dir):
    """InternVL's processor cuts an image into tiles (a wide one: two and a thumbnail) and writes
    `image_seq_length` <IMG_CONTEXT> per tile between <img> and </img>; pixel shuffle must give the model
    exactly that many features per tile, or the forward refuses the batch."""
    from transformers import AutoModelForImageTextToText

    folder = tiny_model_dir("internvl")
    processor = load_processor(folder)
    images = [[Image.new("RGB", (64, 64), "red")], [Image.new("RGB", (96, 64), "blue")]]
    batch = processor(text=["<IMG_CONTEXT>\nA", "<IMG_CONTEXT>\nB"], images=images, padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape[0] == 1 + 3
    for row, tiles in zip(batch["input_ids"].tolist(), (1, 3), strict=True):
        tokens = processor.tokenizer.convert_ids_to_tokens(row)
        start = tokens.index("<img>")
        assert tokens[start : start + 2 + 16 * tiles] == ["<img>", *["<IMG_CONTEXT>"] * 16 * tiles, "</img>"]
    logits = AutoModelForImageTextToText.from_pretrained(folder)(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape


def test_internvl_3_5_with_a_qwen3_language_model_gets_its_own_blocks_and_full_lora():
    """InternVL3.5's -HF checkpoints hold Qwen3 language models (the tiny model is InternVL3's Qwen2): the
    decoder blocks are read off the checkpoint, and LoRA still covers every language-model linear."""
    from dataclasses import replace

    from vlmtune.models.tiny.common import HEAD_DIM

    recipe = replace(RECIPES["internvl"], text_config=dict(model_type="qwen3", head_dim=HEAD_DIM))
    config, processor = recipe.build()
    model = meta_model(config)
    spec = family_for(config, processor, model=model)
    assert spec.decoder_layers == ("Qwen3DecoderLayer",) and spec.image_token == "<IMG_CONTEXT>"
    pattern = language_lora_targets(model, spec)
    adapted = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)}
    assert adapted == set(linear_modules(model, spec, "language_model")) - {"lm_head"}


def test_llava_onevision_tiles_a_lone_image_and_takes_several_at_their_base_view(tiny_model_dir):
    """OneVision's processor tiles one image per sample (its 32-pixel base view: 16 tokens, plus a 2x2 grid of
    crops: 8x8 tokens and a newline per row) but takes each of several images at its base view only (16 and a
    newline), saying so per row in `batch_num_images`; the model must fill exactly those tokens in both cases."""
    from transformers import AutoModelForImageTextToText

    folder = tiny_model_dir("llava_onevision")
    processor, model = load_processor(folder), AutoModelForImageTextToText.from_pretrained(folder)
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for text, images, crops, tokens in (
        ("<image>\nA", [red], 5, 16 + 64 + 8),
        ("<image>\n<image>\nA", [red, blue], 1, 2 * 17),
    ):
        batch = processor(text=[text], images=[images], return_tensors="pt")
        assert batch["pixel_values"].shape[:2] == (len(images), crops)
        assert batch["batch_num_images"].tolist() == [len(images)]
        assert (batch["input_ids"] == image_id).sum() == tokens
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


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


def test_shieldgemma2_a_classifier_whose_processor_writes_its_own_prompts_is_refused():
    """The real ShieldGemma 2 processor (on the generic tiny model) replaces the conversation with its policy
    prompts: refused by name before any weights load, never trained on prompts it does not see."""
    from vlmtune.models.tiny.generic import generic_build

    config, processor = generic_build("shieldgemma2")
    with pytest.raises(UnsupportedModelError, match="shieldgemma2: vlmtune cannot fine-tune it: .*policy prompts"):
        derive_spec(config, processor, model=meta_model(config))


def test_glm4v_moe_lora_leaves_out_what_peft_would_rewrite_and_reloads_as_trained(tmp_path, caplog):
    """What a user of the tiny GLM-4.5V gets: PEFT 0.21 turns every gate/up/down_proj target into the routed
    experts' fused weights, on creating and on loading an adapter (huggingface/peft#3711); vlmtune says so,
    leaves the dense first layer's MLP and the shared experts out rather than train the experts unasked, and
    the saved adapter reloads in plain PEFT onto the same layers (attention)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    config, processor, _ = built("glm4v_moe")
    spec = family_for(config, processor)
    with caplog.at_level("WARNING"):
        tuned = apply_finetuning(AutoModelForImageTextToText.from_config(config), spec, FinetuneArguments())
    assert "huggingface/peft#3711" in caplog.text and "layers.0.mlp.gate_proj" in caplog.text
    adapted = {n for n, m in tuned.named_modules() if hasattr(m, "lora_A")}
    assert {n.split(".layers.")[1] for n in adapted} == {
        f"{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "k", "v", "o")
    }
    assert not tuned.peft_config["default"].target_parameters, "no routed experts adapted unasked"
    tuned.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_config(config), str(tmp_path))
    assert {n for n, m in reloaded.named_modules() if hasattr(m, "lora_A")} == adapted


@pytest.mark.xfail(strict=True, reason="huggingface/peft#3711: PEFT 0.21 rewrites GLM-4.5V's gate/up/down_proj targets")
def test_glm4v_moe_default_lora_adapts_its_dense_mlp_and_shared_experts_too():
    """The default LoRA should adapt every language-model linear but the router, as for the other families;
    on GLM-4.5V the dense first layer's MLP and the shared experts stay unadapted until PEFT is fixed."""
    from transformers import AutoModelForImageTextToText

    config, processor, _ = built("glm4v_moe")
    model = AutoModelForImageTextToText.from_config(config)
    spec = family_for(config, processor, model=model)
    language = set(linear_modules(model, spec, "language_model")) - {"lm_head"}
    tuned = apply_finetuning(model, spec, FinetuneArguments())
    adapted = {strip_peft_prefix(n) for n, m in tuned.named_modules() if hasattr(m, "lora_A")}
    assert adapted == language
