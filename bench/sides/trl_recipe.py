"""The baseline: the TRL recipe users copy (seed 004), reimplemented faithfully with what is installed.

TRL `SFTTrainer`, the notebook's collator (chat template + processor, labels = input ids with padding and
image tokens masked, so system and user text is trained too), LoRA r=8 on q_proj/v_proj (alpha 16,
dropout 0.05), and the notebook's `SFTConfig` (gradient checkpointing, non-reentrant; fused AdamW;
constant 2e-4; max_grad_norm 0.3; warmup 3%; everything else SFTConfig's defaults).
"""

from __future__ import annotations

import json
from pathlib import Path


def recipe_images(example: list[dict]) -> list:
    """`qwen_vl_utils.process_vision_info(example)[0]`: the images of a conversation, in order (charts here
    are 448 px, a multiple of 28, which process_vision_info leaves unresized)."""
    return [part["image"] for message in example for part in message["content"] if part["type"] == "image"]


def recipe_rows(data_file: Path) -> list[list[dict]]:
    """The rows as the notebook's `format_data` returns them: messages with the PIL image inline."""
    from PIL import Image

    rows = []
    for line in data_file.read_text().splitlines():
        row = json.loads(line)
        messages = row["messages"]
        messages[1]["content"][0] = {"type": "image", "image": Image.open(data_file.parent / row["images"][0])}
        rows.append(messages)
    return rows


def recipe_dataset(data_file: Path):
    """TRL 1.16 takes a `datasets.Dataset`, not the notebook's list: one `messages` column holding the
    notebook's conversations, images inline (kept as Python objects by a formatting transform)."""
    from datasets import Dataset

    rows = recipe_rows(data_file)
    dataset = Dataset.from_dict({"row": list(range(len(rows)))})
    return dataset.with_transform(lambda batch: {"messages": [rows[i] for i in batch["row"]]})


def recipe_collator(processor):
    """The notebook's `collate_fn`."""
    image_tokens = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>")]
    image_tokens.append(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))  # 151652, 151653, 151655

    def collate_fn(examples):
        examples = [example["messages"] if isinstance(example, dict) else example for example in examples]
        texts = [processor.apply_chat_template(example, tokenize=False) for example in examples]
        image_inputs = [recipe_images(example) for example in examples]
        batch = processor(text=texts, images=image_inputs, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[labels == processor.tokenizer.pad_token_id] = -100
        for image_token_id in image_tokens:
            labels[labels == image_token_id] = -100
        batch["labels"] = labels
        return batch

    return collate_fn


def sample_batch(model_dir: str, data_file: Path, n: int) -> dict:
    """The recipe collator's batch of the first `n` rows (for counting tokens and trained tokens)."""
    from vlmtune.models.processors import load_processor

    return recipe_collator(load_processor(model_dir))(recipe_rows(data_file)[:n])


def run(args, timer, out_dir: str) -> None:
    """Train `args.warmup + args.steps` steps as the notebook does, timed by `timer`."""
    import torch
    from peft import LoraConfig
    from transformers import Qwen2VLForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    from vlmtune.models.processors import load_processor

    cuda = args.device == "cuda"
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        args.model_dir, dtype=torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None
    )
    processor = load_processor(args.model_dir)
    peft_config = LoraConfig(
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.05,
        r=args.lora_r,
        bias="none",
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    training_args = SFTConfig(
        output_dir=out_dir,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        gradient_checkpointing=True,
        optim="adamw_torch_fused",
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        bf16=cuda,
        tf32=cuda or None,
        max_grad_norm=0.3,
        warmup_steps=0.03,  # the notebook's warmup_ratio, renamed in transformers 5
        report_to="none",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=not cuda,
    )
    training_args.remove_unused_columns = False
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=recipe_dataset(Path(args.data_file)),
        data_collator=recipe_collator(processor),
        peft_config=peft_config,
        processing_class=processor.tokenizer,
        callbacks=[timer],
    )
    trainer.train()
