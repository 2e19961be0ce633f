"""Load a checkpoint, decide what trains, wrap it with PEFT.

Which parameters are vision tower, projector or language model comes from the family's registry entry;
LoRA's default targets are the language model's linear layers only, so the vision tower is never
adapted by accident.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig, PreTrainedModel

from ..errors import UsageError
from .checkpoint import check_adapter_path, check_model_path, model_errors
from .processors import load_processor
from .registry import GENERIC, FamilySpec, get_family

logger = logging.getLogger(__name__)

PARTS = ("vision_tower", "projector", "language_model", "other")


@dataclass
class Loaded:
    """A model ready to use, with its processor and family spec."""

    model: PreTrainedModel
    processor: object
    spec: FamilySpec


def part_of(name: str, spec: FamilySpec) -> str:
    """Which part a parameter or module belongs to: the longest matching key wins."""
    best, best_len = "other", -1
    for part, keys in (
        ("vision_tower", spec.vision_keys),
        ("projector", spec.projector_keys),
        ("language_model", spec.language_keys),
    ):
        for key in keys:
            if (name == key or name.startswith(key + ".")) and len(key) > best_len:
                best, best_len = part, len(key)
    return best


def strip_peft_prefix(name: str) -> str:
    """Parameter name as in the base model (PEFT adds ``base_model.model.`` and ``.base_layer``)."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def linear_modules(model: torch.nn.Module, spec: FamilySpec, part: str, leaves: set[str] | None = None) -> list[str]:
    """Names of the linear layers in `part` (optionally only those whose leaf name is in `leaves`).

    Quantised linear layers (bitsandbytes) are `torch.nn.Linear` subclasses, so QLoRA finds them too.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and part_of(name, spec) == part:
            if leaves is None or name.rsplit(".", 1)[-1] in leaves:
                names.append(name)
    return names


def _exact(names: list[str]) -> str:
    return rf"^(?:{'|'.join(re.escape(n) for n in names)})$"


def language_lora_targets(model: torch.nn.Module, spec: FamilySpec, leaves: tuple[str, ...] | None = None) -> str:
    """A PEFT regex matching the language model's decoder linear layers (not lm_head)."""
    leaves = leaves or spec.lora_leaves
    names = [n for n in linear_modules(model, spec, "language_model", set(leaves)) if n != "lm_head"]
    if not names:
        raise UsageError(
            f"found no linear layers named {', '.join(leaves)} in the language model "
            f"(keys {', '.join(spec.language_keys)}); pass --lora_target_modules"
        )
    found = sorted({n.rsplit(".", 1)[-1] for n in names})
    keys = "|".join(re.escape(k) for k in spec.language_keys if k != "lm_head")
    return rf"^(?:{keys})\..*\.(?:{'|'.join(found)})$"


def is_regex(target: str) -> bool:
    return any(c in target for c in "\\^$*+?()[]|")


def resolve_targets(
    model: torch.nn.Module, spec: FamilySpec, requested: list[str] | None, vision: bool = False
) -> str | list[str]:
    """Turn --lora_target_modules (+ --train_vision_lora) into what PEFT takes.

    - nothing or ``all-linear``: the language model's decoder linear layers;
    - leaf names (``q_proj v_proj``): those layers in the language model only, so the vision tower is
      never adapted by accident (if the language model has none, the names go to PEFT unchanged);
    - one regex: passed to PEFT as is (the user's full control, vision tower included if it matches).
    With `vision`, every linear layer of the vision tower is added (never the projector's).
    """
    if requested and len(requested) == 1 and is_regex(requested[0]):
        if vision:
            logger.warning("--train_vision_lora is ignored with a regex --lora_target_modules; the regex decides.")
        return requested[0]
    if not requested or requested == ["all-linear"]:
        language = language_lora_targets(model, spec)
    else:
        names = linear_modules(model, spec, "language_model", set(requested))
        if not names:
            logger.warning(
                "None of %s is a linear layer of the language model as %s's registry entry knows it; "
                "passing the names to PEFT unchanged (they may match the vision tower too).",
                ", ".join(requested),
                spec.model_type,
            )
            if vision:
                logger.warning("--train_vision_lora is ignored with names PEFT matches anywhere.")
            return list(requested)
        language = _exact(names)
    if not vision:
        return language
    vision_names = linear_modules(model, spec, "vision_tower")
    if not vision_names:
        raise UsageError(f"--train_vision_lora: found no linear layers under {', '.join(spec.vision_keys)}")
    return f"(?:{language})|{_exact(vision_names)}"


