"""FSDP: wrap each decoder block (and vision block) without the user naming their classes."""

from __future__ import annotations

import logging

from ..models.loading import decoder_layer_classes
from ..models.registry import FamilySpec

logger = logging.getLogger(__name__)


def default_fsdp_wrap(training_args, model, spec: FamilySpec) -> list[str] | None:
    """With FSDP's transformer-based auto wrap and no `transformer_layer_cls_to_wrap` given, wrap the
    family's decoder layer classes (read off the model) and its vision block class. Returns the classes
    set, or None when FSDP is off or the user chose."""
    if not training_args.fsdp or training_args.fsdp_config.get("transformer_layer_cls_to_wrap"):
        return None
    plugin = getattr(training_args, "fsdp_plugin_args", None) or {}
    if plugin.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP") != "TRANSFORMER_BASED_WRAP":
        return None
    classes = list(dict.fromkeys(decoder_layer_classes(model, spec)))  # one entry per class
    present = {type(m).__name__ for m in model.modules()}
    if spec.vision_layer in present:
        classes.append(spec.vision_layer)
    training_args.fsdp_config["transformer_layer_cls_to_wrap"] = classes
    if plugin:
        plugin["transformer_cls_names_to_wrap"] = ",".join(classes)
    logger.info("FSDP wraps %s (the %s blocks).", ", ".join(classes), spec.model_type)
    return classes
