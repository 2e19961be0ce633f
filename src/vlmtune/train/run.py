"""`vlmtune train`: data → model → transformers.Trainer → adapter (or full model) in output_dir."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, set_seed

from .. import compat
from ..config import to_dict
from ..data.collate import VlmCollator
from ..data.pack import PackPlan, packed_train_rows, padding_free_rows
from ..data.splits import Splits, build_splits
from ..errors import OutputError, UsageError
from ..eval.during_training import GenerationMetrics, attach
from ..eval.evaluate import DEFAULT_METRICS, evaluate_generation
from ..eval.plots import write_training_plots
from ..hub import check_push, hub_errors, upload_errors
from ..models.derive import packing_refusal
from ..models.generation import full_parameters_for_generation
from ..models.loading import apply_finetuning, check_adapter_fits, load_model, read_config, trainable_table
from ..models.loss import use_router_aux_loss
from ..models.packing import check_packing
from ..outputs import LOCK_FILE, check_output_folder, exclusive_output_dir
from .callbacks import early_stopping_callback, keep_training_when_reporters_fail
from .checkpoints import no_space_errors, remove_deletion_leftovers, resolve_resume
from .distributed import announce, detect_topology, sharded_quantization_kwargs, shards_parameters
from .fsdp import default_fsdp_wrap
from .guard import StopOnSignal, check_finite_weights, launcher_problem, parse_signals
from .trainer import LENGTH_STRATEGIES, VlmTrainer
from .vision_step import run_vision_every_step

logger = logging.getLogger(__name__)

CONFIG_FILE = "vlmtune_config.json"
# Files whose presence means output_dir already holds a trained model we must not clobber.
_RESULT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", CONFIG_FILE)


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict
    trainer: Trainer


def check_output_dir(training_args) -> Path:
    """Refuse to overwrite a previous run's results unless asked (or resuming)."""
    if not training_args.output_dir:
        raise UsageError("vlmtune train: --output_dir is required (the folder for the adapter, processor and logs)")
    out = check_output_folder(training_args.output_dir)
    existing = [f for f in _RESULT_FILES if (out / f).exists()]
    if existing and not (training_args.overwrite_output_dir or training_args.resume_from_checkpoint):
        raise OutputError(
            f"--output_dir {out} already holds a trained model ({', '.join(existing)}); pass --overwrite_output_dir "
            "to replace it, --resume_from_checkpoint to continue, or choose another --output_dir"
        )
    return out


def _dtype(training_args) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def quantization_kwargs(finetune_args) -> dict:
    """The QLoRA loading flags, for `load_model`."""
    return {
        "load_in_4bit": finetune_args.load_in_4bit,
        "load_in_8bit": finetune_args.load_in_8bit,
        "quantize_vision_tower": finetune_args.quantize_vision_tower,
    }


def check_packing_family(model_args, data_args) -> None:
    """`--packing` / `--padding_free` for a family where packed samples would see each other: refused from
    the checkpoint's config.json, before its weights load."""
    flag = "packing" if data_args.packing else "padding_free" if data_args.padding_free else None
    if flag is None:
        return
    config = read_config(model_args.model_name_or_path, model_args.trust_remote_code)
    check_packing(packing_refusal(config), f"--{flag}", config.model_type)


def training_rows(rows, data_args, training_args) -> tuple[object, PackPlan | None]:
    """What the Trainer trains on: the checked rows, their packs (`--packing`, with the plan), or the rows
    marked to be joined per batch (`--padding_free`). Evaluation rows are never packed."""
    if rows is None or not (data_args.packing or data_args.padding_free):
        return rows, None
    if not data_args.packing:
        return padding_free_rows(rows), None
    if data_args.max_seq_length is None:  # (the command line refuses this earlier; programmatic callers here)
        raise UsageError("--packing needs --max_seq_length: it is the most tokens a packed row holds")
    if training_args.train_sampling_strategy in LENGTH_STRATEGIES:  # meaningless for rows filled to capacity
        logger.warning(
            "--train_sampling_strategy %s is ignored with --packing: packed rows are already filled to about "
            "--max_seq_length; the packs are shuffled instead.",
            training_args.train_sampling_strategy,
        )
        training_args.train_sampling_strategy = "random"
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    return packed_train_rows(rows, data_args.max_seq_length, data_args.packing_strategy, seed)


def run_training(model_args, data_args, finetune_args, training_args, callbacks=None) -> TrainResult:
    """Fine-tune as the arguments say, save everything a user needs, and return the final metrics.

    `callbacks`: extra `TrainerCallback`s (for programmatic use and tests).
    """
    do_train, do_eval = compat.run_steps(training_args)
    out = check_output_dir(training_args) if do_train else Path(training_args.output_dir or ".")
    signals = parse_signals(training_args.save_on_signal)
    repo_id = check_hub(training_args, out, do_train)
    topology, holding = start_job(training_args, out, signals, writes=do_train)
    with holding:
        return _run(model_args, data_args, finetune_args, training_args, callbacks, out, topology, signals, repo_id)


