"""`vlmtune kto`: completions labelled desirable or not → TRL's `KTOTrainer` on vlmtune's encoding → one adapter.

TRL computes the loss (KTO, or APO-zero for unpaired rows), the KL estimate, the reference log-probabilities
and the metrics; vlmtune gives it the batches (`data/kto.py`): each row's prompt and completion encoded by
the one encoding path, so only the completion and its end of turn are scored, the prompt's images going to
the model (TRL's forward passes every batch key it does not know to the model: pixel values, image grids,
token types), and the KL sequences (each prompt with another row's completion) on the same images.

A separate command rather than `vlmtune dpo --loss_type kto`: TRL runs KTO in its own trainer with its own
options (desirable and undesirable weights) on unpaired rows, and pairs are only one of the data shapes it
takes. The reference is chosen as for `vlmtune dpo` (`train/reference.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed
from trl import KTOConfig, KTOTrainer

from ..config import VlmTrainingArguments
from ..data.kto import KtoCollator, KtoSplits, build_kto_splits, desirable
from ..data.preference import SIDES, PreferenceCollator
from ..errors import UsageError
from ..eval.evaluate import DEFAULT_METRICS, evaluate_generation
from ..models.generation import full_parameters_for_generation
from ..models.loading import trainable_table
from .checkpoints import CompleteCheckpoints
from .distributed import shards_parameters
from .fsdp import default_fsdp_wrap
from .guard import NonFiniteGuard, StopOnSignal
from .preference import (
    ExpertCountForTrl,
    checked_processing,
    load_policy,
    load_reference,
    preference_accuracy,
    refuse_not_yet,
    run_job,
    train_and_save,
)
from .reference import ReferenceAdapter
from .vision_step import run_vision_every_step

# What vlmtune kto does not do yet, with the reason (each is a flag `vlmtune train` takes).
_NOT_YET = {
    "streaming": "the rows are read in full (each is checked before training, and shuffled once)",
    "packing": "rows are scored one sequence per row",
    "padding_free": "rows are scored one sequence per row",
    "max_seq_length": "a row is never cut (its KL sequence must keep the same prompt); leave it out",
    "cache_vision_features": "the vision feature cache is not wired into the KTO trainer",
}
# The KL sequences' inputs TRL (1.16, `KTOTrainer._compute_kl_logps`) swaps in itself; any other per-token
# input of them (Mllama's cross-attention mask) is swapped in by `VlmKtoTrainer`.
_TRL_KL_KEYS = ("KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids", "KL_mm_token_type_ids")


@dataclass
class KtoConfig(VlmTrainingArguments, KTOConfig):
    """TRL's `KTOConfig` with vlmtune's training defaults and options (one set of Trainer arguments)."""


@dataclass
class KtoResult:
    output_dir: Path
    metrics: dict
    trainer: KTOTrainer


class VlmKtoTrainer(ExpertCountForTrl, ReferenceAdapter, NonFiniteGuard, CompleteCheckpoints, KTOTrainer):
    """TRL's `KTOTrainer` fed vlmtune's batches; one reference adapter at most, and it stops on non-finite steps
    and marks each checkpoint complete, as `vlmtune dpo` does."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Rows stay raw: `KtoCollator` encodes them per batch (TRL would tokenize the text columns itself)."""
        return dataset

    def _compute_loss(self, model, inputs, return_outputs):
        """TRL's, with the KL sequences' other per-token inputs held back from the main forward."""
        self._kl_inputs = {k[3:]: inputs.pop(k) for k in list(inputs) if k.startswith("KL_") and k not in _TRL_KL_KEYS}
        return super()._compute_loss(model, inputs, return_outputs)

    def _compute_kl_logps(self, model, batch):
        """TRL's, with every per-token input of the KL sequences their own (not only the token types)."""
        return super()._compute_kl_logps(model, {**batch, **getattr(self, "_kl_inputs", {})})


def kto_config(training_args, kto_args) -> KtoConfig:
    """The Trainer arguments as parsed, plus the KTO options (TRL's names); rows read in order (the KL
    estimate pairs neighbours; `data/kto.py` shuffles the rows once)."""
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    values.update(
        beta=kto_args.beta,
        loss_type=kto_args.loss_type,
        desirable_weight=kto_args.desirable_weight,
        undesirable_weight=kto_args.undesirable_weight,
        max_length=None,  # a row is never cut
        gradient_checkpointing=training_args.gradient_checkpointing,  # TRL's default is on; vlmtune's is train's
        train_sampling_strategy="sequential",
    )
    config = KtoConfig(**values)
    config.do_train_given = getattr(training_args, "do_train_given", False)
    return config


