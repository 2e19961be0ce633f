"""Generate answers for a dataset split and score them, overall and per metadata group."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.collate import VlmCollator
from ..data.conversation import Conversation, text_of
from ..data.prepare import Preparer
from ..errors import DataError
from ..models.loss import labelled_nll_per_row
from .generate import _batches, generate_answers
from .metrics import TEXT_METRICS, check_metric_names, normalize_answer

DEFAULT_METRICS = ("exact_match",)


@dataclass
class EvalResult:
    """Overall `metrics`, per-sample `predictions` and, with `group_by`, `groups[column][value]`."""

    metrics: dict
    predictions: list[dict] = field(default_factory=list)
    groups: dict = field(default_factory=dict)
    metric_names: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    conversations: list[Conversation] = field(default_factory=list, repr=False)
    # Rows each process generated answers for (one entry per process; [n] without distribution).
    shares: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**self.metrics, "groups": self.groups} if self.groups else dict(self.metrics)

    def write(self, output_dir: str | Path) -> None:
        """Write `predictions.jsonl` and `metrics.json` into `output_dir`."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w") as f:
            for p in self.predictions:
                f.write(json.dumps(p, default=str) + "\n")
        (out / "metrics.json").write_text(json.dumps(self.to_json(), indent=2, default=str))


def image_reference(ref) -> str:
    """How an image is named in predictions.jsonl: its path or URL, or a short description."""
    if isinstance(ref, str):
        return ref if len(ref) <= 300 else f"<inline image, {len(ref)} characters>"
    if isinstance(ref, dict):
        return ref.get("path") or f"<image bytes, {len(ref.get('bytes') or b'')} bytes>"
    if isinstance(ref, (bytes, bytearray)):
        return f"<image bytes, {len(ref)} bytes>"
    size = getattr(ref, "size", None)
    return f"<image {size[0]}x{size[1]}>" if size else f"<{type(ref).__name__}>"


def prompt_text(conv: Conversation) -> str:
    """The text of the last user turn: the question the prediction answers."""
    users = [m for m in conv.prompt_messages() if m["role"] == "user"]
    return text_of(users[-1]) if users else ""


@torch.no_grad()
def answer_losses(model, processor, preparer: Preparer, rows: Sequence[dict], batch_size: int = 8) -> list[tuple]:
    """Per row: (summed negative log-likelihood, number) of the reference answer's tokens.

    Batches come from the training collator, so exactly the tokens that training scores are scored here
    (assistant turns, end-of-turn token included; prompt, image and padding tokens never).
    """
    collate = VlmCollator(processor, preparer)
    results: list[tuple[float, int]] = []
    for batch_rows in _batches(list(rows), batch_size):
        sums, counts = labelled_nll_per_row(model, collate(batch_rows).to(model.device))
        results += [(float(s), int(n)) for s, n in zip(sums, counts)]
    return results


def aggregate(predictions: list[dict], metric_names: Iterable[str]) -> dict:
    """Mean of each text metric over `predictions`; `loss` is per answer token, with its perplexity."""
    n = len(predictions)
    out: dict = {}
    for name in metric_names:
        if name == "loss":
            tokens = sum(p["answer_tokens"] for p in predictions)
            total = sum(p["scores"]["loss"] * p["answer_tokens"] for p in predictions)
            loss = total / tokens if tokens else float("nan")
            out["loss"] = loss
            out["perplexity"] = math.exp(loss) if tokens and loss < 700 else float("inf")
        else:
            out[name] = sum(p["scores"][name] for p in predictions) / n if n else 0.0
    out["samples"] = n
    return out


def group_metrics(predictions: list[dict], metric_names: list[str], columns: Iterable[str]) -> dict:
    """`{column: {value: metrics}}` for each metadata column in `columns`."""
    groups: dict = {}
    for column in columns:
        by_value: dict[str, list[dict]] = {}
        for p in predictions:
            by_value.setdefault(str(p["groups"][column]), []).append(p)
        groups[column] = {value: aggregate(ps, metric_names) for value, ps in sorted(by_value.items())}
    return groups


