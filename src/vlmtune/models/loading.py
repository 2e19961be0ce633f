"""Load a checkpoint, decide what trains, wrap it with PEFT.

Which parameters are vision tower, projector or language model comes from the family's registry entry;
LoRA's default targets are the language model's linear layers only, so the vision tower is never
adapted by accident.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel

from .processors import load_processor
from .registry import FamilySpec, get_family

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


def _strip_peft_prefix(name: str) -> str:
    """Parameter name as in the base model (PEFT adds ``base_model.model.`` and ``.base_layer``)."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def language_lora_targets(model: torch.nn.Module, spec: FamilySpec) -> str:
    """A PEFT regex matching the language model's linear layers (the decoder blocks', not lm_head)."""
    leaves = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and part_of(name, spec) == "language_model":
            leaf = name.rsplit(".", 1)[-1]
            if leaf in spec.lora_leaves:
                leaves.add(leaf)
    if not leaves:
        raise ValueError(
            f"found no linear layers named {', '.join(spec.lora_leaves)} in the language model; "
            "pass --lora_target_modules"
        )
    keys = "|".join(re.escape(k) for k in spec.language_keys if k != "lm_head")
    return rf"^(?:{keys})\..*\.(?:{'|'.join(sorted(leaves))})$"


def resolve_targets(model: torch.nn.Module, spec: FamilySpec, requested: list[str] | None) -> str | list[str]:
    """Turn --lora_target_modules into what PEFT takes: the default, one regex, or a list of names."""
    if not requested or requested == ["all-linear"]:
        return language_lora_targets(model, spec)
    if len(requested) == 1 and any(c in requested[0] for c in "\\^$*+?()[]|"):
        return requested[0]
    return list(requested)


def load_model(
    model_name_or_path: str,
    dtype: torch.dtype | str = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    **kwargs,
) -> Loaded:
    """Load model, processor and family spec; the processor comes from the same folder."""
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    spec = get_family(config.model_type)
    processor = load_processor(model_name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        model_name_or_path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    return Loaded(model=model, processor=processor, spec=spec)


def load_for_inference(model_name_or_path: str | None, adapter: str | None = None, **kwargs) -> Loaded:
    """Base model plus an optional adapter; the adapter folder's processor (and base path) win."""
    if adapter and not model_name_or_path:
        model_name_or_path = adapter_base_path(adapter)
    loaded = load_model(model_name_or_path, **kwargs)
    if adapter:
        if (Path(adapter) / "processor_config.json").exists() or (Path(adapter) / "tokenizer_config.json").exists():
            loaded.processor = load_processor(adapter)
        loaded.model = PeftModel.from_pretrained(loaded.model, adapter)
    loaded.model.eval()
    return loaded


def adapter_base_path(adapter: str) -> str:
    """The base model an adapter was trained on, as PEFT recorded it."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return config["base_model_name_or_path"]


def apply_finetuning(model: PreTrainedModel, spec: FamilySpec, args) -> PreTrainedModel:
    """Freeze parts and add LoRA as `args` (FinetuneArguments) asks; return the model to train."""
    kind = args.finetuning_type
    if kind not in ("lora", "full"):
        raise ValueError(f"--finetuning_type must be lora or full, got {kind!r}")
    freeze_projector = args.freeze_projector if args.freeze_projector is not None else kind == "lora"
    frozen = {
        "vision_tower": args.freeze_vision_tower,
        "projector": freeze_projector,
        "language_model": args.freeze_language_model or kind == "lora",
        "other": kind == "lora",
    }
    for name, param in model.named_parameters():
        param.requires_grad = not frozen[part_of(name, spec)]
    if kind == "full":
        return model
    # Unfrozen non-LoRA parts (a projector being trained) are saved with the adapter.
    module_names = {name for name, _ in model.named_modules()}
    modules_to_save = [] if frozen["projector"] else [k for k in spec.projector_keys if k in module_names]
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=resolve_targets(model, spec, args.lora_target_modules),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def trainable_table(model: torch.nn.Module, spec: FamilySpec) -> str:
    """A table of trainable and total parameters per part, printed at the start of every run."""
    totals = {p: [0, 0] for p in PARTS}
    for name, param in model.named_parameters():
        counts = totals[part_of(_strip_peft_prefix(name), spec)]
        counts[1] += param.numel()
        if param.requires_grad:
            counts[0] += param.numel()
    lines = [f"{'part':<16}{'trainable':>14}{'total':>14}{'%':>8}"]
    for part in PARTS:
        trainable, total = totals[part]
        if total:
            lines.append(f"{part:<16}{trainable:>14,}{total:>14,}{100 * trainable / total:>7.2f}%")
    return "\n".join(lines)
