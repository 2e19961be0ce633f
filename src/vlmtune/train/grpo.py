"""`vlmtune grpo`: SFT rows → TRL's `GRPOTrainer` (sampled completions scored by rewards) → one PEFT adapter.

TRL does the work: it renders each row's prompt with the processor's chat template and the generation
prompt, samples `--num_generations` completions per prompt with the row's images (stopping at the
family's end-of-turn ids, `models/generation.end_of_turn_ids`), scores them with the rewards
(`eval/rewards.py`), and trains on the group-normalised advantages with the chosen loss. vlmtune gives it
the rows (`data/prompts.py`: loaded and checked as `vlmtune train` loads them) and the model
(`--adapter_name_or_path` continued, or a new LoRA / full fine-tune), and measures the held-out answers
(generated greedily, exact match) before and after.

The reference model (only computed with `--beta` above 0): a new LoRA's reference is the policy with the
adapter disabled (the base model, equal to the policy at step 0); a continued adapter's is the frozen
copy TRL makes of it (adapter-sized: the SFT model the run starts from). Full fine-tuning loads a second
copy of the model.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import trl
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer

from ..config import VlmTrainingArguments
from ..data.prompts import prompt_rows
from ..data.splits import Splits, build_splits
from ..errors import UsageError
from ..eval.evaluate import DEFAULT_METRICS, evaluate_generation
from ..eval.rewards import build_rewards
from ..models.generation import end_of_turn_ids, full_parameters_for_generation
from ..models.loading import trainable_table
from .checkpoints import CompleteCheckpoints
from .distributed import shards_parameters
from .fsdp import default_fsdp_wrap
from .guard import NonFiniteGuard, StopOnSignal
from .preference import (
    ExpertCountForTrl,
    checked_processing,
    load_policy,
    refuse_not_yet,
    run_job,
    train_and_save,
)
from .reference import ReferenceAdapter
from .vision_step import run_vision_every_step

# What vlmtune grpo does not do yet, with the reason (each is a flag `vlmtune train` takes).
_NOT_YET = {
    "streaming": "the prompts are read in full (each is checked before training)",
    "packing": "completions are generated and scored one sequence per row",
    "padding_free": "completions are generated and scored one sequence per row",
    "max_seq_length": "a prompt is never cut; bound the completions with --max_completion_length",
    "cache_vision_features": "each generation runs the vision tower on its prompt's images",
}
# The processor outputs TRL (1.16, `GRPOTrainer._generate_and_score_completions`) carries from generation to its
# training forward, and PaliGemma's `labels`, which GRPO has no use for. TRL drops any other (Mllama's aspect
# ratios and cross-attention mask), and that forward fails without them.
_TRL_TAKES = (
    "labels",
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
# GrpoArguments fields that are GRPOConfig fields of the same name.
_PASSED = (
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "beta",
    "loss_type",
    "importance_sampling_level",
    "scale_rewards",
    "num_iterations",
    "epsilon",
    "reward_weights",
)


@dataclass
class GrpoConfig(VlmTrainingArguments, GRPOConfig):
    """TRL's `GRPOConfig` with vlmtune's training defaults and options (one set of Trainer arguments)."""


@dataclass
class GrpoResult:
    output_dir: Path
    metrics: dict
    trainer: GRPOTrainer


class VlmGrpoTrainer(ExpertCountForTrl, ReferenceAdapter, NonFiniteGuard, CompleteCheckpoints, GRPOTrainer):
    """TRL's `GRPOTrainer`; it stops on non-finite steps, marks each checkpoint complete, and keeps one
    adapter (no copy for a new LoRA's reference, none saved), as `vlmtune train` and `vlmtune dpo` do."""


def grpo_config(training_args, grpo_args) -> GrpoConfig:
    """The Trainer arguments as parsed, plus the GRPO options (TRL's names); TRL's batch rules as messages."""
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    values.update({name: getattr(grpo_args, name) for name in _PASSED})
    values["gradient_checkpointing"] = training_args.gradient_checkpointing  # TRL's default is on; train's is off
    # TRL (1.16) gathers the images for its completion logs only on ranks whose batch has images: a text-only
    # batch on one rank then leaves the others waiting in that gather forever (tests/test_distributed.py).
    values["log_multimodal"] = False
    try:
        config = GrpoConfig(**values)
    except ValueError as err:  # TRL's rules on batch sizes and generations, said in its words
        message = " ".join(str(err).split())
        raise UsageError(
            f"vlmtune grpo: {message} (--per_device_train_batch_size counts completions: make it, times "
            "--gradient_accumulation_steps and the number of processes, a multiple of --num_generations)"
        ) from None
    config.do_train_given = getattr(training_args, "do_train_given", False)
    return config


def check_supported(data_args, training_args, grpo_args) -> None:
    """Refuse what `vlmtune grpo` does not support yet, naming the flag."""
    refuse_not_yet("grpo", _NOT_YET, data_args, training_args)
    weights = grpo_args.reward_weights
    if weights is not None and len(weights) != len(grpo_args.reward):
        raise UsageError(
            f"--reward_weights: {len(weights)} weight(s) for {len(grpo_args.reward)} --reward reward(s) "
            f"({' '.join(grpo_args.reward)}); give one weight per reward"
        )


def run_grpo(model_args, data_args, finetune_args, training_args, grpo_args, callbacks=None) -> GrpoResult:
    """Train with rewards as the arguments say; save the adapter (or model), processor, metrics and plots in
    `--output_dir`; return the final metrics (held-out exact match before and after among them)."""
    check_supported(data_args, training_args, grpo_args)
    return run_job("grpo", _run, (model_args, data_args, finetune_args, training_args, grpo_args), callbacks)


def _run(model_args, data_args, finetune_args, training_args, grpo_args, callbacks, out, signals) -> GrpoResult:
    main_process = training_args.process_index == 0
    resume, processor, spec = checked_processing(model_args, training_args, out)
    stop_ids = end_of_turn_ids(processor, spec.encoding)
    rewards = build_rewards(grpo_args.reward, stop_ids)
    splits = build_splits(data_args, spec.encoding, seed=training_args.seed, processor=processor)
    check_inputs_carried(prompt_rows(splits.train, splits.preparer, processor), processor)
    if splits.eval is None and training_args.eval_strategy != "no":
        raise UsageError("--eval_strategy needs evaluation rows: add --eval_dataset_name or --val_split_ratio")
    config = grpo_config(training_args, grpo_args)
    set_seed(training_args.seed)
    loaded, model = load_policy(model_args, finetune_args, training_args, (processor, spec))
    default_fsdp_wrap(training_args, loaded.model, loaded.spec)
    if shards_parameters(training_args):  # ZeRO-3/FSDP: a text-only prompt must still run the vision tower
        run_vision_every_step(model, loaded.processor)
    if main_process:
        print(splits.schema.describe())
        print(splits.summary())
        print(trainable_table(model, loaded.spec))
    stop_on_signal = StopOnSignal(signals)
    trainer = grpo_trainer(
        model, rewards, config, splits, loaded.processor, model_args, [stop_on_signal, *(callbacks or [])]
    )
    before = _answer_eval_rows(trainer, loaded, splits, finetune_args, training_args)
    all_args = (model_args, data_args, finetune_args, training_args, grpo_args)
    metrics = train_and_save(trainer, stop_on_signal, resume, loaded, out, all_args, main_process)
    after = _answer_eval_rows(trainer, loaded, splits, finetune_args, training_args)
    if after is not None:
        if main_process:
            after.write(out)
        metrics.update({f"eval_{k}_before": v for k, v in before.metrics.items() if k != "samples"})
        metrics.update({f"eval_{k}": v for k, v in after.metrics.items()})
    trainer.save_metrics("all", metrics)
    return GrpoResult(output_dir=out, metrics=metrics, trainer=trainer)


def check_inputs_carried(rows, processor, looked_at: int = 16) -> None:
    """Refuse a model whose processor returns image inputs TRL's GRPOTrainer drops before its training forward:
    the run would fail after its first generation, with TRL's or the model's error instead of the reason."""
    row = next((row for row in rows.select(range(min(looked_at, len(rows)))) if row["images"]), None)
    if row is None:  # text-only prompts: the processor returns the token ids and mask only
        return
    text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    dropped = sorted(set(processor(images=[row["images"]], text=[text], return_tensors="pt")) - set(_TRL_TAKES))
    if dropped:
        raise UsageError(
            f"vlmtune grpo: this model's processor returns {', '.join(dropped)} with its images, which TRL's "
            f"GRPOTrainer (trl {trl.__version__}) does not pass to its training forward, so it cannot train this "
            "model yet; vlmtune dpo and vlmtune kto can"
        )


def grpo_trainer(model, rewards, config, splits: Splits, processor, model_args, callbacks) -> VlmGrpoTrainer:
    """TRL's trainer on the GRPO rows, with a processor that pads on the left as TRL pads prompts: TRL
    left-pads the prompt ids itself but takes the processor's per-token outputs (Qwen's `mm_token_type_ids`,
    Gemma's `token_type_ids`) as padded, so a right-padding processor would mark the wrong positions as image
    tokens in every prompt shorter than its batch's longest (and Qwen's 3-D positions with them)."""
    rollout = left_padded(processor)
    return VlmGrpoTrainer(
        model=model,
        reward_funcs=rewards,
        args=config,
        train_dataset=prompt_rows(splits.train, splits.preparer, rollout),
        eval_dataset=prompt_rows(splits.eval, splits.preparer, rollout) if config.do_eval else None,
        processing_class=rollout,
        callbacks=callbacks,
        new_adapter=not model_args.adapter_name_or_path,
    )


def left_padded(processor):
    """A copy of `processor` whose tokenizer pads on the left (the saved processor keeps its own side)."""
    rollout = copy.deepcopy(processor)
    rollout.tokenizer.padding_side = "left"
    return rollout


def _answer_eval_rows(trainer, loaded, splits: Splits, finetune_args, training_args):
    """Greedy answers to the held-out rows, scored (`--eval_metrics`, default exact match); None without them."""
    if splits.eval is None or not finetune_args.eval_accuracy:
        return None
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        with full_parameters_for_generation(trainer):
            return evaluate_generation(
                model,
                loaded.processor,
                splits.preparer,
                splits.eval,
                batch_size=training_args.per_device_eval_batch_size,
                max_new_tokens=finetune_args.max_new_tokens,
                metrics=finetune_args.eval_metrics or DEFAULT_METRICS,
            )
    finally:
        model.train(was_training)
