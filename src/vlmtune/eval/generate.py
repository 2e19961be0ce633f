"""Batched answer generation for evaluation and `vlmtune predict`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..data.conversation import Conversation
from ..data.encode import processor_inputs, prompt_text
from ..models.loss import router_logits_off


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def generate_answers(
    model,
    processor,
    conversations: Iterable[Conversation],
    images: Iterable[list],
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = False,
    **generate_kwargs,
) -> list[str]:
    """Generate the assistant's reply to each conversation's prompt (greedy unless told otherwise).

    Prompts are left-padded, so every row's new tokens start at the same column. `progress` shows a
    progress bar (samples answered).
    """
    convs = list(conversations)
    image_lists = iter(images)  # may be lazy: each batch's images are loaded only when it is generated
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    generate_kwargs.setdefault("do_sample", False)
    answers: list[str] = []
    bar = tqdm(total=len(convs), desc="Generating", unit="sample", disable=not progress, leave=False)
    try:
        for batch_convs in _batches(convs, batch_size):
            batch = [(conv, next(image_lists)) for conv in batch_convs]
            texts = [prompt_text(processor, conv.prompt_messages()) for conv, _ in batch]
            bos = tokenizer.bos_token
            inputs = processor_inputs(
                processor, texts, [imgs for _, imgs in batch], not (bos and texts[0].startswith(bos))
            ).to(model.device)
            with router_logits_off(model):
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
            new = out[:, inputs["input_ids"].shape[1] :]
            answers += [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]
            bar.update(len(batch))
    finally:
        tokenizer.padding_side = side
        bar.close()
    return answers
