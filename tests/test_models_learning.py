"""Fine-tuning really learns, for several architectures: held-out accuracy far above chance."""

from __future__ import annotations

import pytest

from tests.helpers import train_args
from vlmtune.models.tiny import LEARNING_GAPS
from vlmtune.train.run import run_training

# GLM-4.5V's LoRA is attention-only while PEFT rewrites its MLP targets (huggingface/peft#3711): below the bar.
GLM4V_MOE = pytest.param("glm4v_moe", {}, marks=pytest.mark.xfail(strict=True, reason=LEARNING_GAPS["glm4v_moe"]))


# Four different routes from image to answer: a projector into the prompt (LLaVA with SigLIP), pooled
# soft tokens with bidirectional image attention (Gemma 3), cross-attention (Mllama), and a prefix-LM
# trained through its own encoding hook (PaliGemma); and derived families on their real templates: a
# thinking template with a hybrid linear-attention language model (Qwen3.5), a mixture of experts without
# shared experts, whose MLPs LoRA reaches only through --lora_target_experts (Qwen3-VL-MoE), and Gemma 4
# (thinking channel, per-layer input embeddings, pooled vision tower); Mistral 3 (Pixtral tower, 2-D rotary
# image positions, patch-merging projector) on Mistral Small 3.1's template; InternVL (image tiles, pixel
# shuffle) on its -hf checkpoints' template; GLM-4.1V (Qwen2-VL-like tower, partial multimodal rotary
# positions, fused gate_up_proj) on its own template; LLaVA-OneVision (anyres crops of a SigLIP tower, a Qwen2
# language model) on its llava-hf template; Idefics2 (a perceiver resampler) on its own template. Qwen2-VL's
# run is in test_train.py.
@pytest.mark.parametrize(
    ("family", "settings"),
    [
        *[(family, {}) for family in ("mllama", "qwen3_5", "glm4v", "llava_onevision", "idefics2")],
        # No more steps than needed: 95-100% held out at these counts on seeds 0-2 (Mistral 3 scores 77-80% at
        # 120 steps; Gemma 4 and it have the slowest steps).
        *[(family, {"max_steps": 120}) for family in ("llava_siglip", "gemma3", "paligemma", "internvl")],
        ("mistral3", {"max_steps": 160}),
        ("gemma4", {"max_steps": 80}),
        ("qwen3_vl_moe", {"lora_target_experts": True}),
        GLM4V_MOE,
    ],
)
def test_lora_learns_the_colour_from_the_image(family, settings, tiny_model_dir, shapes_data, tmp_path):
    args = train_args(
        tiny_model_dir(family),
        str(shapes_data["train"]),
        str(tmp_path / family),
        str(shapes_data["validation"]),
        **(dict(max_steps=200, per_device_train_batch_size=8, lr_scheduler_type="cosine", warmup_steps=10) | settings),
        max_new_tokens=8,
    )
    result = run_training(*args)
    # 6 colours: chance is 17%, and a model that ignores the image cannot beat it.
    assert result.metrics["eval_exact_match"] >= 0.8, result.metrics
