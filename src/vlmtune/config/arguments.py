"""The arguments of vlmtune's commands, as dataclasses: one definition serves `--flags`, YAML and JSON
files and `--help` (parsed by `parser.py`, their values checked by `checks.py`).

Every `transformers.TrainingArguments` field passes through by name; vlmtune's own fields are grouped
ahead of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from .. import compat
from .family import read_family_file


def arg(default, help: str, **kwargs):  # noqa: A002 - argparse's own word
    """A dataclass field with its `--help` text (default_factory given: `default` is ignored)."""
    if "default_factory" in kwargs:
        return field(metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


FAMILY_FILE_HELP = (
    "YAML/JSON file of the facts vlmtune cannot derive for an unregistered architecture (image_token, "
    "turn_end, chat_template, module prefixes...): what it states replaces derivation (docs/models.md)."
)


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str = arg(
        None, "Base model: a local folder or a Hugging Face hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)."
    )
    adapter_name_or_path: str | None = arg(
        None, "A PEFT adapter to load on top of the base model (inference, or to continue training)."
    )
    attn_implementation: str = arg(
        "sdpa", "Attention kernel: sdpa (default), eager, or flash_attention_2 (GPU, if installed)."
    )
    trust_remote_code: bool = arg(False, "Allow model code from the hub checkpoint.")
    model_type: str | None = arg(
        None, "Architecture the checkpoint must be (llava, qwen2_vl...): checked, never needed (read from config.json)."
    )
    family_file: str | None = arg(None, FAMILY_FILE_HELP)

    def family(self) -> dict | None:
        """The facts of --family_file, checked (None without one)."""
        return read_family_file(self.family_file)


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset_name: str = arg(
        None, "Training data: a CSV/TSV/JSON/JSONL/Parquet file, a folder of them, a save_to_disk folder, or a hub id."
    )
    eval_dataset_name: str | None = arg(None, "Separate evaluation data (same forms as --dataset_name).")
    dataset_config: str | None = arg(None, "Hub dataset configuration name.")
    image_column: str | None = arg(
        None, "Column with the image(s); detected if omitted (image_path, image, images...)."
    )
    prompt_column: str | None = arg(None, "Column with the prompt; detected if omitted (prompt, question, query...).")
    response_column: str | None = arg(None, "Column with the answer; detected if omitted (response, answer, label...).")
    dataset_text_field: str | None = arg(None, "Column with OpenAI-style `messages` (role + content parts).")
    dataset_image_field: str | None = arg(None, "Column with the images for --dataset_text_field (one or a list).")
    image_root: str | None = arg(
        None, "Folder that relative image paths are resolved against (default: the data file's folder)."
    )
    image_max_pixels: int | None = arg(
        None, "Shrink larger images (aspect kept) to at most this many pixels before the processor."
    )
    image_min_pixels: int | None = arg(None, "Enlarge smaller images (aspect kept) to at least this many pixels.")
    system_prompt: str | None = arg(None, "System message added to every conversation that has none.")
    train_on_prompt: bool = arg(False, "Also train on prompt tokens (default: assistant turns only).")
    max_train_samples: int | None = arg(None, "Use at most this many training rows.")
    max_eval_samples: int | None = arg(None, "Use at most this many evaluation rows.")
    val_split_ratio: float = arg(0.1, "Held-out fraction (seeded) when the data has no validation split; 0 disables.")
    test_dataset_name: str | None = arg(None, "Separate test data (same forms as --dataset_name).")
    train_split: str | None = arg(None, "Split to train on when the data has several (default: train).")
    eval_split: str | None = arg(None, "Split to evaluate on (default: validation/val/valid/dev/eval).")
    test_split: str | None = arg(None, "Split to test on (default: test).")
    streaming: bool = arg(False, "Read the data as a stream (larger than memory); needs --max_steps.")
    stream_buffer_size: int = arg(1000, "Shuffle buffer (rows) when streaming.")
    max_seq_length: int | None = arg(
        None, "Longest sample in tokens: longer ones lose prompt text from the start, or are skipped; images never cut."
    )
    on_bad_sample: str = arg(
        "error", "error: stop at the first bad sample (file, row, reason); skip: drop bad samples and report them."
    )
    context_file: str | None = arg(None, "CSV of external knowledge joined into each prompt as a 'Context:' line.")
    context_join_on: str | None = arg(
        None, "Key for --context_file: a column both share, or data_column=csv_column (e.g. image=IMAGE_FILE)."
    )
    context_column: str | None = arg(None, "Column of --context_file with the text (detected if omitted).")
    packing: bool = arg(
        False,
        "Pack samples into rows of at most --max_seq_length tokens (needs it), never splitting one; each "
        "sample attends only to itself, with positions restarting per sample (unlike LLaMA-Factory's packing "
        "without neat_packing). --per_device_train_batch_size then counts packed rows. Training only; "
        "evaluation stays one sample per row (docs/packing.md).",
    )
    padding_free: bool = arg(
        False,
        "Join each training batch's samples into one row without padding (no plan, works with --streaming); "
        "each sample attends only to itself. Implied by --packing, whose rows are already padding-free.",
    )
    packing_strategy: str = arg(
        "best_fit",
        "How --packing fills rows: best_fit (longest samples first, each into the fullest row it fits; "
        "packs shuffled with --data_seed or --seed) or greedy (in data order, a new row when the next does not fit).",
    )


@dataclass
class FinetuneArguments:
    _argument_group_name = "fine-tuning"

    finetuning_type: str = arg("lora", "lora (default), dora (weight-decomposed LoRA) or full.")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int = arg(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = arg(
        0.0,
        "Dropout on the LoRA path (default 0: a dropout copies every adapted layer's input, which cost 20%% of "
        "the step time in bench/compare.py; 0.05 is a common regulariser for small data).",
    )
    lora_target_modules: list[str] | None = arg(
        None, "Modules to adapt: names, one regex, or all-linear (the language model's linear layers, the default)."
    )
    freeze_vision_tower: bool = arg(True, "Keep the vision encoder frozen (default on).")
    freeze_projector: bool | None = arg(
        None, "Freeze the vision-to-text projector (default: on for LoRA, off for full)."
    )
    freeze_language_model: bool = arg(False, "Freeze the language model (train only what else is unfrozen).")
    max_new_tokens: int = arg(32, "Longest generated answer when evaluating accuracy.")
    eval_accuracy: bool = arg(True, "After training, generate answers for the eval split and report exact match.")
    eval_metrics: list[str] | None = arg(
        None,
        "Generation metrics (exact_match, exact_match_raw, relaxed_accuracy, anls, token_f1, loss, or all) computed "
        "at every evaluation during training, logged as eval_<metric> (usable by --metric_for_best_model and "
        "early stopping), and after training (default after training: exact_match).",
    )
    eval_metrics_samples: int = arg(64, "Eval rows that --eval_metrics generates answers for at each evaluation.")
    use_rslora: bool = arg(False, "Rank-stabilised LoRA: scale the adapter by alpha / sqrt(r) instead of alpha / r.")
    train_vision_lora: bool = arg(False, "Also add LoRA to the vision tower's linear layers (its weights stay frozen).")
    lora_target_experts: bool = arg(
        False,
        "Mixture-of-experts models: also add LoRA to the routed experts' fused weights (PEFT target_parameters; "
        "off by default: the experts hold most of the weights and LoRA on them costs memory; docs/models.md).",
    )
    vision_lr: float | None = arg(
        None, "Learning rate of the vision tower's trainable parameters (default: --learning_rate)."
    )
    projector_lr: float | None = arg(
        None, "Learning rate of the projector's trainable parameters (default: --learning_rate)."
    )
    load_in_4bit: bool = arg(False, "QLoRA: load the language model in 4-bit NF4, double quantised (bitsandbytes).")
    load_in_8bit: bool = arg(False, "Load the language model in 8-bit (bitsandbytes) and train LoRA on top.")
    quantize_vision_tower: bool = arg(False, "With --load_in_4bit/8bit, quantise the vision tower too (default: kept).")
    early_stopping_patience: int | None = arg(
        None, "Stop after this many evaluations without improvement of --metric_for_best_model (default eval loss)."
    )
    early_stopping_patience_ratio: float | None = arg(
        None, "Patience as a fraction of the total training steps (e.g. 0.1), converted to evaluations."
    )
    early_stopping_threshold: float = arg(0.0, "Minimum improvement of the metric that resets the patience.")


@dataclass
class VlmTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with defaults that suit VLM fine-tuning."""

    output_dir: str = arg(None, "Where the adapter/model, processor, config and logs are written.")
    router_aux_loss_coef: float | None = arg(
        None,
        "Mixture-of-experts models: weight of the router's load-balancing loss added to the training loss "
        "(default: the architecture's own, e.g. 0.001 for Qwen3.5-MoE; 0 turns it off), as TRL's trainers do.",
    )
    overwrite_output_dir: bool = arg(False, "Replace a trained model already in --output_dir.")
    remove_unused_columns: bool = arg(False, "Keep raw columns: the collator needs them.")
    learning_rate: float = arg(1e-4, "Peak learning rate.")
    logging_steps: float = arg(10, "Log every N steps.")
    per_device_eval_batch_size: int = arg(8, "Batch size for evaluation and generation.")
    deepspeed: dict | str | None = arg(
        None, "DeepSpeed (GPUs): zero2, zero3, zero3_offload (configs shipped with vlmtune) or your JSON config file."
    )
    fsdp: str | None = field(
        default=None,
        metadata={
            "help": "FSDP (GPUs): full_shard or hybrid_shard (configs shipped with vlmtune, the family's layers "
            "wrapped), or bare --fsdp with your own --fsdp_config.",
            "nargs": "?",
            "const": True,
        },
    )
    resume_from_checkpoint: str | None = arg(
        None, "Continue from a checkpoint-N folder, or `latest`: the newest complete checkpoint in --output_dir."
    )
    on_nonfinite: Literal["stop", "skip"] = arg(
        "stop",
        "A NaN/inf loss or gradient norm at a step: stop (default; exit 1 naming the step, nothing saved for it) "
        "or skip (drop that optimizer step, count and report it, go on).",
    )
    dataloader_num_workers: int | None = arg(
        None,
        "Processes that load images and build batches beside training (default: with a GPU, half the CPU "
        "cores up to 4; without, 0: on CPU they would take cores from the model).",
    )
    malloc_mmap_threshold_mb: float = arg(
        2.0,
        "Linux (glibc): host tensors of at least this many MiB get their own memory, returned to the system "
        "when freed, so the heap does not fragment (CPU benchmark: 22%% lower peak RSS, steps about 25%% "
        "slower; see docs/performance.md). 0: glibc's adaptive default. MALLOC_MMAP_THRESHOLD_ in the "
        "environment wins.",
    )
    length_column_name: str = arg(
        "__length__",
        "Per-row token counts for --train_sampling_strategy group_by_length (batches of similar length: less "
        "padding on mixed-length data): by default the counts vlmtune's pre-training check measured, so no "
        "second pass over the data.",
    )
    cache_vision_features: bool = arg(
        False,
        "Compute each image's vision tower + projector features once and reuse them in later epochs and "
        "evaluations (needs both frozen: the LoRA default). Kept in host memory up to --vision_cache_max_gb.",
    )
    vision_cache_max_gb: float = arg(
        4.0, "Host memory for --cache_vision_features; images beyond it are computed every time."
    )
    save_on_signal: list[str] = arg(
        None,
        "Signals that mean: finish this step, save a checkpoint, stop (exit 128 + the signal's number); Ctrl-C "
        "always does. Add the one your scheduler warns with, e.g. SIGTERM SIGUSR1 for Slurm's --signal=USR1@120 "
        "(docs/multi-gpu.md, 'Preemption').",
        default_factory=lambda: ["SIGTERM"],
    )

    def __post_init__(self):
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = default_num_workers()
        if not _has_gpu():  # pinned memory only speeds copies to a GPU; without one torch warns every run
            self.dataloader_pin_memory = False
        # Before transformers' own checks, which refuse bf16/tf32 on machines without the hardware.
        compat.fit_training_args(self)
        super().__post_init__()


