"""Loading a checkpoint's processor, also where its video half cannot be built.

Qwen2-VL, Qwen2.5-VL and SmolVLM processors insist on a video processor, and transformers' video
processors need torchvision. vlmtune trains on images, so when torchvision is missing we load the same
processor class with its video part left out. The subclass keeps the base class's name, so whatever it
saves still loads with `AutoProcessor` wherever torchvision is installed.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import transformers
from transformers import AutoProcessor, ProcessorMixin

logger = logging.getLogger(__name__)


@functools.cache
def image_only(processor_cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """Return a subclass of `processor_cls` that has no video processor.

    `ProcessorMixin` builds, validates, saves and loads exactly the parts `get_attributes` names, so
    leaving "video_processor" out of that list is all it takes.
    """
    attributes = [a for a in processor_cls.get_attributes() if a != "video_processor"]
    return type(
        processor_cls.__name__,
        (processor_cls,),
        {
            "get_attributes": classmethod(lambda cls: list(attributes)),
            "video_processor": None,
            "__module__": __name__,
        },
    )


def _processor_class_name(path: str) -> str | None:
    """Read the processor class a local checkpoint declares (None for hub ids we cannot read)."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = Path(path) / name
        if file.is_file():
            cls = json.loads(file.read_text()).get("processor_class")
            if cls:
                return cls
    return None


def load_processor(model_name_or_path: str, **kwargs) -> ProcessorMixin:
    """Load the checkpoint's processor with `AutoProcessor`, falling back to an image-only one."""
    try:
        return AutoProcessor.from_pretrained(model_name_or_path, **kwargs)
    except (ImportError, OSError, ValueError, TypeError) as err:
        cls_name = _processor_class_name(model_name_or_path)
        if cls_name is None:
            from transformers.models.auto.processing_auto import processor_class_from_name

            config = transformers.AutoConfig.from_pretrained(model_name_or_path, **kwargs)
            cls_name = transformers.models.auto.processing_auto.PROCESSOR_MAPPING_NAMES.get(config.model_type)
            if cls_name is None:
                raise
            cls = processor_class_from_name(cls_name)
        else:
            cls = getattr(transformers, cls_name, None)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        logger.info("Loading %s without its video processor (%s).", cls.__name__, err.__class__.__name__)
        return image_only(cls).from_pretrained(model_name_or_path, **kwargs)