def start_job(training_args, out: Path, signals, writes: bool = True):
    """What every training command settles before work starts: one job formed by the launcher (refused
    otherwise; announced once, with any signal the launcher would not pass on), and one run per output
    folder (the first process holds it; the others write nothing of their own). Returns the topology and
    the context that holds the folder."""
    topology = detect_topology(training_args)
    announce(topology)
    if topology.rank == 0 and (problem := launcher_problem(signals)):
        logger.warning(problem)
    holding = exclusive_output_dir(out) if writes and topology.rank == 0 else contextlib.nullcontext()
    return topology, holding


_LATER = "Pass --push_to_hub false to train without uploading; `vlmtune push` uploads the result later."


def check_hub(training_args, out: Path, do_train: bool) -> str | None:
    """With --push_to_hub: refuse now an upload that cannot work (hub.py says why); the repository id.
    The first process checks (the others take the name as given: only the first uploads)."""
    if not training_args.push_to_hub:
        return None
    if not do_train:  # nothing is trained, so nothing is uploaded (and the Trainer must not create a repository)
        logger.warning("--push_to_hub is ignored without training: evaluation results stay in %s.", out)
        training_args.push_to_hub = False
        return None
    repo = training_args.hub_model_id or out.resolve().name  # the Trainer's default name
    if training_args.process_index != 0:
        return repo
    return check_push(repo, training_args.hub_token, "--push_to_hub")