def default_num_workers() -> int:
    """Data-loader workers: images are decoded and processed while the GPU computes, off the training loop."""
    import os

    if not _has_gpu():
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class InspectArguments:
    """`vlmtune data inspect`'s own options (it takes the training arguments too, so a training config works)."""

    num_examples: int = arg(3, "How many samples to show.")
    inspect_split: str = arg("train", "Which split to show: train, eval or test.")
    color: str = arg("auto", "Highlight the trained text in colour: auto (on a terminal), always or never.")


# TRL's DPOTrainer loss variants (trl 1.16, `DPOConfig.loss_type`); several may be combined.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# The DPO losses that read --label_smoothing (trl 1.16, `DPOTrainer._compute_loss`); the others ignore it.
DPO_SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
# Preference methods TRL runs in trainers of their own, not as `DPOTrainer` losses: why `vlmtune dpo` does not
# take them (checked in trl 1.16), and what to use instead. `--loss_type orpo` or `kto` gets this message.
DPO_OTHER_METHODS = {
    "orpo": (
        "TRL's ORPO (trl.experimental.orpo.ORPOTrainer) feeds the model token ids only, never the images, so it "
        "cannot train a vision-language model on image pairs; for SFT and preference in one loss as ORPO does, use "
        "--loss_type sigmoid sft (RPO: DPO plus the chosen answers' NLL)"
    ),
    "kto": (
        "KTO is TRL's KTOTrainer, a trainer of its own on unpaired rows (a prompt, one completion, desirable or "
        "not); run `vlmtune kto` with the same data (pairs are split into a desirable and an undesirable row)"
    ),
}


