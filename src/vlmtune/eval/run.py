"""`vlmtune eval`: a model (+ adapter) and a dataset in → metrics, predictions and report.html out."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed

from ..config import DataArguments, ModelArguments, arg
from ..data.sources import load_splits
from ..data.splits import build_splits
from ..errors import UsageError
from ..models.loading import load_for_inference
from ..outputs import check_output_folder
from .evaluate import EvalResult, debug_view, evaluate_generation, exact_match_summary, format_metrics
from .metrics import ALL_METRICS, check_metric_names
from .report import write_report

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    _argument_group_name = "evaluation"

    output_dir: str = arg(None, "Folder for predictions.jsonl, metrics.json and report.html.")
    adapter: str | None = arg(None, "A vlmtune/PEFT adapter folder (same as --adapter_name_or_path).")
    metrics: list[str] = arg(
        None, f"Metrics to compute: {', '.join(ALL_METRICS)}, or all.", default_factory=lambda: ["exact_match"]
    )
    group_by: list[str] | None = arg(
        None, "Metadata column(s) to break every metric down by (e.g. need_external_knowledge)."
    )
    per_device_eval_batch_size: int = arg(8, "Samples generated per batch.")
    max_new_tokens: int = arg(32, "Longest answer to generate.")
    do_sample: bool = arg(False, "Sample instead of greedy decoding.")
    temperature: float = arg(1.0, "Sampling temperature (with --do_sample).")
    top_p: float = arg(1.0, "Nucleus sampling mass (with --do_sample).")
    num_beams: int = arg(1, "Beam search width (1: no beam search).")
    debug_samples: int = arg(0, "Print the first N samples with raw and normalised forms side by side.")
    report: bool = arg(True, "Write report.html (metrics, groups, gallery of samples, wrong ones first).")
    report_samples: int = arg(100, "Samples shown in the report's gallery.")
    device: str = arg("auto", "cpu, cuda, cuda:1, ... (auto: the GPU when there is one).")
    dtype: str = arg("auto", "Weights dtype: auto (as saved), float32, bfloat16 or float16.")
    seed: int = arg(42, "Seed (matters only with --do_sample).")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, EvalArguments)


def eval_data_args(data_args: DataArguments) -> DataArguments:
    """Data arguments that make `build_splits` return the whole evaluation set as its eval split.

    `--dataset_name` alone: a file is evaluated whole; a folder or hub dataset contributes its
    validation split (else test, else its only split). `--eval_dataset_name` picks the file explicitly.
    """
    name = data_args.eval_dataset_name or data_args.dataset_name
    if not name:
        raise UsageError("vlmtune eval: --dataset_name (or --eval_dataset_name) is required")
    return dataclasses.replace(
        data_args,
        dataset_name=data_args.dataset_name or name,
        eval_dataset_name=name,
        max_train_samples=1,  # the training split is only read for its columns
        val_split_ratio=0.0,
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA GPU that PyTorch can use; use --device cpu")
    return device


def from_training_run(data_args: DataArguments, args: EvalArguments) -> tuple[str | None, Path]:
    """The adapter to evaluate and where results go, for a config file shared with `vlmtune train`.

    VizSage's test step runs on its training YAML: there `output_dir` holds the trained adapter. Then that
    adapter is evaluated on the data's test split (when it has one), and results go to `output_dir/eval`
    so the training run's own predictions and metrics stay.
    """
    out = Path(args.output_dir)
    if args.adapter or not (out / "adapter_config.json").is_file():
        return args.adapter, out
    name = data_args.eval_dataset_name or data_args.dataset_name
    if name and not (data_args.eval_dataset_name or data_args.eval_split):
        splits = load_splits(name, data_args.dataset_config, data_args.streaming).splits
        test = data_args.test_split or next((s for s in splits if s.lower() == "test"), None)
        if test:
            data_args.eval_split = test
    print(f"Evaluating the adapter trained in {out} (results in {out / 'eval'}).")
    return str(out), out / "eval"


def run_eval(model_args: ModelArguments, data_args: DataArguments, args: EvalArguments) -> EvalResult:
    if not args.output_dir:
        raise UsageError("vlmtune eval: --output_dir is required")
    check_output_folder(args.output_dir)
    device = _device(args.device)
    names = check_metric_names(args.metrics)
    trained, out = from_training_run(data_args, args)
    adapter = trained or model_args.adapter_name_or_path
    if not (model_args.model_name_or_path or adapter):
        raise UsageError("vlmtune eval: --model_name_or_path (or --adapter) is required")
    set_seed(args.seed)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = load_for_inference(
        model_args.model_name_or_path,
        adapter,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
        family=model_args.family(),
    )
    model = loaded.model.to(device)
    splits = build_splits(eval_data_args(data_args), loaded.spec.encoding, seed=args.seed, need_train=False)
    print(splits.schema.describe())
    sampling = {"do_sample": args.do_sample, "num_beams": args.num_beams}
    if args.do_sample:
        sampling.update(temperature=args.temperature, top_p=args.top_p)
    result = evaluate_generation(
        model,
        loaded.processor,
        splits.preparer,
        splits.eval,
        metrics=names,
        group_by=args.group_by,
        batch_size=args.per_device_eval_batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=True,
        **sampling,
    )
    result.write(out)
    if args.debug_samples:
        print(debug_view(result.predictions, args.debug_samples))
    print(format_metrics(result))
    summary = exact_match_summary(result)
    if summary:
        print(summary)
    if args.report:
        details = {
            "model": model_args.model_name_or_path or "(from adapter)",
            "adapter": adapter,
            "data": data_args.eval_dataset_name or data_args.dataset_name,
        }
        report = write_report(
            result, out / "report.html", splits.preparer, details=details, max_samples=args.report_samples
        )
        print(f"Report: {report}")
    print(f"Predictions and metrics: {out / 'predictions.jsonl'}, {out / 'metrics.json'}")
    return result