def evaluate_generation(
    model,
    processor,
    preparer: Preparer,
    rows,
    metrics: Sequence[str] = DEFAULT_METRICS,
    group_by: Sequence[str] | str | None = None,
    batch_size: int = 8,
    progress: bool = False,
    **generate_kwargs,
) -> EvalResult:
    """Generate an answer for each row (greedy unless told otherwise) and score it with `metrics`.

    `group_by` names metadata columns (the row's columns that are not image, prompt or answer) to break
    every metric down by. The result's `metrics` holds the means over all rows and `samples`.
    """
    names = check_metric_names(metrics)
    columns = [group_by] if isinstance(group_by, str) else list(group_by or [])
    rows = [dict(row) for row in rows]
    convs = [preparer.conversation(row, row.get("__index__", i)) for i, row in enumerate(rows)]
    for column in columns:
        if convs and column not in convs[0].meta:
            available = sorted(k for k in convs[0].meta if k not in ("references", "row", "__index__"))
            raise DataError(f"--group_by {column!r}: no such metadata column; available: {', '.join(available)}")
    mine = my_share(len(rows))
    images = (preparer.load_images(convs[i]) for i in mine)  # loaded batch by batch, not all at once
    answers = generate_answers(
        model, processor, [convs[i] for i in mine], images, batch_size=batch_size, progress=progress, **generate_kwargs
    )
    losses = None
    if "loss" in names:
        losses = dict(zip(mine, answer_losses(model, processor, preparer, [rows[i] for i in mine], batch_size)))
    shares, answers = gather_shares(dict(zip(mine, answers)))
    losses = gather_shares(losses)[1] if losses is not None else None

    predictions = []
    for i, (conv, answer) in enumerate(zip(convs, answers)):
        refs = conv.references
        scores = {name: TEXT_METRICS[name](answer, refs) for name in names if name in TEXT_METRICS}
        record = {
            "id": conv.meta.get("id", conv.meta.get("row")),
            "row": conv.meta.get("row"),
            "prompt": prompt_text(conv),
            "images": [image_reference(ref) for ref in conv.images],
            "prediction": answer,
            "references": refs,
            "scores": scores,
        }
        if losses is not None:
            nll, tokens = losses[i]
            scores["loss"] = nll / tokens if tokens else float("nan")
            record["answer_tokens"] = tokens
        if columns:
            record["groups"] = {c: conv.meta.get(c) for c in columns}
        predictions.append(record)
    return EvalResult(
        metrics=aggregate(predictions, names),
        predictions=predictions,
        groups=group_metrics(predictions, names, columns),
        metric_names=names,
        conversations=convs,
        shares=shares,
    )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def my_share(n: int) -> list[int]:
    """Indices of the rows this process answers: all of them alone; under several processes a
    contiguous slice each (accelerate's split, padded by repeating the last index so every process runs
    the same number of batches, which ZeRO-3 and FSDP need to stay in step)."""
    if not _distributed() or n == 0:
        return list(range(n))
    from accelerate import PartialState

    with PartialState().split_between_processes(list(range(n)), apply_padding=True) as share:
        return list(share)


def gather_shares(by_index: dict) -> tuple[list[int], list]:
    """Every process's `{row index: value}` joined: (rows per process, values in row order)."""
    if not _distributed():
        return [len(by_index)], [by_index[i] for i in sorted(by_index)]
    from accelerate.utils import gather_object

    parts = gather_object([by_index])  # one dict per process, in rank order
    merged = {i: v for part in parts for i, v in part.items()}
    return [len(part) for part in parts], [merged[i] for i in sorted(merged)]


def debug_view(predictions: list[dict], n: int) -> str:
    """The first `n` predictions with raw and normalised forms side by side, and their scores."""
    blocks = []
    for k, p in enumerate(predictions[:n], 1):
        lines = [f"--- sample {k} (id {p['id']}) ---", f"prompt: {p['prompt']!r}"]
        lines.append(f"{'':<14}{'raw':<40}normalised")
        rows = [("prediction", p["prediction"])] + [
            (f"reference {j}" if len(p["references"]) > 1 else "reference", r) for j, r in enumerate(p["references"], 1)
        ]
        for label, text in rows:
            lines.append(f"{label + ':':<14}{repr(text):<40}{normalize_answer(text)!r}")
        lines.append("scores: " + "  ".join(f"{k}={v:.4g}" for k, v in p["scores"].items()))
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def format_metrics(result: EvalResult) -> str:
    """A plain-text table of the overall metrics and each group's."""
    names = [k for k in result.metrics if k != "samples"]
    rows = [("all", result.metrics)] + [
        (f"{column}={value}", metrics) for column, values in result.groups.items() for value, metrics in values.items()
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{'':<{width}}{'samples':>9}" + "".join(f"{n:>18}" for n in names)]
    for label, metrics in rows:
        lines.append(f"{label:<{width}}{metrics['samples']:>9}" + "".join(f"{metrics[n]:>18.4f}" for n in names))
    return "\n".join(lines)


def exact_match_summary(result: EvalResult) -> str:
    """Counts a VizSage user reads after its test step: total, correct, incorrect, exact match (score and
    percentage), then each group's samples and exact match. Empty when no exact-match metric was computed."""
    name = next((n for n in ("exact_match", "exact_match_raw") if n in result.metrics), None)
    if name is None:
        return ""
    correct = sum(1 for p in result.predictions if p["scores"].get(name) == 1.0)
    total = len(result.predictions)
    score = result.metrics[name]
    how = "normalised: case, punctuation, articles, spaces" if name == "exact_match" else "raw text"
    lines = [
        f"Exact match ({how})",
        f"  Total samples:         {total}",
        f"  Correct predictions:   {correct}",
        f"  Incorrect predictions: {total - correct}",
        f"  Exact match score:     {score:.4f}",
        f"  Exact match percent:   {100 * score:.2f}%",
    ]
    for column, values in result.groups.items():
        for value, metrics in values.items():
            lines.append(f"  {column}={value}: {metrics['samples']} samples, exact match {100 * metrics[name]:.2f}%")
    return "\n".join(lines)
