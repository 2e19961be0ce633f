"""Shrinking any transformers config to a tiny one, generically: the sizes every architecture names alike.

An architecture with no tiny recipe (`tiny/generic.py`) starts from its default config
(`CONFIG_MAPPING[model_type]()`, the size of a real checkpoint) and every config inside it (text, vision,
projector, audio...) is walked: fields with the usual names (hidden sizes, layer counts, heads, expert
counts) get tiny values, chosen so they stay consistent with each other (heads
times head_dim is the hidden size; a layer-type list is cut to the layer count). Field names are data
here, so a new architecture that names its sizes the usual way shrinks without code. Image geometry (image
and patch sizes) stays the default: processors compute image token counts from their own settings, and
a narrow two-layer tower is cheap even on a checkpoint's full image size.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .common import HEAD_DIM, HIDDEN, INIT_RANGE, NUM_HEADS

LAYERS = 2

# Field -> its tiny value, wherever it occurs in a config tree (only where it is an int already).
SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "hidden_dim", "width"), HIDDEN),
    **dict.fromkeys(("out_hidden_size", "projection_dim", "text_hidden_size", "vision_hidden_size"), HIDDEN),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "mlp_dim", "encoder_ffn_dim", "decoder_ffn_dim"), 2 * HIDDEN),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "depth", "n_layer", "n_layers", "encoder_layers"), LAYERS),
    **dict.fromkeys(("decoder_layers", "vision_layers", "text_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "num_heads", "n_head", "n_heads", "encoder_attention_heads"), NUM_HEADS),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads"), 2),
    **dict.fromkeys(("head_dim", "qk_nope_head_dim", "v_head_dim", "qk_head_dim"), HEAD_DIM),
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank", "index_head_dim", "base_channels"), 32),
    **dict.fromkeys(("qk_rope_head_dim",), HEAD_DIM // 2),
    **dict.fromkeys(("linear_head_dim", "linear_key_head_dim", "linear_value_head_dim"), HEAD_DIM),
    **dict.fromkeys(("index_n_heads", "linear_num_heads", "linear_num_value_heads"), NUM_HEADS),
    **dict.fromkeys(("linear_num_key_heads",), 2),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_k", "top_k", "num_experts_per_token"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts"), 1),
    **dict.fromkeys(("initializer_range",), INIT_RANGE),
    **dict.fromkeys(("max_position_embeddings",), 2048),
}
# Fields that list one entry per layer: cut to the tiny layer count.
PER_LAYER = ("layer_types", "mlp_layer_types", "block_types", "layers_block_type", "activation_sparsity_pattern")
# Fields that index layers (which layers feed the projector, take full attention...): kept inside the stack.
LAYER_INDICES = (
    "fullatt_block_indexes",
    "deepstack_visual_indexes",
    "vision_feature_layers",
    "vision_feature_layer",
    "intermediate_layers_indices",
)


def _cut_indices(value, layers: int):
    if isinstance(value, int):
        return value if -layers <= value < layers else -1
    if isinstance(value, (list, tuple)):  # VipLLaVA's five layers are a tuple
        kept = [i for i in value if isinstance(i, int) and -layers <= i < layers]
        return type(value)(kept or [layers - 1])
    return value


def shrink(config: PretrainedConfig, overrides: dict | None = None) -> PretrainedConfig:
    """Shrink `config` and every config inside it in place (see the module docstring); `overrides` maps a
    dotted field path (``"vision_config.patch_size"``) to the value an architecture needs instead."""
    for sub in _configs(config):
        multi_head = _int_field(sub, "num_key_value_heads") == _int_field(sub, "num_attention_heads") is not None
        rope_head = _int_field(sub, "head_dim") == _int_field(sub, "qk_rope_head_dim") is not None  # MLA's rotary size
        for name, tiny in SIZES.items():
            value = getattr(sub, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:  # 0: "derive it", kept
                setattr(sub, name, tiny)
            elif isinstance(getattr(sub, name, None), float) and name == "initializer_range":
                setattr(sub, name, tiny)
        if multi_head:  # as many key-value heads as heads (MLA's GLM-5): kept so, not grouped
            sub.num_key_value_heads = sub.num_attention_heads
        if rope_head:  # DeepSeek-style MLA sizes its rotary by head_dim = qk_rope_head_dim (Mistral Large 3/4)
            sub.head_dim = sub.qk_rope_head_dim
        if "head_dim" in vars(sub) and sub.head_dim is None:  # HunYuan-VL's default: None, read as a size
            sub.head_dim = HEAD_DIM  # = HIDDEN // NUM_HEADS, what "derive it" would give
        layers = next(
            (getattr(sub, n) for n in ("num_hidden_layers", "num_layers", "depth") if hasattr(sub, n)), LAYERS
        )
        for name in PER_LAYER:
            value = getattr(sub, name, None)
            if isinstance(value, list) and len(value) > layers:
                setattr(sub, name, _shortened(value, layers))
        for name, tiny in SIZES.items():  # a size given per layer (Gemma 3n's intermediate_size): one per tiny layer
            value = getattr(sub, name, None)
            if isinstance(value, list) and len(value) > layers and all(isinstance(v, int) for v in value):
                setattr(sub, name, [tiny] * layers)
        for name in LAYER_INDICES:
            if hasattr(sub, name):
                setattr(sub, name, _cut_indices(getattr(sub, name), layers))
        _fit_mrope(sub)
    for path, value in (overrides or {}).items():
        *parents, leaf = path.split(".")
        target = config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, leaf, value)
    return config


def _int_field(config: PretrainedConfig, name: str) -> int | None:
    value = vars(config).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _fit_mrope(config: PretrainedConfig) -> None:
    """Multimodal rotary sections that sum to the tiny head's rotary half, for a config that validates
    `mrope_section` (transformers' own flag for it), where the modeling code's default would not fit."""
    rope = getattr(config, "rope_parameters", None)
    if "mrope_section" not in getattr(config, "ignore_keys_at_rope_validation", ()) or not isinstance(rope, dict):
        return
    if rope and all(isinstance(v, dict) for v in rope.values()):  # one per layer type (Cohere's)
        config.rope_parameters = {kind: _mrope(config, params) for kind, params in rope.items()}
    elif "rope_type" in rope:
        config.rope_parameters = _mrope(config, rope)


def _mrope(config: PretrainedConfig, rope: dict) -> dict:
    """`rope` with sections summing to the rotary half: a stated split keeps which sections are equal
    (HunYuan's 12/10/10: 4/2/2); else two equal sections first and the rest last (3/3/2), which fits both
    Qwen's (time, height, width: any split) and ERNIE's (height, width, time: height = width)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    half = int(head_dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))) // 2
    stated = rope.get("mrope_section")
    if isinstance(stated, list) and len(stated) == 3 and len(set(stated)) == 2:
        pair = next(v for v in stated if stated.count(v) == 2)
        each = max(1, pair * half // sum(stated))
        sections = [each if v == pair else half - 2 * each for v in stated]
    else:
        each = (3 * half + 7) // 8
        sections = [each, each, half - 2 * each]
    return {**rope, "mrope_section": sections}


def _shortened(value: list, layers: int) -> list:
    """The first `layers` entries, keeping every kind of layer the full list has (a hybrid model's
    linear-attention layers must stay in the tiny one); with more kinds than layers, the first kinds
    (LFM3's convolution and full attention, not two convolutions: its cache needs an attention layer)."""
    kinds = list(dict.fromkeys(value))
    if len(kinds) <= layers:
        head = value[:layers]
        missing = [k for k in kinds if k not in head]
        return head[: layers - len(missing)] + missing
    return kinds[:layers]


def _configs(config: PretrainedConfig) -> list[PretrainedConfig]:
    """`config` and every config nested in it, depth first."""
    found = [config]
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            found += _configs(value)
    return found