def decoder_layer_classes(model: torch.nn.Module, spec: FamilySpec) -> list[str]:
    """Class names of the language model's decoder blocks (what FSDP wraps), read off the model.

    The registry lists the usual ones; the loaded model is the authority (LLaVA's decoder depends on
    its language model), falling back to the registry's list when the model has no ``layers`` list.
    """
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not name.endswith("layers"):
            continue
        if part_of(name, spec) == "language_model":
            found += [type(m).__name__ for m in module if type(m).__name__ not in found]
    return found or list(spec.decoder_layers)


def resolve_attn_implementation(requested: str | None) -> str:
    """flash_attention_2 needs a GPU and the flash_attn package: otherwise fall back to sdpa, saying so."""
    requested = requested or "sdpa"
    if requested == "flash_attention_2":
        import importlib.util

        if not torch.cuda.is_available():
            logger.warning("flash_attention_2 needs a CUDA GPU; none is available, using sdpa instead.")
            return "sdpa"
        if importlib.util.find_spec("flash_attn") is None:
            logger.warning("flash_attention_2 needs the flash-attn package (pip install flash-attn); using sdpa.")
            return "sdpa"
    return requested


def quantization_config(
    spec: FamilySpec,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    quantize_vision_tower: bool = False,
    quant_storage: torch.dtype | None = None,
):
    """bitsandbytes settings for QLoRA: NF4 with double quantisation (or 8-bit), vision tower, projector
    and output layer kept in full precision unless asked otherwise. None when not quantising."""
    if load_in_4bit and load_in_8bit:
        raise UsageError("choose one of --load_in_4bit and --load_in_8bit")
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    skip = list(spec.projector_keys) + ["lm_head"]
    if not quantize_vision_tower:
        skip = list(spec.vision_keys) + skip
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=quant_storage or torch.uint8,  # FSDP/ZeRO-3 shard it: the compute dtype
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _device_map() -> dict:
    """Where a quantised model goes: this process's GPU, or the CPU."""
    import os

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def load_model(
    model_name_or_path: str,
    dtype: torch.dtype | str = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    quantize_vision_tower: bool = False,
    processor_path: str | None = None,
    **kwargs,
) -> Loaded:
    """Load model, processor and family spec; the processor comes from the same folder unless
    `processor_path` names another (an adapter's folder, which holds the processor it was trained with).

    With `load_in_4bit` / `load_in_8bit` the language model is quantised with bitsandbytes (QLoRA);
    the vision tower stays in full precision unless `quantize_vision_tower`.
    """
    processor, spec = load_processing(model_name_or_path, processor_path, trust_remote_code)
    compute_dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    storage = kwargs.pop("bnb_4bit_quant_storage", None)
    quant = quantization_config(spec, load_in_4bit, load_in_8bit, compute_dtype, quantize_vision_tower, storage)
    if quant is not None:
        kwargs.setdefault("quantization_config", quant)
        kwargs.setdefault("device_map", _device_map())
    with model_errors(model_name_or_path):
        model = AutoModelForImageTextToText.from_pretrained(
            model_name_or_path,
            dtype=dtype,
            attn_implementation=resolve_attn_implementation(attn_implementation),
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    return Loaded(model=model, processor=processor, spec=spec)


def load_processing(
    model_name_or_path: str, processor_path: str | None = None, trust_remote_code: bool = False
) -> tuple[object, FamilySpec]:
    """The checkpoint's processor (with a chat template) and family spec, without loading weights."""
    check_model_path(model_name_or_path)
    with model_errors(model_name_or_path):
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    spec = get_family(config.model_type)
    with model_errors(processor_path or model_name_or_path, "--adapter" if processor_path else "--model_name_or_path"):
        processor = load_processor(processor_path or model_name_or_path, trust_remote_code=trust_remote_code)
    spec = with_processor_image_tokens(spec, processor)
    return with_chat_template(processor, spec), with_checkpoint_turn_end(spec, processor, model_name_or_path)


def with_processor_image_tokens(spec: FamilySpec, processor) -> FamilySpec:
    """For a family vlmtune does not know, the image tokens the processor itself names (its
    ``image_token``, and Gemma-style ``boi_token``/``eoi_token``) instead of the generic guess."""
    if spec is not GENERIC or not isinstance(getattr(processor, "image_token", None), str):
        return spec
    placeholder = getattr(processor, "boi_token", None)
    extras = tuple(t for t in (placeholder, getattr(processor, "eoi_token", None)) if isinstance(t, str))
    return dataclasses.replace(
        spec,
        image_token=processor.image_token,
        image_placeholder=placeholder if isinstance(placeholder, str) else None,
        image_extra_tokens=extras,
    )


def with_checkpoint_turn_end(spec: FamilySpec, processor, model_name_or_path: str) -> FamilySpec:
    """`spec` whose `turn_end` also holds the tokens the checkpoint's generation config stops at: what
    the checkpoint itself says ends a turn (Gemma 3's ``<end_of_turn>``, Llama's ``<|eot_id|>``)."""
    try:
        eos = GenerationConfig.from_pretrained(model_name_or_path).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: the registry's and the tokenizer's EOS
        return spec
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    tokens = [processor.tokenizer.convert_ids_to_tokens(i) for i in ids]
    known = (*spec.turn_end, processor.tokenizer.eos_token)  # the tokenizer's EOS always ends a turn
    extra = tuple(t for t in tokens if t and t not in known)
    return dataclasses.replace(spec, turn_end=spec.turn_end + extra) if extra else spec


def with_chat_template(processor, spec: FamilySpec):
    """Give a processor whose checkpoint ships no chat template the family's default one."""
    if getattr(processor, "chat_template", None) is None and spec.default_chat_template:
        processor.chat_template = spec.default_chat_template
    return processor


def load_for_inference(model_name_or_path: str | None, adapter: str | None = None, **kwargs) -> Loaded:
    """Base model plus an optional adapter; the adapter folder's processor (and base path) win."""
    if adapter:
        check_adapter_path(adapter)
    if adapter and not model_name_or_path:
        model_name_or_path = adapter_base_path(adapter)
    loaded = load_model(model_name_or_path, processor_path=processor_source(adapter), **kwargs)
    if adapter:
        with model_errors(adapter, "--adapter"):
            loaded.model = PeftModel.from_pretrained(loaded.model, adapter)
    loaded.model.eval()
    return loaded


def processor_source(adapter: str | None) -> str | None:
    """The adapter folder when it holds the processor it was trained with (vlmtune saves it there), else None
    (the base model's processor)."""
    names = ("processor_config.json", "tokenizer_config.json")
    return adapter if adapter and any((Path(adapter) / name).exists() for name in names) else None


def adapter_base_path(adapter: str) -> str:
    """The base model an adapter was trained on, as PEFT recorded it."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return config["base_model_name_or_path"]


FINETUNING_TYPES = ("lora", "dora", "full")


def apply_finetuning(model: PreTrainedModel, spec: FamilySpec, args) -> PreTrainedModel:
    """Freeze parts and add LoRA / DoRA as `args` (FinetuneArguments) asks; return the model to train."""
    kind = args.finetuning_type
    if kind not in FINETUNING_TYPES:
        raise UsageError(f"--finetuning_type must be one of {', '.join(FINETUNING_TYPES)}, got {kind!r}")
    adapter = kind != "full"
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized and not adapter:
        raise UsageError("a 4-/8-bit model cannot be fully fine-tuned; use --finetuning_type lora or dora")
    # With adapters, an unfrozen vision tower is trained through LoRA too (its own weights stay frozen).
    train_vision_lora = adapter and (getattr(args, "train_vision_lora", False) or not args.freeze_vision_tower)
    if getattr(args, "train_vision_lora", False) and not adapter:
        logger.warning("--train_vision_lora applies to LoRA/DoRA; full fine-tuning: --freeze_vision_tower false.")
    if quantized:
        # Casts the layers left in half precision to float32 for stable training; freezing follows below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    freeze_projector = args.freeze_projector if args.freeze_projector is not None else adapter
    frozen = {
        "vision_tower": args.freeze_vision_tower or adapter,
        "projector": freeze_projector,
        "language_model": args.freeze_language_model or adapter,
        "other": adapter,
    }
    for name, param in model.named_parameters():
        param.requires_grad = not frozen[part_of(name, spec)]
    if not adapter:
        return model
    # Unfrozen non-LoRA parts (a projector being trained) are saved with the adapter.
    module_names = {name for name, _ in model.named_modules()}
    modules_to_save = [] if frozen["projector"] else [k for k in spec.projector_keys if k in module_names]
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        use_rslora=getattr(args, "use_rslora", False),
        use_dora=kind == "dora",
        target_modules=resolve_targets(model, spec, args.lora_target_modules, vision=train_vision_lora),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


# Names of the forward hooks transformers (`enable_input_require_grads`) and PEFT register on input
# embeddings to make their outputs require grad.
_REQUIRE_GRADS_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


def keep_frozen_parts_out_of_autograd(model: torch.nn.Module, reentrant: bool = False) -> int:
    """Remove the hooks that make input embeddings' outputs require grad; return how many were removed.

    transformers and PEFT hook every input embedding when gradient checkpointing is on, the vision
    tower's patch embedding included, so a frozen vision tower is recorded by autograd, kept (or
    recomputed) and back-propagated through for no gradient. Non-reentrant checkpointing needs no such
    hook; reentrant checkpointing needs it on the language model's token embedding only, which is put back.
    Trainable vision parameters (full fine-tuning, vision LoRA) still bring the tower into autograd.
    """
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") in _REQUIRE_GRADS_HOOKS:
                del module._forward_hooks[key]
                removed += 1
    base = getattr(model, "module", model)  # DDP / FSDP wrapper
    base = base.get_base_model() if isinstance(base, PeftModel) else base
    if hasattr(base, "_require_grads_hooks"):
        base._require_grads_hooks = []
    if reentrant and base.get_input_embeddings() is not None:

        def make_inputs_require_grads(module, inputs, output):
            output.requires_grad_(True)

        base.get_input_embeddings().register_forward_hook(make_inputs_require_grads)
    if removed:
        logger.info("Frozen parts kept out of autograd (%d input-gradient hooks removed).", removed)
    return removed


def trainable_table(model: torch.nn.Module, spec: FamilySpec) -> str:
    """A table of trainable and total parameters per part, printed at the start of every run."""
    totals = {p: [0, 0] for p in PARTS}
    for name, param in model.named_parameters():
        if ".original_module." in name:  # PEFT's frozen copy of a module trained in full (modules_to_save)
            continue
        counts = totals[part_of(strip_peft_prefix(name).replace(".modules_to_save.default", ""), spec)]
        # A 4-bit weight packs two values per byte; count the values, not the bytes.
        quant_state = getattr(param, "quant_state", None)
        # ZeRO-3 leaves an empty tensor on the module and keeps the real size in `ds_numel`.
        numel = math.prod(quant_state.shape) if quant_state is not None else getattr(param, "ds_numel", param.numel())
        counts[1] += numel
        if param.requires_grad:
            counts[0] += numel
    lines = [f"{'part':<16}{'trainable':>14}{'total':>14}{'%':>8}"]
    for part in PARTS:
        trainable, total = totals[part]
        if total:
            lines.append(f"{part:<16}{trainable:>14,}{total:>14,}{100 * trainable / total:>7.2f}%")
    return "\n".join(lines)
