"""Load a checkpoint, decide what trains, wrap it with PEFT.

Which parameters are vision tower, projector or language model comes from the family's spec (derived
from the checkpoint, or its registry entry); LoRA's default targets are every linear layer of the
language model (not the output layer, not MoE routers), so the vision tower is never adapted by accident.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft import __version__ as peft_version
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel

from ..errors import ModelError, UsageError
from .checkpoint import (
    adapter_base,
    check_adapter_base,
    check_adapter_path,
    check_model_path,
    check_vision_language,
    model_errors,
)
from .derive import family_for
from .generation import end_of_turn_ids, stop_at_end_of_turn
from .processors import load_processor
from .registry import FamilySpec, default_chat_template

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

    Quantised linear layers (bitsandbytes) are `torch.nn.Linear` subclasses, so QLoRA finds them too, and
    a linear wrapped inside another module (Gemma 4's) is found by its own name.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and part_of(name, spec) == part:
            if leaves is None or name.rsplit(".", 1)[-1] in leaves:
                names.append(name)
    return names


def router_modules(model: torch.nn.Module) -> set[str]:
    """MoE routers and gates: linear layers named ``router``, and those beside an ``experts`` module that
    score each expert (one output per expert) or gate a shared expert (one output). Adapting them changes
    which experts a token reaches, which LoRA on the language model should not do by default."""
    found = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] == "router":
            found.add(name)
        experts = getattr(module, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        count = len(experts) if isinstance(experts, torch.nn.ModuleList) else getattr(experts, "num_experts", None)
        for child, sub in module.named_children():
            if isinstance(sub, torch.nn.Linear) and sub.out_features in {1, count}:
                found.add(f"{name}.{child}" if name else child)
    return found


def language_linears(model: torch.nn.Module, spec: FamilySpec) -> list[str]:
    """LoRA's default targets: every linear layer of the language model, found from the module tree
    (attention, MLP, linear-attention, shared experts: whatever the blocks hold), except the output layer
    and MoE routers."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = router_modules(model)
    return [
        name
        for name in linear_modules(model, spec, "language_model")
        if name not in skip and model.get_submodule(name) is not output
    ]


def _exact(names: list[str]) -> str:
    return rf"^(?:{'|'.join(re.escape(n) for n in names)})$"


def names_regex(model: torch.nn.Module, names: list[str]) -> str:
    """A PEFT regex matching exactly the modules `names`: layer indices generalised where that matches no
    other module (one alternative per kind of layer, not per layer), else the names themselves."""
    kinds = list(dict.fromkeys(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names))
    pattern = rf"^(?:{'|'.join(kinds)})$"
    matched = {n for n, _ in model.named_modules() if re.fullmatch(pattern, n)}
    return pattern if matched == set(names) else _exact(names)


def language_lora_targets(model: torch.nn.Module, spec: FamilySpec) -> str:
    """A PEFT regex matching every linear layer of the language model (see `language_linears`)."""
    names = language_linears(model, spec)
    if not names:
        raise UsageError(
            f"found no linear layers in the language model (keys {', '.join(spec.language_keys)}); "
            "pass --lora_target_modules"
        )
    return names_regex(model, names)


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


def expert_parameters(model: torch.nn.Module, spec: FamilySpec) -> list[str]:
    """The routed experts' fused weights of the language model: parameters of 3 or more dimensions
    (experts x out x in) held by a module that is not a convolution (Qwen3.5's linear attention has a 3-D
    conv1d weight), which `target_modules` cannot reach and PEFT's `target_parameters` adapts (one LoRA
    per parameter, shared across its experts)."""
    return [
        f"{owner}.{leaf}" if owner else leaf
        for owner, module in model.named_modules()
        if not isinstance(module, torch.nn.modules.conv._ConvNd)
        for leaf, param in module.named_parameters(recurse=False)
        if param.dim() >= 3 and part_of(f"{owner}.{leaf}", spec) == "language_model"
    ]


