"""Loading a checkpoint's processor, also where its video half cannot be built.

Qwen2-VL, Qwen2.5-VL and SmolVLM processors insist on a video processor, and transformers' video
processors need torchvision. vlmtune trains on images, so when torchvision is missing we load the same
processor class with its video part left out. The subclass keeps the base class's name and also saves
its image processor as `preprocessor_config.json` (as the hub checkpoints of these families do), from which
`AutoProcessor` builds the video processor wherever torchvision is installed.

Pixtral's processor (Mistral 3's) needs no torchvision to process images, but its module imports one
size helper from the torchvision image processor's module, so transformers marks the whole class as
torchvision-only. `torchvision_free` imports the same class with that helper taken from the PIL image
processor's module, which defines it identically.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import sys
import types
from pathlib import Path

import transformers
from transformers import AutoProcessor, ProcessorMixin
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

logger = logging.getLogger(__name__)


class _NoVideoProcessor:
    """Stands in for the missing video processor where a processor reads its settings (SmolVLM's chat
    template reads ``num_frames`` and ``fps``, MiniCPM-V 4.6's `__init__` ``slice_mode`` and
    ``downsample_mode``): every setting reads as None; there are never videos to process."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __bool__(self) -> bool:
        return False


class _DropsVideoProcessor(ProcessorMixin):
    """Sits between a processor class and `ProcessorMixin` in an image-only subclass's method order: a
    processor whose `__init__` passes ``video_processor=`` on to `ProcessorMixin.__init__` (Gemma 4's
    does, even when it is None) would be refused there, since it is no longer one of the attributes; one
    that passes its parts positionally (Video-LLaVA's: image processor, video processor, tokenizer) would
    shift the tokenizer into the video processor's place."""

    _with_video: tuple[str, ...] = ()  # the processor class's own attributes, video processor included

    def __init__(self, *args, **kwargs):
        kwargs.pop("video_processor", None)
        if len(args) > len(self.get_attributes()) and "video_processor" in self._with_video:
            at = self._with_video.index("video_processor")
            args = args[:at] + args[at + 1 :]
        super().__init__(*args, **kwargs)


