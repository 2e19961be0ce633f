"""`vlmtune dpo`: preference pairs → TRL's `DPOTrainer` on vlmtune's encoding → one PEFT adapter.

TRL computes the loss, the reference log-probabilities and the metrics (rewards/accuracies, margins);
vlmtune gives it the batches: each pair's chosen and rejected conversations encoded by the one encoding
path (`data/preference.py`), so only the answer and its end-of-turn are scored, with the same prompt and
image inputs on both sides.

The reference: TRL's own choice, with nothing copied beyond an adapter. A new LoRA: the policy with the
adapter disabled (equal to the policy at step 0). `--adapter_name_or_path SFT`: that adapter is trained
further, and TRL keeps a frozen copy of it (adapter-sized) as the reference, so the reference is the SFT
model the run starts from. `--ref_model`: that model. Full fine-tuning without one: TRL loads a second copy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, set_seed
from trl import DPOConfig, DPOTrainer

from .. import compat
from ..config import VlmTrainingArguments, to_dict
from ..data.encode import IGNORE_INDEX
from ..data.preference import SIDES, PreferenceCollator, PreferenceSplits, build_preference_splits
from ..errors import UsageError
from ..eval.evaluate import DEFAULT_METRICS, evaluate_generation
from ..eval.plots import write_training_plots
from ..models.checkpoint import check_adapter_path, model_errors
from ..models.generation import full_parameters_for_generation
from ..models.loading import (
    adapter_base_path,
    apply_finetuning,
    load_model,
    load_processing,
    processor_source,
    trainable_table,
)
from ..models.loss import labelled_nll_per_row
from ..models.packing import unwrap
from .checkpoints import CompleteCheckpoints, no_space_errors, remove_deletion_leftovers, resolve_resume
from .distributed import shards_parameters
from .fsdp import default_fsdp_wrap
from .guard import NonFiniteGuard, StopOnSignal, check_finite_weights, parse_signals
from .reference import ReferenceAdapter
from .run import CONFIG_FILE, _dtype, check_output_dir, quantization_kwargs, remove_written_since, start_job
from .vision_step import run_vision_every_step

logger = logging.getLogger(__name__)

# What vlmtune dpo does not do yet, with the reason (each is a flag `vlmtune train` takes).
_NOT_YET = {
    "streaming": "preference pairs are read in full (both sides are checked before training)",
    "packing": "pairs are scored one sequence per row",
    "padding_free": "pairs are scored one sequence per row",
    "max_seq_length": "a pair is never cut (both sides must keep the same prompt); leave it out",
    "cache_vision_features": "the vision feature cache is not wired into the DPO trainer",
}


@dataclass
class DpoConfig(VlmTrainingArguments, DPOConfig):
    """TRL's `DPOConfig` with vlmtune's training defaults and options (one set of Trainer arguments)."""


@dataclass
class DpoResult:
    output_dir: Path
    metrics: dict
    trainer: DPOTrainer


class ExpertCountForTrl:
    """Trainer mixin (before TRL's trainer in the bases of dpo's, kto's and grpo's): TRL (1.16) adds a
    mixture of experts' router loss reading the expert count as `num_experts`; GLM-4.5V's text config calls
    it `n_routed_experts` (`num_local_experts` by alias), and TRL fails on it with an AttributeError (as it
    did for GPT-OSS, trl#5754). The model's config gets the name TRL reads."""

    def __init__(self, *args, **kwargs):
        _name_experts_for_trl(unwrap(kwargs["model"] if "model" in kwargs else args[0]))
        super().__init__(*args, **kwargs)


def _name_experts_for_trl(model: PreTrainedModel) -> None:
    text = model.config.get_text_config()
    routed = hasattr(text, "output_router_logits") and hasattr(text, "num_local_experts")
    if routed and not hasattr(text, "num_experts"):
        text.num_experts = text.num_local_experts


class VlmDpoTrainer(ExpertCountForTrl, ReferenceAdapter, NonFiniteGuard, CompleteCheckpoints, DPOTrainer):
    """TRL's `DPOTrainer` fed vlmtune's batches; one reference adapter at most (`ReferenceAdapter`), and it
    stops on non-finite steps and marks each checkpoint complete, as `vlmtune train` does."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Rows stay raw: `PreferenceCollator` encodes each pair per batch (TRL would tokenize the text
        columns with its own template rendering)."""
        return dataset


def dpo_config(training_args, dpo_args) -> DpoConfig:
    """The Trainer arguments as parsed, plus the DPO options (TRL's names)."""
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    values.update(
        beta=dpo_args.beta,
        loss_type=list(dpo_args.loss_type),
        loss_weights=dpo_args.loss_weights,
        label_smoothing=dpo_args.label_smoothing,
        gradient_checkpointing=training_args.gradient_checkpointing,  # TRL's default is on; vlmtune's is train's
    )
    config = DpoConfig(**values)
    config.do_train_given = getattr(training_args, "do_train_given", False)
    return config


def check_supported(data_args, training_args) -> None:
    """Refuse the `vlmtune train` options `vlmtune dpo` does not support yet, naming the flag."""
    refuse_not_yet("dpo", _NOT_YET, data_args, training_args)


def refuse_not_yet(command: str, not_yet: dict[str, str], data_args, training_args) -> None:
    """A `vlmtune train` option the command does not support yet (`not_yet`: flag -> why), given: refused,
    naming the flag and why."""
    for name, why in not_yet.items():
        owner = data_args if hasattr(data_args, name) else training_args
        if getattr(owner, name):
            raise UsageError(f"vlmtune {command}: --{name} is not supported yet: {why}")


def train_and_save(trainer, stop_on_signal: StopOnSignal, resume, loaded, out: Path, all_args: tuple, main: bool):
    """Train (stopping cleanly on a signal), then save the outputs; the training metrics."""
    with stop_on_signal.installed():
        metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
    stop_on_signal.raise_if_stopped_early(trainer)
    save_outputs(trainer, loaded, out, all_args, main)
    return metrics


def load_policy(model_args, finetune_args, training_args, processing: tuple | None = None):
    """The model to train: the SFT adapter to continue (`--adapter_name_or_path`), or a new LoRA/full one;
    `processing`, the (processor, spec) the data was checked with, is reused rather than derived again."""
    loaded = load_model(
        model_args.model_name_or_path,
        dtype=_dtype(training_args),
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
        processor_path=processor_source(model_args.adapter_name_or_path),
        family=model_args.family(),
        processing=processing,
        **quantization_kwargs(finetune_args),
    )
    compat.check_model_type(model_args.model_type, loaded.model.config)
    if model_args.adapter_name_or_path:
        with model_errors(model_args.adapter_name_or_path, "--adapter_name_or_path"):
            model = PeftModel.from_pretrained(loaded.model, model_args.adapter_name_or_path, is_trainable=True)
    else:
        model = apply_finetuning(loaded.model, loaded.spec, finetune_args)
    return loaded, model


def load_reference(dpo_args, training_args):
    """`--ref_model` loaded (frozen), or None for TRL's own reference (see the module docstring)."""
    if not dpo_args.ref_model:
        return None
    reference = load_model(dpo_args.ref_model, dtype=_dtype(training_args)).model
    reference.requires_grad_(False)
    return reference.eval()


def check_model_and_output(model_args, training_args, command: str) -> None:
    """The base model (or the one `--adapter_name_or_path` records, as `vlmtune predict` takes it) and the
    output folder are given; said with the command's name before anything loads."""
    if model_args.adapter_name_or_path:
        check_adapter_path(model_args.adapter_name_or_path)
        if not model_args.model_name_or_path:
            model_args.model_name_or_path = adapter_base_path(model_args.adapter_name_or_path)
    if not model_args.model_name_or_path:
        raise UsageError(
            f"vlmtune {command}: --model_name_or_path is required (the base model), or --adapter_name_or_path an "
            "adapter that records its base"
        )
    if not training_args.output_dir:
        raise UsageError(
            f"vlmtune {command}: --output_dir is required (the folder for the adapter, processor and logs)"
        )


def run_job(command: str, run, args: tuple, callbacks):
    """The start dpo, kto and grpo share: the model and output folder checked (said with the command's name),
    the folder held for this job (stop signals, one writer), then `run(*args, callbacks, out, signals)`;
    `args` are (model, data, finetune, training, method) arguments."""
    model_args, training_args = args[0], args[3]
    check_model_and_output(model_args, training_args, command)
    out = check_output_dir(training_args)
    signals = parse_signals(training_args.save_on_signal)
    _, holding = start_job(training_args, out, signals)
    with holding:
        return run(*args, callbacks, out, signals)


def checked_processing(model_args, training_args, out: Path) -> tuple:
    """(the checkpoint to resume from, processor, spec), before any weights load, so that each row can be
    checked first: a bad row costs seconds, not a model load."""
    resume = resolve_resume(training_args.resume_from_checkpoint, out)
    if training_args.should_save:
        remove_deletion_leftovers(out)
    processor, spec = load_processing(
        model_args.model_name_or_path,
        processor_source(model_args.adapter_name_or_path),
        model_args.trust_remote_code,
        model_args.family(),
    )
    return resume, processor, spec


def run_dpo(model_args, data_args, finetune_args, training_args, dpo_args, callbacks=None) -> DpoResult:
    """Train on preference pairs as the arguments say; save the adapter (or model), processor, metrics and
    plots in `--output_dir`; return the final metrics."""
    check_supported(data_args, training_args)
    return run_job("dpo", _run, (model_args, data_args, finetune_args, training_args, dpo_args), callbacks)


def _run(model_args, data_args, finetune_args, training_args, dpo_args, callbacks, out, signals) -> DpoResult:
    main_process = training_args.process_index == 0
    resume, processor, spec = checked_processing(model_args, training_args, out)
    splits = build_preference_splits(
        data_args, spec.encoding, processor, dpo_args.chosen_column, dpo_args.rejected_column, training_args.seed
    )
    if splits.eval is None and training_args.eval_strategy != "no":
        raise UsageError("--eval_strategy needs evaluation pairs: add --eval_dataset_name or --val_split_ratio")
    set_seed(training_args.seed)
    loaded, model = load_policy(model_args, finetune_args, training_args, (processor, spec))
    default_fsdp_wrap(training_args, loaded.model, loaded.spec)
    if shards_parameters(training_args):  # ZeRO-3/FSDP: a text-only batch must still run the vision tower
        run_vision_every_step(model, loaded.processor)
    if main_process:
        print(splits.describe())
        print(splits.summary())
        print(trainable_table(model, loaded.spec))
    config = dpo_config(training_args, dpo_args)
    stop_on_signal = StopOnSignal(signals)
    trainer = VlmDpoTrainer(
        model=model,
        ref_model=load_reference(dpo_args, training_args),
        args=config,
        data_collator=PreferenceCollator(loaded.processor, splits.preparers),
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=loaded.processor,
        callbacks=[stop_on_signal, *(callbacks or [])],
        new_adapter=not model_args.adapter_name_or_path,
    )
    before = _preference_accuracy(trainer, splits)
    all_args = (model_args, data_args, finetune_args, training_args, dpo_args)
    metrics = train_and_save(trainer, stop_on_signal, resume, loaded, out, all_args, main_process)
    if splits.eval is not None:
        metrics.update(trainer.evaluate())
        metrics.update(
            eval_preference_accuracy_before=before, eval_preference_accuracy=_preference_accuracy(trainer, splits)
        )
        if finetune_args.eval_accuracy:
            metrics.update(_answer_eval_pairs(trainer, loaded, splits, finetune_args, training_args, out))
    trainer.save_metrics("all", metrics)
    return DpoResult(output_dir=out, metrics=metrics, trainer=trainer)


def pair_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair of a `PreferenceCollator` batch: the summed log-probability of the chosen and of the rejected
    answer (their trained tokens only), from logits at those positions only (`models/loss.py`)."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    inputs["labels"] = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    nll, _ = labelled_nll_per_row(model, inputs)
    return (-nll).chunk(2)


@torch.no_grad()
def preference_accuracy(model, collator: PreferenceCollator, rows, batch_size: int = 8) -> float:
    """Share of `rows`' pairs whose chosen answer the model finds more likely than the rejected one (no
    reference model involved: what the model itself prefers)."""
    device = next(model.parameters()).device
    wins = []
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        chosen, rejected = pair_log_probs(model, {k: v.to(device) for k, v in batch.items()})
        wins += (chosen > rejected).tolist()
    return sum(wins) / len(wins)


def save_outputs(trainer, loaded, out: Path, arguments: tuple, main_process: bool) -> None:
    """The adapter (or model), processor, config, plots and trainer state, as `vlmtune train` saves them."""
    check_finite_weights(trainer.model, f"the result in {out}")
    started = time.time()
    with no_space_errors(out, "the trained result", lambda: remove_written_since(out, started)):
        trainer.save_model(str(out))
        if main_process:
            loaded.processor.save_pretrained(str(out))
            compat.save_base_config(arguments[0], out)
            write_training_plots(trainer.state.log_history, out)
            (out / CONFIG_FILE).write_text(json.dumps(to_dict(*arguments), indent=2))
        trainer.save_state()


def _preference_accuracy(trainer, splits: PreferenceSplits) -> float | None:
    """`preference_accuracy` of the model being trained on the eval pairs (None without eval pairs)."""
    if splits.eval is None:
        return None
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        return preference_accuracy(model, trainer.data_collator, splits.eval, trainer.args.per_device_eval_batch_size)
    finally:
        model.train(was_training)


def _answer_eval_pairs(trainer, loaded, splits: PreferenceSplits, finetune_args, training_args, out: Path) -> dict:
    """Generate answers for the eval pairs' prompts and score them against the chosen answers."""
    with full_parameters_for_generation(trainer):
        result = evaluate_generation(
            trainer.model,
            loaded.processor,
            splits.preparers[SIDES[0]],
            splits.eval,
            batch_size=training_args.per_device_eval_batch_size,
            max_new_tokens=finetune_args.max_new_tokens,
            metrics=finetune_args.eval_metrics or DEFAULT_METRICS,
        )
    if trainer.is_world_process_zero():
        result.write(out)
    return {f"eval_{k}": v for k, v in result.metrics.items()}
