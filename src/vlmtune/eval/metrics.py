"""Answer-matching metrics. Each takes one prediction and the acceptable references."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation and articles, fold whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str], normalize: bool = True) -> float:
    """1.0 when the prediction equals any reference (after normalisation unless `normalize` is off)."""
    if normalize:
        prediction = normalize_answer(prediction)
        references = [normalize_answer(r) for r in references]
    else:
        prediction, references = prediction.strip(), [r.strip() for r in references]
    return float(any(prediction == r for r in references))