@dataclass
class DpoArguments:
    """`vlmtune dpo`'s own options (the model, data, LoRA/full and Trainer ones are `vlmtune train`'s)."""

    _argument_group_name = "preference (DPO)"

    chosen_column: str | None = arg(None, "Column with the preferred answer; `chosen` if omitted.")
    rejected_column: str | None = arg(None, "Column with the dispreferred answer; `rejected` if omitted.")
    ref_model: str | None = arg(
        None,
        "Reference model (a folder or hub id). Default: none loaded; the policy itself with the new LoRA "
        "disabled, or, with --adapter_name_or_path, a frozen copy of that adapter (the SFT model), so no second "
        "model is held in memory. Full fine-tuning without it loads a second copy of --model_name_or_path.",
    )
    beta: float = arg(0.1, "DPO's beta: how far the policy may move from the reference (higher: less far).")
    loss_type: list[str] = arg(
        None,
        "TRL's DPO loss (sigmoid: DPO; sigmoid sft: RPO); several are summed, weighted by --loss_weights.",
        default_factory=lambda: ["sigmoid"],
    )
    loss_weights: list[float] | None = arg(None, "Weights of the --loss_type losses, one per loss (default 1 each).")
    label_smoothing: float = arg(0.0, "Share of pairs assumed mislabelled (robust and exo_pair losses; cDPO).")


