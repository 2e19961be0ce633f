"""The baseline: TRL's own `DPOTrainer` for a vision-language model, as TRL's docs and its `dpo_vlm.py`
example use it.

The processor as `processing_class` (TRL's vision collator tokenises and processes images on the fly),
a `datasets.Dataset` with `images` (PIL) and conversational `prompt` / `chosen` / `rejected`, a PEFT
`LoraConfig` (the example's `all-linear` targets by default: `--trl_lora_targets` to change them) so the
reference is the policy with the adapter disabled, and `DPOConfig`'s defaults (sigmoid loss, beta 0.1)
with the batch, steps, learning rate and precision both sides share.
"""

from __future__ import annotations

import json
from pathlib import Path


def pair_rows(data_file: Path) -> list[dict]:
    """The pairs with their images opened, as TRL's collator takes them."""
    from PIL import Image

    rows = []
    for line in data_file.read_text().splitlines():
        row = json.loads(line)
        row["images"] = [Image.open(data_file.parent / path).convert("RGB") for path in row["images"]]
        rows.append(row)
    return rows


def run(args, timer, out_dir: str) -> None:
    """Train `args.warmup + args.steps` DPO steps with TRL as its docs show, timed by `timer`."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText
    from trl import DPOConfig, DPOTrainer

    from vlmtune.models.processors import load_processor  # AutoProcessor without the torchvision video half

    cuda = args.device == "cuda"
    model = AutoModelForImageTextToText.from_pretrained(
        args.model_dir, dtype=torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None
    )
    processor = load_processor(args.model_dir)
    targets = "all-linear" if args.trl_lora_targets == "all-linear" else args.trl_lora_targets.split(",")
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets, task_type="CAUSAL_LM")
    config = DPOConfig(
        output_dir=out_dir,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.learning_rate,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pair_rows(Path(args.data_file))),
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[timer],
    )
    trainer.train()
