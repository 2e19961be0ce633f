"""Answer-matching metrics. Each takes one prediction and the acceptable references and returns a score
in [0, 1]; with several references (a ChartQA-style `label` list) the best match counts.

| name               | what it measures                                                               |
| ------------------ | ------------------------------------------------------------------------------ |
| `exact_match`      | equal after SQuAD-style normalisation (lower case, no punctuation or articles)  |
| `exact_match_raw`  | equal character for character (surrounding whitespace ignored)                  |
| `relaxed_accuracy` | ChartQA: numbers within 5% of the reference, anything else exact (any case)     |
| `anls`             | DocVQA: 1 - normalised edit distance, 0 below the 0.5 similarity threshold      |
| `token_f1`         | SQuAD: F1 of the normalised tokens in common                                    |

`loss` (mean negative log-likelihood of the reference answer's tokens, and its `perplexity`) needs the
model, not only the text: see `evaluate.answer_losses`.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable

from ..errors import UsageError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")

RELAXED_TOLERANCE = 0.05
ANLS_THRESHOLD = 0.5


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation and articles, fold whitespace."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str], normalize: bool = True) -> float:
    """1.0 when the prediction equals any reference (after normalisation unless `normalize` is off)."""
    if normalize:
        prediction = normalize_answer(prediction)
        references = [normalize_answer(r) for r in references]
    else:
        prediction, references = str(prediction).strip(), [str(r).strip() for r in references]
    return float(any(prediction == r for r in references))


def exact_match_raw(prediction: str, references: list[str]) -> float:
    """Exact match without normalisation (only surrounding whitespace is ignored)."""
    return exact_match(prediction, references, normalize=False)


def to_number(text: str) -> float | None:
    """The number a short answer states ("1,234", "45%", "$3.5", "-2e3"), or None if it is not one."""
    text = str(text).strip().rstrip(".").replace(",", "").replace("$", "").replace("%", "").strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def relaxed_match(prediction: str, reference: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed correctness for one reference.

    When both are numbers, the prediction may differ from the reference by up to `tolerance` of the
    reference (a reference of 0 must be matched exactly). Otherwise the strings must be equal, ignoring
    case and surrounding whitespace. Commas, `$` and `%` are ignored when reading numbers, so "45%"
    matches "45" (ChartQA writes percentages both ways).
    """
    pred, ref = to_number(prediction), to_number(reference)
    if pred is not None and ref is not None:
        if ref == 0:
            return pred == 0
        return abs(pred - ref) / abs(ref) <= tolerance + 1e-12
    return str(prediction).strip().lower() == str(reference).strip().lower()


def relaxed_accuracy(prediction: str, references: list[str]) -> float:
    """1.0 when the prediction relaxed-matches any reference (see `relaxed_match`)."""
    return float(any(relaxed_match(prediction, r) for r in references))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions and substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity for one sample (DocVQA).

    Similarity = 1 - edit distance / length of the longer string, on lower-cased, whitespace-folded text;
    the best reference counts, and a similarity below `threshold` scores 0.
    """
    pred = " ".join(str(prediction).lower().split())
    best = 0.0
    for reference in references:
        ref = " ".join(str(reference).lower().split())
        longest = max(len(pred), len(ref))
        similarity = 1.0 if longest == 0 else 1.0 - levenshtein(pred, ref) / longest
        best = max(best, similarity if similarity >= threshold else 0.0)
    return best


def token_f1(prediction: str, references: list[str]) -> float:
    """SQuAD token F1: overlap of normalised tokens, harmonic mean of precision and recall; best reference."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for reference in references:
        ref_tokens = normalize_answer(reference).split()
        if not pred_tokens or not ref_tokens:
            best = max(best, float(pred_tokens == ref_tokens))
            continue
        common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
        if common:
            precision, recall = common / len(pred_tokens), common / len(ref_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# Text metrics by name: (prediction, references) -> score in [0, 1].
TEXT_METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "exact_match": exact_match,
    "exact_match_raw": exact_match_raw,
    "relaxed_accuracy": relaxed_accuracy,
    "anls": anls,
    "token_f1": token_f1,
}
# `loss` is computed from the model's logits on the reference answer; it also reports `perplexity`.
MODEL_METRICS = ("loss",)
ALL_METRICS = (*TEXT_METRICS, *MODEL_METRICS)


def check_metric_names(names) -> list[str]:
    """Validate `--metrics` (a list, or one comma-separated string); `all` selects every metric."""
    if isinstance(names, str):
        names = [names]
    flat = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
    if "all" in flat:
        return list(ALL_METRICS)
    unknown = [n for n in flat if n not in ALL_METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)} or all")
    if not flat:
        raise UsageError(f"no metric chosen; choose from {', '.join(ALL_METRICS)} or all")
    return list(dict.fromkeys(flat))
