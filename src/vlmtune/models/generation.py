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