def _run(model_args, data_args, finetune_args, training_args, callbacks, out, topology, signals, repo_id):
    """`run_training` once the output folder is held."""
    do_train, do_eval = compat.run_steps(training_args)
    main_process = topology.rank == 0  # one process prints and writes; the Trainer saves on it only
    resume = resolve_resume(training_args.resume_from_checkpoint, out) if do_train else None  # fail fast
    if do_train and training_args.should_save:
        remove_deletion_leftovers(out)
    if data_args.streaming:
        if training_args.max_steps <= 0:
            raise UsageError("--streaming needs --max_steps: a stream has no length to count epochs by")
        # Accelerate would fetch streamed batches once and slice every tensor by batch rows, cutting
        # pixel tensors whose first dimension is image patches; each process reads its own instead.
        training_args.accelerator_config.dispatch_batches = False
    if model_args.adapter_name_or_path:  # continuing an adapter: it must fit the model (or name its base)
        model_args.model_name_or_path = check_adapter_fits(
            model_args.adapter_name_or_path,
            model_args.model_name_or_path,
            model_args.trust_remote_code,
            "--adapter_name_or_path",
        )
    check_packing_family(model_args, data_args)  # before the weights load
    set_seed(training_args.seed)
    loaded = load_model(
        model_args.model_name_or_path,
        dtype=_dtype(training_args),
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
        family=model_args.family(),
        **quantization_kwargs(finetune_args),
        **sharded_quantization_kwargs(finetune_args, training_args, _dtype(training_args)),
    )
    compat.check_model_type(model_args.model_type, loaded.model.config)
    router_coef = use_router_aux_loss(loaded.model, training_args.router_aux_loss_coef)
    if router_coef and main_process:
        print(f"Mixture of experts: the router's load-balancing loss is added with weight {router_coef}.")
    # Every row is rendered through the training encoding path before training (images read by header
    # only; the full processor runs only to measure rows against --max_seq_length).
    splits: Splits = build_splits(data_args, loaded.spec.encoding, seed=training_args.seed, processor=loaded.processor)
    train_rows, plan = training_rows(splits.train, data_args, training_args)
    if main_process:
        print(splits.schema.describe())
        print(splits.summary())
        if plan is not None:
            print(plan.summary(training_args.per_device_train_batch_size))
    default_fsdp_wrap(training_args, loaded.model, loaded.spec)
    model = apply_finetuning(loaded.model, loaded.spec, finetune_args, model_args.adapter_name_or_path)
    if shards_parameters(training_args):  # ZeRO-3/FSDP: a text-only batch must still run the vision tower
        run_vision_every_step(model, loaded.processor)
    compat.keep_4bit_trainable(model)
    if main_process:
        print(trainable_table(model, loaded.spec))
    if training_args.label_names is None:
        training_args.label_names = ["labels"]
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if splits.eval is None and training_args.eval_strategy != "no":
        raise UsageError("--eval_strategy needs evaluation data: add --eval_dataset_name or --val_split_ratio")
    generation_metrics = GenerationMetrics.from_args(loaded.processor, splits, finetune_args, training_args)
    early_stopping = early_stopping_callback(finetune_args, training_args)
    stop_on_signal = StopOnSignal(signals)
    if repo_id is not None:
        training_args.hub_model_id = repo_id  # as checked; the Trainer creates the repository if needed
    creating = contextlib.nullcontext()
    if repo_id is not None:  # the Trainer creates the repository when it starts
        creating = hub_errors(f"--push_to_hub: creating the repository {repo_id}", _LATER)
    with creating:
        trainer = VlmTrainer(
            model=model,
            args=training_args,
            train_dataset=train_rows,
            eval_dataset=splits.eval,
            data_collator=VlmCollator(
                loaded.processor,
                splits.preparer,
                data_args.train_on_prompt,
                pack_capacity=data_args.max_seq_length if data_args.packing else None,
            ),
            processing_class=loaded.processor,
            **(generation_metrics.trainer_kwargs() if generation_metrics else {}),
            callbacks=[c for c in (early_stopping, stop_on_signal, *(callbacks or [])) if c is not None],
            spec=loaded.spec,
            vision_lr=finetune_args.vision_lr,
            projector_lr=finetune_args.projector_lr,
        )
    attach(trainer, generation_metrics)
    keep_training_when_reporters_fail(trainer.callback_handler)
    if not do_train:
        return _evaluate_only(trainer, loaded, splits, finetune_args, training_args, out)
    with stop_on_signal.installed():
        train_output = trainer.train(resume_from_checkpoint=resume)
    stop_on_signal.raise_if_stopped_early(trainer)
    metrics = dict(train_output.metrics)
    if skipped := trainer.nonfinite_steps:
        metrics["train_nonfinite_steps_skipped"] = len(skipped)
        if main_process:
            print(f"Skipped {len(skipped)} optimizer steps with a non-finite loss or gradient: steps {skipped}")
    if data_args.streaming and main_process:  # streamed samples are checked as they are read: rows read
        print(splits.summary())

    check_finite_weights(trainer.model, f"the result in {out}")  # a previous good result stays as it was
    started = time.time()
    with no_space_errors(out, "the trained result", lambda: remove_written_since(out, started)):
        # `_internal_call`: no upload yet with --push_to_hub; the whole folder goes up once at the end.
        trainer.save_model(str(out), _internal_call=True)
        if main_process:
            loaded.processor.save_pretrained(str(out))
            compat.save_base_config(model_args, out)
            write_training_plots(trainer.state.log_history, out)
            config = to_dict(model_args, data_args, finetune_args, training_args)
            (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        trainer.save_state()
    if do_eval and splits.eval is not None:
        metrics.update(compat.loss_metrics(trainer))

    if splits.eval is not None and finetune_args.eval_accuracy:
        result = _answer_eval_rows(trainer, loaded, splits, finetune_args, training_args)
        metrics.update({f"eval_{k}": v for k, v in result.metrics.items()})
        if main_process:
            if len(result.shares) > 1:
                shares = result.shares
                print(f"Evaluation: {sum(shares)} rows answered by {len(shares)} processes {shares}")
            result.write(out)
    trainer.save_metrics("all", metrics)
    if repo_id is not None:  # the whole output_dir: adapter, processor, metrics, plots
        with upload_errors(out, repo_id, training_args.hub_private_repo):
            trainer.push_to_hub(commit_message="vlmtune: end of training")
    return TrainResult(output_dir=out, metrics=metrics, trainer=trainer)


def remove_written_since(out: Path, started: float) -> None:
    """Remove the files a failed final save wrote at the top of `out` (half-written results must not look
    like results); checkpoints and the folder lock stay."""
    for path in out.iterdir():
        if path.is_file() and path.name != LOCK_FILE and path.stat().st_mtime >= started:
            path.unlink(missing_ok=True)


def _answer_eval_rows(trainer, loaded, splits, finetune_args, training_args):
    """Generate answers for the eval rows and score them; each process answers its share of the rows."""
    with full_parameters_for_generation(trainer):
        return evaluate_generation(
            trainer.model,
            loaded.processor,
            splits.preparer,
            splits.eval,
            batch_size=training_args.per_device_eval_batch_size,
            max_new_tokens=finetune_args.max_new_tokens,
            metrics=finetune_args.eval_metrics or DEFAULT_METRICS,
        )


def _evaluate_only(trainer, loaded, splits, finetune_args, training_args, out: Path) -> TrainResult:
    """`--do_eval` without training: eval loss, perplexity and (unless `--eval_accuracy false`) exact match
    of the model as loaded, into `eval_results.json`; nothing else in output_dir is touched."""
    if splits.eval is None:
        raise UsageError("--do_eval without training needs evaluation data: --eval_dataset_name or a validation split")
    metrics = compat.loss_metrics(trainer)
    if finetune_args.eval_accuracy:
        result = _answer_eval_rows(trainer, loaded, splits, finetune_args, training_args)
        metrics.update({f"eval_{k}": v for k, v in result.metrics.items()})
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        trainer.save_metrics("eval", metrics, combined=False)
    return TrainResult(output_dir=out, metrics=metrics, trainer=trainer)
