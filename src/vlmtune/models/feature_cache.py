"""`--cache_vision_features`: a frozen vision tower and projector run once per image, not once per epoch.

When neither the vision tower nor the projector trains, an image's features are a function of its pixels
(and the pixel settings the processor produced: grid, sizes) only. The cache wraps the multimodal model's
own `get_image_features` (the call its forward makes for the vision tower + projector), splits each call's
images apart, answers the images it has seen from memory and runs the original for the others, in one
batch. The model's forward is otherwise untouched: placeholders, positions, the language model and the
loss are computed as without the cache.

Keys: a BLAKE2 digest of each image's pixel tensor (bytes, shape, dtype), its per-image settings (e.g.
Qwen's `image_grid_thw` row, LLaVA-NeXT's `image_sizes` row) and the call's other arguments. Values: the
projected features, kept in host memory up to `--vision_cache_max_gb`; once full, new images are computed
every time (no eviction: under shuffling an LRU would evict what the next epoch needs).

Per-image splitting follows the transformers API, not the family: a `*_grid_thw` argument gives each
image's number of patch rows (Qwen2/2.5-VL); otherwise the first dimension of `pixel_values` is one
image each. A model whose features cannot be split so (Mllama's cross-attention states, Idefics3's
per-row images, Qwen3-VL's deepstack features) is refused with a message.
"""

from __future__ import annotations

import hashlib
import inspect
import logging

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import UsageError
from .loading import part_of, strip_peft_prefix
from .registry import FamilySpec

logger = logging.getLogger(__name__)

FLAG = "--cache_vision_features"
# Fields of a vision output the forward may use besides the per-image `pooler_output`: caching those is
# not supported (the forward would silently lose them).
_PLAIN_FIELDS = {"last_hidden_state", "pooler_output", "hidden_states", "attentions"}


def check_frozen(model: torch.nn.Module, spec: FamilySpec) -> None:
    """Refuse the cache when any vision tower or projector parameter trains (its features would go stale)."""
    for name, param in model.named_parameters():
        part = part_of(strip_peft_prefix(name).replace(".modules_to_save.default", ""), spec)
        if param.requires_grad and part in ("vision_tower", "projector"):
            raise UsageError(
                f"{FLAG} needs a frozen vision tower and projector, but {strip_peft_prefix(name)} ({part}) trains; "
                "drop --train_vision_lora, keep --freeze_vision_tower true and --freeze_projector true, or drop "
                f"{FLAG}"
            )


def feature_module(model: torch.nn.Module, spec: FamilySpec) -> torch.nn.Module:
    """The module whose forward merges image features into the text: the innermost one with a
    `get_image_features`, outside the vision tower and projector."""
    found = [
        module
        for name, module in model.named_modules()
        if callable(getattr(module, "get_image_features", None))
        and part_of(strip_peft_prefix(name), spec) not in ("vision_tower", "projector")
    ]
    if not found:
        raise UsageError(f"{FLAG}: this model has no get_image_features to cache; drop {FLAG}")
    return found[-1]


def _digest(hasher, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    hasher.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())


class VisionFeatureCache:
    """Per-image features of the wrapped `get_image_features`, computed once; `calls` counts images run."""

    def __init__(self, module: torch.nn.Module, max_bytes: int):
        self.original = module.get_image_features
        self.signature = inspect.signature(self.original)
        self.max_bytes = max_bytes
        self.features: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0
        module.get_image_features = self  # the forward calls self.get_image_features(...): now this

    @classmethod
    def attach(cls, model: torch.nn.Module, spec: FamilySpec, max_gb: float) -> VisionFeatureCache:
        check_frozen(model, spec)
        return cls(feature_module(model, spec), int(max_gb * 2**30))

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        named = dict(bound.arguments)
        named.update(named.pop("kwargs", {}) or {})
        pixel_values = named.pop("pixel_values", None)
        if not torch.is_tensor(pixel_values):
            raise UsageError(f"{FLAG}: this model's get_image_features takes no pixel_values tensor; drop {FLAG}")
        pieces, extras = self._split(pixel_values, named)
        common = hashlib.blake2b(repr(sorted((k, v) for k, v in named.items() if k not in extras)).encode()).digest()
        keys = [self._key(common, piece, [extras[k][i] for k in sorted(extras)]) for i, piece in enumerate(pieces)]
        missing = [i for i, key in enumerate(keys) if key not in self.features]
        computed = self._compute(pieces, extras, named, missing) if missing else {}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        device = pixel_values.device
        features = [computed[i] if i in computed else self.features[k].to(device) for i, k in enumerate(keys)]
        for i in missing:
            self._store(keys[i], computed[i])
        return BaseModelOutputWithPooling(pooler_output=tuple(features))

    @staticmethod
    def _split(pixel_values: torch.Tensor, named: dict) -> tuple[list[torch.Tensor], dict[str, list]]:
        """One pixel tensor per image, and the per-image rows of the arguments that have one."""
        grid = next((k for k in named if k.endswith("grid_thw") and torch.is_tensor(named[k])), None)
        if grid is not None:
            sizes = named[grid].prod(-1).tolist()
            return list(torch.split(pixel_values, sizes)), {grid: list(named[grid])}
        n = pixel_values.shape[0]
        extras = {k: list(v) for k, v in named.items() if torch.is_tensor(v) and v.dim() and v.shape[0] == n}
        return list(pixel_values), extras

    @staticmethod
    def _key(common: bytes, piece: torch.Tensor, rows: list) -> bytes:
        hasher = hashlib.blake2b(common, digest_size=20)
        for tensor in (piece, *rows):
            _digest(hasher, tensor if torch.is_tensor(tensor) else torch.as_tensor(tensor))
        return hasher.digest()

    def _compute(self, pieces, extras: dict, named: dict, missing: list[int]) -> dict[int, torch.Tensor]:
        """Run the original on the images not cached yet, in one batch; their features by index."""
        grid = any(k.endswith("grid_thw") for k in extras)
        stack = torch.cat if grid else torch.stack
        call = dict(named, pixel_values=stack([pieces[i] for i in missing]))
        for k, rows in extras.items():
            call[k] = torch.stack([rows[i] for i in missing])
        call["return_dict"] = True
        out = self.original(**call)
        unsupported = [k for k, v in out.items() if k not in _PLAIN_FIELDS and v is not None]
        features = out.pooler_output
        if unsupported or not isinstance(features, (list, tuple)) or len(features) != len(missing):
            raise UsageError(
                f"{FLAG}: this model's image features cannot be cached per image "
                f"({', '.join(unsupported) or 'they are not one tensor per image'}); drop {FLAG}"
            )
        return dict(zip(missing, features, strict=True))

    def _store(self, key: bytes, feature: torch.Tensor) -> None:
        size = feature.numel() * feature.element_size()
        if self.bytes + size > self.max_bytes:
            return
        self.features[key] = feature.detach().to("cpu")
        self.bytes += size
