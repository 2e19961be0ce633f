"""What a model being trained needs before it can generate (evaluation during and after training)."""

from __future__ import annotations

import contextlib


def full_parameters_for_generation(trainer):
    """A context in which the trained model can generate: FSDP1 keeps the root's own weights (embeddings,
    output layer) as flat shards outside any wrapped block, so those are gathered for the duration (the
    wrapped blocks gather themselves as they run); FSDP2 and ZeRO-3 gather per module in forward
    (`generate` passes `synced_gpus` itself); DDP and single processes hold full weights."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 1:
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.model_wrapped, writeback=False, recurse=False)


def end_of_turn_ids(processor, facts) -> list[int]:
    """The token ids that end an assistant turn for this family (`facts.turn_end`, which holds what the
    checkpoint's generation config stops at) plus the tokenizer's EOS: where sampled completions must stop."""
    tokenizer = processor.tokenizer
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for text in facts.turn_end:
        token = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token, int) and token != tokenizer.unk_token_id:  # a multi-token closing text is not a stop id
            ids.add(token)
    return sorted(ids)


def stop_at_end_of_turn(model, ids: list[int]) -> None:
    """Make `model.generate` stop at any of `ids`, besides what its generation config already stops at (a
    checkpoint whose generation_config.json names only the tokenizer's EOS would otherwise run past the turn)."""
    config = model.generation_config
    current = config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    config.eos_token_id = sorted(set(current) | set(ids))