def expert_lora_targets(model: torch.nn.Module, spec: FamilySpec, kind: str) -> list[str]:
    """`--lora_target_experts`: the experts' fused parameters for PEFT's `target_parameters`, or a
    `UsageError` where the model has none or the adapter kind cannot adapt them."""
    names = expert_parameters(model, spec)
    if not names:
        raise UsageError(
            f"--lora_target_experts: {spec.model_type} has no routed experts stored as fused 3-D parameters; "
            "drop the flag (its linear experts, if any, are adapted by default)"
        )
    if kind == "dora":
        raise UsageError(
            "--lora_target_experts: PEFT adapts fused expert parameters with LoRA only; use --finetuning_type lora"
        )
    return names


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
    family: Mapping | None = None,
    processing: tuple | None = None,
    **kwargs,
) -> Loaded:
    """Load model, processor and family spec; the processor comes from the same folder unless
    `processor_path` names another (an adapter's folder, which holds the processor it was trained with).
    `family`: the facts of a `--family_file` (`config.family.read_family_file`), replacing derived ones.
    `processing`: the (processor, spec) `load_processing` already gave for these arguments, not derived again.

    With `load_in_4bit` / `load_in_8bit` the language model is quantised with bitsandbytes (QLoRA);
    the vision tower stays in full precision unless `quantize_vision_tower`.
    """
    processor, spec = processing or load_processing(model_name_or_path, processor_path, trust_remote_code, family)
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
    # Generation stops where the template ends an assistant turn, even where the checkpoint's generation
    # config names only the tokenizer's EOS (evaluation, predict and grpo's samples would run past it).
    stop_at_end_of_turn(model, end_of_turn_ids(processor, spec.encoding))
    return Loaded(model=model, processor=processor, spec=spec)


def load_processing(
    model_name_or_path: str,
    processor_path: str | None = None,
    trust_remote_code: bool = False,
    family: Mapping | None = None,
) -> tuple[object, FamilySpec]:
    """The checkpoint's processor (with a chat template) and family spec (its registry entry, or facts
    derived from config, processor and a weightless model; `family`, a family file's facts, replacing
    those it states and its `chat_template` the processor's), without loading weights."""
    config = read_config(model_name_or_path, trust_remote_code)
    with model_errors(processor_path or model_name_or_path, "--adapter" if processor_path else "--model_name_or_path"):
        processor = load_processor(processor_path or model_name_or_path, trust_remote_code=trust_remote_code)
    processor = with_chat_template(processor, default_chat_template(config.model_type))
    if family and "chat_template" in family:
        processor.chat_template = family["chat_template"]
    with model_errors(model_name_or_path):  # (a weightless model is built: its tower may need a library, timm)
        return processor, family_for(config, processor, model_name_or_path, given=family)


def read_config(model_name_or_path: str, trust_remote_code: bool = False):
    """The checkpoint's config, read after its local files are checked; a model that takes no images is
    refused here, before any weights load."""
    check_model_path(model_name_or_path)
    with model_errors(model_name_or_path):
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    check_vision_language(config, model_name_or_path)
    return config


def with_chat_template(processor, default: str | None):
    """Give a processor whose checkpoint ships no chat template the family's default one."""
    if getattr(processor, "chat_template", None) is None and default:
        processor.chat_template = default
    return processor


def load_for_inference(model_name_or_path: str | None, adapter: str | None = None, **kwargs) -> Loaded:
    """Base model plus an optional adapter; the adapter folder's processor (and base path) win."""
    if adapter:
        model_name_or_path = check_adapter_fits(adapter, model_name_or_path, kwargs.get("trust_remote_code", False))
    loaded = load_model(model_name_or_path, processor_path=processor_source(adapter), **kwargs)
    if adapter:
        with model_errors(adapter, "--adapter"):
            loaded.model = PeftModel.from_pretrained(loaded.model, adapter)
    loaded.model.eval()
    return loaded


def check_adapter_fits(
    adapter: str, model_name_or_path: str | None, trust_remote_code: bool = False, flag: str = "--adapter"
) -> str:
    """Refuse, before any weights load, a damaged adapter folder or one trained on another kind of model;
    return the base model to load it on (the one the adapter records when none is given)."""
    check_adapter_path(adapter, flag)
    model_name_or_path = model_name_or_path or adapter_base_path(adapter)
    config = read_config(model_name_or_path, trust_remote_code)
    check_adapter_base(adapter, model_name_or_path, config.model_type, flag)
    return model_name_or_path


def processor_source(adapter: str | None) -> str | None:
    """The adapter folder when it holds the processor it was trained with (vlmtune saves it there), else None
    (the base model's processor)."""
    names = ("processor_config.json", "tokenizer_config.json")
    return adapter if adapter and any((Path(adapter) / name).exists() for name in names) else None


