"""`vlmtune demo`: the whole workflow offline on a tiny Qwen2-VL and bundled synthetic data.

Builds the tiny model, writes the coloured-shapes dataset, measures held-out accuracy, fine-tunes with
LoRA through the same `run_training` every user runs, and measures again.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import DataArguments, FinetuneArguments, ModelArguments, VlmTrainingArguments, arg
from .data.splits import build_splits
from .data.synthetic import write_shapes_dataset
from .errors import OutputError
from .eval.evaluate import evaluate_generation
from .models.loading import load_model
from .models.tiny import build_tiny_model
from .outputs import check_output_folder
from .train.run import run_training

MARKER = ".vlmtune-demo"


@dataclass
class DemoArguments:
    output_dir: str = arg("vlmtune-demo", "Folder for the tiny model, data and the trained adapter.")
    family: str = arg("qwen2_vl", "Tiny model family to build (see `vlmtune tiny-model --help`).")
    max_steps: int = arg(500, "Training steps.")
    learning_rate: float = arg(3e-3, "LoRA learning rate.")
    seed: int = arg(0, "Seed for the model, the data and training.")


def _claim(folder: Path) -> None:
    """Use `folder` only if it is new, empty or an earlier demo's; never clobber a user's files."""
    check_output_folder(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).exists():
        raise OutputError(f"--output_dir {folder} exists and was not made by `vlmtune demo`; pass another --output_dir")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("made by vlmtune demo; safe to delete\n")


def _command() -> str:
    """How to call vlmtune from this shell: `vlmtune` when on PATH, else the path `make demo` installed."""
    if shutil.which("vlmtune"):
        return "vlmtune"
    return str(Path(sys.executable).parent / "vlmtune")


def run_demo(args: DemoArguments) -> dict:
    start = time.time()
    root = Path(args.output_dir)
    _claim(root)
    model_dir = build_tiny_model(args.family, root / "tiny-model", seed=args.seed)
    files = write_shapes_dataset(root / "data", seed=args.seed)
    print(f"Built a tiny {args.family} in {model_dir} and wrote {files['train']} / {files['validation']}")

    model_args = ModelArguments(model_name_or_path=str(model_dir))
    data_args = DataArguments(dataset_name=str(files["train"]), eval_dataset_name=str(files["validation"]))
    finetune_args = FinetuneArguments(finetuning_type="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0)
    training_args = VlmTrainingArguments(
        output_dir=str(root / "adapter"),
        overwrite_output_dir=True,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        logging_steps=50,
        save_strategy="no",
        seed=args.seed,
        use_cpu=True,
    )

    base = load_model(str(model_dir))
    splits = build_splits(data_args, base.spec.encoding, need_train=False)
    before = evaluate_generation(base.model, base.processor, splits.preparer, splits.eval, max_new_tokens=8)
    n = before.metrics["samples"]
    print(f"Held-out accuracy before fine-tuning: {before.metrics['exact_match']:.1%} ({n} images)")

    result = run_training(model_args, data_args, finetune_args, training_args)
    after = result.metrics["eval_exact_match"]
    print(f"Held-out accuracy before fine-tuning: {before.metrics['exact_match']:.1%}")
    print(f"Held-out accuracy after fine-tuning:  {after:.1%}")
    print(f"Adapter, processor and logs: {result.output_dir}  (predictions: {result.output_dir / 'predictions.jsonl'})")
    example = splits.eval[0]
    print(
        f"Try it: {_command()} predict --model_name_or_path "
        f"{model_dir} --adapter {result.output_dir} --image {Path(files['validation']).parent / example['image_path']} "
        f'--prompt "{example["prompt"]}"'
    )
    print(f"Done in {time.time() - start:.0f}s.")
    return {"before": before.metrics["exact_match"], "after": after, "output_dir": str(result.output_dir)}
