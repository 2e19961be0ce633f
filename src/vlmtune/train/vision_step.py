"""Every rank runs the vision tower every training step, even on a batch without images.

Under DeepSpeed ZeRO-3 and FSDP each weight is gathered from all ranks by collective calls made when a
module runs. A text-only batch skips the vision tower on its rank while the others run it, and the job
hangs (a known failure of other VLM trainers). Here a batch without pixels runs the vision tower and
projector on one small blank image, and adds the result times zero to the loss and logits: the same
modules run on every rank, and the loss, logits and gradients are those of the text-only batch.
"""

from __future__ import annotations

import inspect
import logging

import torch
from PIL import Image

logger = logging.getLogger(__name__)

BLANK_IMAGE_SIDE = 32  # processors resize it to their own input size


def _tensors(value) -> list[torch.Tensor]:
    """All floating tensors inside a model output (tensor, tuple/list, or ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def blank_vision_inputs(processor) -> dict[str, torch.Tensor]:
    """What the image processor makes of one blank image (pixel values, and grid/size tensors if any)."""
    image = Image.new("RGB", (BLANK_IMAGE_SIDE, BLANK_IMAGE_SIDE))
    out = processor.image_processor(images=[image], return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def vision_entry(model):
    """The callable that runs vision tower + projector: the model's `get_image_features` (transformers
    VLMs have one), else the inner model's."""
    for candidate in (model, getattr(model, "model", None)):
        fn = getattr(candidate, "get_image_features", None)
        if fn is not None:
            return fn
    return None


class VisionEveryStep:
    """Forward hook on a VLM: a training forward without `pixel_values` also runs the vision path."""

    def __init__(self, model, processor):
        self.entry = vision_entry(model)
        self.inputs = blank_vision_inputs(processor)
        accepted = inspect.signature(self.entry).parameters if self.entry else {}
        self.inputs = {k: v for k, v in self.inputs.items() if k in accepted}
        self.runs = 0  # blank-image runs, for the curious (and the tests)

    def zero_term(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """0 x (sum of the vision path's outputs on the blank image): a scalar tied to every vision weight."""
        inputs = {k: v.to(device) if k != "pixel_values" else v.to(device, dtype) for k, v in self.inputs.items()}
        outputs = _tensors(self.entry(**inputs))
        self.runs += 1
        return sum(t.float().sum() for t in outputs) * 0.0

    def __call__(self, module, args, kwargs, output):
        if not module.training or kwargs.get("pixel_values") is not None or self.entry is None:
            return output
        logits = getattr(output, "logits", None)
        if logits is None:
            return output
        zero = self.zero_term(logits.device, next(module.parameters()).dtype)
        output.logits = logits + zero.to(logits.dtype)
        if getattr(output, "loss", None) is not None:
            output.loss = output.loss + zero.to(output.loss.dtype)
        return output


def run_vision_every_step(model, processor) -> VisionEveryStep | None:
    """Install the hook on the transformers model inside `model` (PEFT-wrapped or not); None when the
    model exposes no `get_image_features` (the hook would have nothing to run)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hook = VisionEveryStep(base, processor)
    if hook.entry is None:
        logger.warning("%s has no get_image_features: text-only batches skip the vision tower.", type(base).__name__)
        return None
    base.register_forward_hook(hook, with_kwargs=True)
    return hook
