"""Generate answers for a dataset split and score them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.collate import Preparer
from .generate import answer_rows
from .metrics import exact_match


@dataclass
class EvalResult:
    metrics: dict
    predictions: list[dict] = field(default_factory=list)

    def write(self, output_dir: str | Path) -> None:
        """Write `predictions.jsonl` and `metrics.json` into `output_dir`."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w") as f:
            for p in self.predictions:
                f.write(json.dumps(p, default=str) + "\n")
        (out / "metrics.json").write_text(json.dumps(self.metrics, indent=2))


def evaluate_generation(model, processor, preparer: Preparer, rows, **generate_kwargs) -> EvalResult:
    """Exact match (normalised) of the model's greedy answers against each row's references."""
    convs, answers = answer_rows(model, processor, preparer, rows, **generate_kwargs)
    predictions = []
    for conv, answer in zip(convs, answers):
        predictions.append(
            {
                "row": conv.meta.get("row"),
                "prediction": answer,
                "references": conv.references,
                "exact_match": exact_match(answer, conv.references),
            }
        )
    n = len(predictions)
    accuracy = sum(p["exact_match"] for p in predictions) / n if n else 0.0
    return EvalResult(metrics={"exact_match": accuracy, "samples": n}, predictions=predictions)