@functools.cache
def image_only(processor_cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """Return a subclass of `processor_cls` that has no video processor.

    `ProcessorMixin` builds, validates, saves and loads exactly the parts `get_attributes` names, so
    leaving "video_processor" out of that list does most of it. Where the processor's `__init__`
    requires the video processor (SmolVLM's) it defaults to None; where it hands the argument on to
    `ProcessorMixin` (Gemma 4's) it is dropped on the way; and where the processor reads video settings
    outside videos (SmolVLM's chat template) a stand-in answers.
    """
    attributes = [a for a in processor_cls.get_attributes() if a != "video_processor"]
    namespace = {
        "get_attributes": classmethod(lambda cls: list(attributes)),
        "_with_video": tuple(processor_cls.get_attributes()),
        "video_processor": _NoVideoProcessor(),
        "__module__": __name__,
    }
    namespace["save_pretrained"] = _save_with_image_processor_config(processor_cls.save_pretrained)
    order = [n for n in inspect.signature(processor_cls.__init__).parameters if n in {*attributes, "video_processor"}]
    if order[: len(attributes)] != attributes:  # the video processor sits between the parts `from_pretrained` passes
        namespace["from_args_and_dict"] = classmethod(_in_init_order(processor_cls.from_args_and_dict.__func__, order))
    init = _video_optional_init(processor_cls.__init__)
    if init is not None:
        namespace["__init__"] = init
    return type(processor_cls.__name__, (processor_cls, _DropsVideoProcessor), namespace)


def _save_with_image_processor_config(save):
    """`save_pretrained` that also writes `preprocessor_config.json`: without it, `AutoProcessor` finds no
    settings for the video processor and cannot load the folder even where torchvision is installed."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = save(self, save_directory, *args, **kwargs)
        if not (Path(save_directory) / "preprocessor_config.json").exists():
            self.image_processor.save_pretrained(save_directory)
        return result

    return save_pretrained


def _in_init_order(from_args_and_dict, order: list[str]):
    """`from_args_and_dict` passing the loaded parts in the `__init__`'s order, None in the video
    processor's place: `from_pretrained` passes them in the attributes' order, which without the video
    processor no longer matches an `__init__` that names it between the others (Video-LLaVA's)."""

    def in_order(cls, args, processor_dict, **kwargs):
        named = dict(zip(cls.get_attributes(), args))
        return from_args_and_dict(cls, [named.get(name) for name in order], processor_dict, **kwargs)

    return in_order


def _video_optional_init(init):
    """`init` with its required ``video_processor`` argument defaulting to None (SmolVLM's), else None.

    A copy of the same function with one more default, not a wrapper: `from_pretrained` reads the
    argument names off ``__init__.__code__``. `ProcessorMixin` then ignores the None, since
    ``video_processor`` is not among the subclass's attributes.
    """
    params = list(inspect.signature(init).parameters.values())
    names = [p.name for p in params]
    if "video_processor" not in names or params[names.index("video_processor")].default is not inspect.Parameter.empty:
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    tail = positional[[p.name for p in positional].index("video_processor") :]
    if any(p.default is inspect.Parameter.empty for p in tail[1:]):
        return None
    defaults = (None, *(p.default for p in tail[1:]))
    copy = types.FunctionType(init.__code__, init.__globals__, init.__name__, defaults, init.__closure__)
    copy.__kwdefaults__ = init.__kwdefaults__
    copy.__doc__, copy.__qualname__ = init.__doc__, init.__qualname__
    return copy


# Processor class -> (its module, the torchvision-only module it imports a helper from, the PIL image
# processor's module that defines the same helper), under transformers.models.
_TORCHVISION_HELPERS = {
    "PixtralProcessor": (
        "pixtral.processing_pixtral",
        "pixtral.image_processing_pixtral",
        "pixtral.image_processing_pil_pixtral",
    ),
}


@functools.cache
def torchvision_free(cls_name: str) -> type[ProcessorMixin] | None:
    """The real processor class `cls_name` of `_TORCHVISION_HELPERS`, importable without torchvision (None
    for other classes). The PIL module stands in for the torchvision one only while the processor's module
    is imported, so nothing else sees the substitute."""
    if cls_name not in _TORCHVISION_HELPERS:
        return None
    module, helper, pil = (f"transformers.models.{name}" for name in _TORCHVISION_HELPERS[cls_name])
    try:
        return getattr(importlib.import_module(module), cls_name)
    except ImportError:
        pass
    sys.modules[helper] = importlib.import_module(pil)
    try:
        return getattr(importlib.import_module(module), cls_name)
    finally:
        del sys.modules[helper]


def image_processor_names(model_type: str, processor_class: str | None) -> dict[str, str]:
    """The image processor classes by backend; a type without its own entry shares its processor's."""
    if model_type in IMAGE_PROCESSOR_MAPPING_NAMES:
        return IMAGE_PROCESSOR_MAPPING_NAMES[model_type]
    for other, name in PROCESSOR_MAPPING_NAMES.items():
        if name == processor_class and other in IMAGE_PROCESSOR_MAPPING_NAMES:
            return IMAGE_PROCESSOR_MAPPING_NAMES[other]
    return {}


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
    """Load the checkpoint's processor with `AutoProcessor`, falling back to a torchvision-free or an
    image-only one."""
    try:
        return AutoProcessor.from_pretrained(model_name_or_path, **kwargs)
    except (ImportError, OSError, ValueError, TypeError) as err:
        declared = _processor_class_name(model_name_or_path)
        cls_name = declared
        if cls_name is None:
            config = transformers.AutoConfig.from_pretrained(model_name_or_path, **kwargs)
            cls_name = transformers.models.auto.processing_auto.PROCESSOR_MAPPING_NAMES.get(config.model_type)
            if cls_name is None:
                raise
        if torchvision_free(cls_name) is not None:
            logger.info("Loading %s without torchvision (%s).", cls_name, err.__class__.__name__)
            return torchvision_free(cls_name).from_pretrained(model_name_or_path, **kwargs)
        if declared is None:
            from transformers.models.auto.processing_auto import processor_class_from_name

            cls = processor_class_from_name(cls_name)
        else:
            cls = getattr(transformers, cls_name, None)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        logger.info("Loading %s without its video processor (%s).", cls.__name__, err.__class__.__name__)
        return image_only(cls).from_pretrained(model_name_or_path, **kwargs)