def check_supported(data_args, training_args, kto_args) -> None:
    """Refuse the `vlmtune train` options `vlmtune kto` does not support yet, naming the flag."""
    refuse_not_yet("kto", _NOT_YET, data_args, training_args)
    if training_args.train_sampling_strategy == "group_by_length":
        raise UsageError(
            "vlmtune kto: --train_sampling_strategy group_by_length is not supported: KTO's KL estimate pairs each "
            "row with its neighbour, so the rows are read in one shuffled order; leave it out"
        )
    if training_args.per_device_train_batch_size < 2 and kto_args.loss_type == "kto":
        raise UsageError(
            "vlmtune kto: --per_device_train_batch_size must be at least 2 with --loss_type kto: its KL estimate "
            "pairs each prompt with another row's completion of the same batch"
        )


def run_kto(model_args, data_args, finetune_args, training_args, kto_args, callbacks=None) -> KtoResult:
    """Train on labelled completions as the arguments say; save the adapter (or model), processor, metrics and
    plots in `--output_dir`; return the final metrics."""
    check_supported(data_args, training_args, kto_args)
    return run_job("kto", _run, (model_args, data_args, finetune_args, training_args, kto_args), callbacks)


def _run(model_args, data_args, finetune_args, training_args, kto_args, callbacks, out, signals) -> KtoResult:
    main_process = training_args.process_index == 0
    resume, processor, spec = checked_processing(model_args, training_args, out)
    splits = build_kto_splits(data_args, spec.encoding, processor, kto_args, training_args.seed)
    if splits.eval is None and training_args.eval_strategy != "no":
        raise UsageError("--eval_strategy needs evaluation rows: add --eval_dataset_name or --val_split_ratio")
    set_seed(training_args.seed)
    loaded, model = load_policy(model_args, finetune_args, training_args, (processor, spec))
    default_fsdp_wrap(training_args, loaded.model, loaded.spec)
    if shards_parameters(training_args):  # ZeRO-3/FSDP: a text-only batch must still run the vision tower
        run_vision_every_step(model, loaded.processor)
    if main_process:
        print(splits.describe())
        print(splits.summary())
        print(trainable_table(model, loaded.spec))
    stop_on_signal = StopOnSignal(signals)
    trainer = VlmKtoTrainer(
        model=model,
        ref_model=load_reference(kto_args, training_args),
        args=kto_config(training_args, kto_args),
        data_collator=KtoCollator(loaded.processor, splits.preparer),
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=loaded.processor,
        callbacks=[stop_on_signal, *(callbacks or [])],
        new_adapter=not model_args.adapter_name_or_path,
    )
    before = _preference_accuracy(trainer, splits)
    all_args = (model_args, data_args, finetune_args, training_args, kto_args)
    metrics = train_and_save(trainer, stop_on_signal, resume, loaded, out, all_args, main_process)
    if splits.eval is not None:
        metrics.update(trainer.evaluate())
        if before is not None:
            after = _preference_accuracy(trainer, splits)
            metrics.update(eval_preference_accuracy_before=before, eval_preference_accuracy=after)
        if finetune_args.eval_accuracy:
            metrics.update(_answer_desirable_rows(trainer, loaded, splits, finetune_args, training_args, out))
    trainer.save_metrics("all", metrics)
    return KtoResult(output_dir=out, metrics=metrics, trainer=trainer)


def _preference_accuracy(trainer, splits: KtoSplits) -> float | None:
    """With pairs as input: the share of eval pairs whose chosen answer the model finds more likely than the
    rejected one (`vlmtune dpo`'s measure); None for unpaired rows or without eval rows."""
    if splits.pairs is None or splits.pairs.eval is None:
        return None
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        collator = PreferenceCollator(trainer.processing_class, splits.pairs.preparers)
        return preference_accuracy(model, collator, splits.pairs.eval, trainer.args.per_device_eval_batch_size)
    finally:
        model.train(was_training)


def _answer_desirable_rows(trainer, loaded, splits: KtoSplits, finetune_args, training_args, out: Path) -> dict:
    """Generate answers for the eval rows labelled desirable and score them against their completions (with
    pairs as input: the eval pairs' prompts against the chosen answers)."""
    if splits.pairs is not None:
        preparer, rows = splits.pairs.preparers[SIDES[0]], splits.pairs.eval
    else:
        label = splits.preparer.schema.label_column
        preparer, rows = splits.preparer, splits.eval.filter(lambda row: desirable(row[label], "eval", label))
        if not len(rows):
            return {}
    with full_parameters_for_generation(trainer):
        result = evaluate_generation(
            trainer.model,
            loaded.processor,
            preparer,
            rows,
            batch_size=training_args.per_device_eval_batch_size,
            max_new_tokens=finetune_args.max_new_tokens,
            metrics=finetune_args.eval_metrics or DEFAULT_METRICS,
        )
    if trainer.is_world_process_zero():
        result.write(out)
    return {f"eval_{k}": v for k, v in result.metrics.items()}