# TRL's KTOTrainer losses (trl 1.16, `KTOConfig.loss_type`).
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KtoArguments:
    """`vlmtune kto`'s own options (the model, data, LoRA/full and Trainer ones are `vlmtune train`'s)."""

    _argument_group_name = "preference (KTO)"

    completion_column: str | None = arg(None, "Column with the completion of an unpaired row; `completion` if omitted.")
    label_column: str | None = arg(
        None, "Column saying whether the completion is desirable (true/false, 1/0); `label` if omitted."
    )
    chosen_column: str | None = arg(None, "With preference pairs: the preferred answer's column (`chosen`).")
    rejected_column: str | None = arg(None, "With preference pairs: the dispreferred answer's column (`rejected`).")
    ref_model: str | None = arg(
        None,
        "Reference model (a folder or hub id). Default: none loaded, as for vlmtune dpo: the policy with the new "
        "LoRA disabled, or a frozen copy of --adapter_name_or_path (the SFT model); full fine-tuning without it "
        "loads a second copy of --model_name_or_path.",
    )
    beta: float = arg(0.1, "KTO's beta: how far the policy may move from the reference (higher: less far).")
    loss_type: str = arg("kto", f"TRL's KTO loss: {', '.join(KTO_LOSS_TYPES)} (APO-zero, no KL estimate).")
    desirable_weight: float = arg(1.0, "Weight of the desirable rows' losses (raise it when they are fewer).")
    undesirable_weight: float = arg(1.0, "Weight of the undesirable rows' losses.")


