"""The loss at labelled positions: logits only where a label is, cross-entropy only there.

The language model's output projection is as wide as the vocabulary (151,936 for Qwen2-VL), while the
trained tokens of a VLM sample are a few answer tokens among hundreds of image and prompt tokens. These
functions ask the model for logits at the labelled positions only (transformers' `logits_to_keep` with a
boolean mask), so the full `batch x length x vocabulary` logits are never built; the model's own forward
runs, so PEFT, DDP/FSDP wrapping, LoRA or `modules_to_save` on the output layer and logit soft-capping all
behave as in the plain forward. The loss is the one transformers' causal-LM loss computes (same shift,
same reduction, same `num_items_in_batch` scaling), plus, for a mixture-of-experts model whose config asks
for router logits, the router's load-balancing loss the model's forward returns (`aux_loss`) times the
config's `router_aux_loss_coef`, as transformers adds it when given labels. Training (`train/trainer.py`), evaluation
(`eval/evaluate.py`) and any later trainer that scores answers all call them here.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..data.encode import IGNORE_INDEX
from ..errors import UsageError
from .packing import unwrap


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean `(batch, length)` mask of the positions whose logits are scored: position t predicts token
    t + 1, so it is kept when `labels[:, t + 1]` is not ignored (the last position never is)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def labelled_targets(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The token each kept position predicts, in the order `hidden[keep]` flattens them (row by row)."""
    return labels[:, 1:][keep[:, :-1]]


def labelled_loss(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of `(n, vocab)` logits, reduced as transformers' causal-LM loss reduces it: summed and
    divided by `num_items_in_batch` when given (gradient accumulation), else the mean over the `n` tokens."""
    if targets.numel() == 0:  # a batch with nothing to learn: zero, still attached to the graph
        return logits.sum() * 0.0
    logits = logits.float()
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits, targets)
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def use_router_aux_loss(model: torch.nn.Module, coef: float | None) -> float:
    """Have a mixture-of-experts model return its router load-balancing loss (`output_router_logits`) with
    `coef` (None: the architecture's own `router_aux_loss_coef`; 0: off), as TRL's trainers do; return the
    coefficient (0 for a dense model). Without it, training may route most tokens to a few experts."""
    text = unwrap(model).config.get_text_config()
    if not hasattr(text, "output_router_logits"):
        if coef:
            raise UsageError(
                f"--router_aux_loss_coef {coef}: {text.model_type} is not a mixture-of-experts model (it has no "
                "router); drop the flag"
            )
        return 0.0
    coef = getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef
    text.router_aux_loss_coef, text.output_router_logits = coef, coef != 0
    return coef


@contextmanager
def router_logits_off(model: torch.nn.Module) -> Iterator[None]:
    """Within: the model returns no router logits (`use_router_aux_loss` turned them on for training).
    Generation needs no load-balancing loss, and GLM-4.5V's (transformers 5.24) fails on every cached step
    with it: its one new token per row is weighed against the whole attention mask."""
    text = unwrap(model).config.get_text_config()
    on = getattr(text, "output_router_logits", False)  # False too for a dense model: nothing to change
    if on:
        text.output_router_logits = False
    try:
        yield
    finally:
        if on:
            text.output_router_logits = True


def with_router_aux_loss(model, loss: torch.Tensor, outputs) -> torch.Tensor:
    """`loss` plus the router's load-balancing loss where the model returned one (`use_router_aux_loss`)."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is None:
        return loss
    return loss + unwrap(model).config.get_text_config().router_aux_loss_coef * aux.to(loss.device)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (every family in the registry does)."""
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


def labelled_forward(model, inputs: dict, num_items_in_batch=None) -> tuple[torch.Tensor, object, int]:
    """Run `model` on `inputs` (with `labels`) scoring only the labelled positions.

    Returns the loss (with a mixture-of-experts model's router loss, `with_router_aux_loss`), the model's
    outputs (their `logits` are `(n, vocab)`, one row per scored token)
    and `n`.
    """
    labels = inputs["labels"]
    keep = labelled_positions(labels)
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**rest, logits_to_keep=keep, use_cache=False)
    targets = labelled_targets(labels, keep).to(outputs.logits.device)
    loss = with_router_aux_loss(model, labelled_loss(outputs.logits, targets, num_items_in_batch), outputs)
    return loss, outputs, int(targets.numel())


def labelled_nll_per_row(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `batch` (with `labels`): summed negative log-likelihood of its labelled tokens and their
    number, from logits at the labelled positions only (evaluation's loss and perplexity)."""
    labels = batch["labels"]
    keep = labelled_positions(labels)
    rest = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**rest, logits_to_keep=keep, use_cache=False).logits.float()
    targets = labelled_targets(labels, keep).to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    rows = keep.nonzero()[:, 0].to(logits.device)
    sums = torch.zeros(labels.shape[0], device=logits.device).index_add_(0, rows, nll)
    return sums, keep.sum(dim=1)