def adapter_base_path(adapter: str) -> str:
    """The base model an adapter was trained on, as PEFT recorded it."""
    recorded, _ = adapter_base(adapter)
    if not recorded:
        raise ModelError(
            f"--adapter {adapter}: its adapter_config.json records no base_model_name_or_path; pass the base "
            "model it was trained on as --model_name_or_path"
        )
    return recorded


FINETUNING_TYPES = ("lora", "dora", "full")


def apply_finetuning(
    model: PreTrainedModel, spec: FamilySpec, args, resume_adapter: str | None = None
) -> PreTrainedModel:
    """Freeze parts and add LoRA / DoRA as `args` (FinetuneArguments) asks; return the model to train.

    With `resume_adapter` (`--adapter_name_or_path`), training continues that adapter: PEFT loads it
    trainable, with its own rank, targets and saved modules (the --lora_* flags do not apply)."""
    kind = args.finetuning_type
    if kind not in FINETUNING_TYPES:
        raise UsageError(f"--finetuning_type must be one of {', '.join(FINETUNING_TYPES)}, got {kind!r}")
    if resume_adapter and kind == "full":
        raise UsageError(
            "--adapter_name_or_path continues training a LoRA adapter, which --finetuning_type full does not "
            "train: drop one of them (to fine-tune a merged model fully, `vlmtune merge` it first)"
        )
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
    if resume_adapter:
        logger.info("Continuing to train the adapter in %s (its own LoRA settings apply).", resume_adapter)
        with model_errors(resume_adapter, "--adapter_name_or_path"):
            return PeftModel.from_pretrained(model, resume_adapter, is_trainable=True)
    # Unfrozen non-LoRA parts (a projector being trained) are saved with the adapter.
    module_names = {name for name, _ in model.named_modules()}
    modules_to_save = [] if frozen["projector"] else [k for k in spec.projector_keys if k in module_names]
    targets = resolve_targets(model, spec, args.lora_target_modules, vision=train_vision_lora)
    experts = expert_lora_targets(model, spec, kind) if args.lora_target_experts else None

    def lora(target_modules) -> LoraConfig:
        return LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            use_rslora=getattr(args, "use_rslora", False),
            use_dora=kind == "dora",
            target_modules=target_modules,
            target_parameters=experts,
            modules_to_save=modules_to_save or None,
            task_type="CAUSAL_LM",
        )

    if not isinstance(targets, str):  # the user's leaf names, passed to PEFT as they are
        return get_peft_model(model, lora(targets))
    wanted = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(targets, n)}
    tuned = get_peft_model(model, lora(targets))
    rewritten = _rewritten_by_peft(tuned, wanted)
    if not rewritten:
        return tuned
    keep = sorted(n for n in wanted if n.rsplit(".", 1)[-1] not in rewritten)
    base = tuned.unload()
    return get_peft_model(base, lora(names_regex(base, keep)))


def _rewritten_by_peft(tuned: PeftModel, wanted: set[str]) -> set[str]:
    """The leaf names of `wanted` linears PEFT did not adapt, with a warning saying why. PEFT (0.21) rewrites a
    new adapter's targets on MoE architectures it converts from transformers 4's layout (GLM-4.5V's): every
    `gate_proj`/`up_proj`/`down_proj` becomes the routed experts' fused weights, dense and shared-expert MLPs
    included (huggingface/peft#3711), and it does the same when the adapter loads, so those layers cannot be
    adapted and reloaded in plain PEFT; they are left out instead of adapted where the user did not ask."""
    adapted = {n.removeprefix("base_model.model.") for n, m in tuned.named_modules() if hasattr(m, "lora_A")}
    missed = sorted(wanted - adapted)
    if not missed:
        return set()
    leaves = {n.rsplit(".", 1)[-1] for n in missed}
    logger.warning(
        "PEFT %s rewrites LoRA targets named %s of %s to its routed experts' fused weights "
        "(a conversion meant for adapters trained under transformers 4, also applied when an adapter loads; "
        "huggingface/peft#3711), so these %d linear layers are left out of LoRA: %s%s. Attention and the other "
        "layers are adapted; --lora_target_experts true adapts the routed experts.",
        peft_version,
        ", ".join(sorted(leaves)),
        getattr(tuned.config, "model_type", "this architecture"),
        len(missed),
        ", ".join(missed[:3]),
        ", ..." if len(missed) > 3 else "",
    )
    return leaves


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