# TRL's GRPOTrainer loss variants (trl 1.16, `GRPOConfig.loss_type`); GSPO is `--importance_sampling_level sequence`.
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
# vlmtune's built-in rewards (eval/rewards.py): the answer metrics, and the end-of-turn format reward.
GRPO_REWARDS = ("exact_match", "relaxed_accuracy", "anls", "f1", "format")


@dataclass
class GrpoArguments:
    """`vlmtune grpo`'s own options (the model, data, LoRA/full and Trainer ones are `vlmtune train`'s)."""

    _argument_group_name = "reinforcement learning (GRPO)"

    reward: list[str] = arg(
        None,
        f"Reward(s) for each completion against the row's reference answer: {', '.join(GRPO_REWARDS)}, or your "
        "function as FILE.py:NAME (docs/preference.md, 'GRPO'). Several are summed with --reward_weights.",
        default_factory=lambda: ["exact_match"],
    )
    reward_weights: list[float] | None = arg(None, "Weights of the --reward rewards, one per reward (default 1 each).")
    num_generations: int = arg(
        8,
        "Completions sampled per prompt (the group whose rewards are compared). --per_device_train_batch_size "
        "counts completions, and times --gradient_accumulation_steps and the number of processes must be a "
        "multiple of this.",
    )
    max_completion_length: int = arg(64, "Longest completion in tokens (a completion cut here never ends its turn).")
    temperature: float = arg(1.0, "Sampling temperature of the completions.")
    top_p: float = arg(1.0, "Nucleus sampling mass of the completions.")
    beta: float = arg(
        0.0,
        "KL coefficient against the reference model (TRL's default 0: no reference computed). Above 0, the "
        "reference is the policy with a new LoRA disabled, or a frozen copy of --adapter_name_or_path (the SFT model).",
    )
    loss_type: str = arg("dapo", f"TRL's GRPO loss: {', '.join(GRPO_LOSS_TYPES)}.")
    importance_sampling_level: str = arg(
        "token", "token (GRPO) or sequence (GSPO: one importance ratio per completion)."
    )
    scale_rewards: str = arg(
        "group", "Divide advantages by the reward spread of the group, the batch, or none (Dr. GRPO's advice)."
    )
    num_iterations: int = arg(1, "Optimisation passes over each batch of completions (GRPO's mu).")
    epsilon: float = arg(0.2, "Clipping range of the importance ratio.")


# Every training command's arguments: the model, data and images, LoRA/full fine-tuning, and the Trainer's
# (output, schedule, precision). `vlmtune train` takes exactly these; a preference trainer (dpo, grpo) adds
# its own dataclass: `parse_args(argv, (*TRAINING_ARGUMENTS, DpoArguments))`.
TRAINING_ARGUMENTS = (ModelArguments, DataArguments, FinetuneArguments, VlmTrainingArguments)


def to_dict(*dataclass_objects) -> dict:
    """All arguments of a run as one JSON-safe dict (saved next to the model as the resolved config)."""
    out: dict = {}
    for obj in dataclass_objects:
        data = obj.to_dict() if hasattr(obj, "to_dict") else vars(obj)
        out.update({k: v for k, v in data.items() if not k.startswith("_")})
    return json.loads(json.dumps(out, default=str))
