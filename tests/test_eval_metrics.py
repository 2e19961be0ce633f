"""Each answer metric against hand-computed cases (no model involved)."""

from __future__ import annotations

import math

import pytest

from vlmtune.eval.evaluate import aggregate, debug_view, group_metrics
from vlmtune.eval.metrics import (
    anls,
    check_metric_names,
    exact_match,
    exact_match_raw,
    levenshtein,
    normalize_answer,
    relaxed_accuracy,
    to_number,
    token_f1,
)


def test_squad_normalisation():
    assert normalize_answer("The sky is blue!") == "sky is blue"
    assert normalize_answer("  An  Apple,\tA pear.  ") == "apple pear"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_exact_match_raw_and_normalised():
    assert exact_match("The sky is blue.", ["The sky is blue!"]) == 1.0
    assert exact_match_raw("The sky is blue.", ["The sky is blue!"]) == 0.0
    assert exact_match_raw("  blue ", ["blue"]) == 1.0
    assert exact_match_raw("Blue", ["blue"]) == 0.0 and exact_match("Blue", ["blue"]) == 1.0
    assert exact_match("red", ["blue"]) == 0.0


def test_label_lists_match_any_reference():
    assert exact_match("12", ["twelve", "12"]) == 1.0
    assert exact_match_raw("twelve", ["twelve", "12"]) == 1.0
    assert exact_match("13", ["twelve", "12"]) == 0.0
    assert relaxed_accuracy("95", ["100", "94"]) == 1.0  # 5% off 100 is allowed, and 1.06% off 94
    assert anls("helo", ["xyz", "hello"]) == pytest.approx(0.8)
    assert token_f1("red square", ["blue circle", "red circle"]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("104", "100", 1.0),  # 4% off
        ("105", "100", 1.0),  # exactly 5% off: still correct
        ("106", "100", 0.0),  # 6% off
        ("95.5", "100", 1.0),
        ("94", "100", 0.0),
        ("-10", "-10.4", 1.0),  # 3.8% off
        ("1,020", "1000", 1.0),  # thousands separator
        ("45%", "45", 1.0),  # ChartQA writes percentages both ways
        ("$3.4", "3.5", 1.0),  # 2.9% off
        ("0.5", "0", 0.0),  # a zero reference must be hit exactly
        ("0", "0", 1.0),
        ("Yes", "yes", 1.0),  # not numbers: exact, any case
        ("Yes.", "yes", 0.0),
        ("abc", "100", 0.0),
        ("2019", "2018", 1.0),  # years are numbers too, as in ChartQA's own metric
    ],
)
def test_relaxed_accuracy_chartqa(prediction, reference, expected):
    assert relaxed_accuracy(prediction, [reference]) == expected


def test_to_number():
    assert to_number("1,234.5") == 1234.5 and to_number("-2e3") == -2000.0 and to_number("12.") == 12.0
    assert to_number("12 apples") is None and to_number("nan") is None and to_number("") is None


def test_anls_docvqa():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert anls("hello", ["hello"]) == 1.0
    assert anls("Hello ", ["hello"]) == 1.0  # case and surrounding space do not count
    assert anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit over 5 characters
    assert anls("abcd", ["abxy"]) == pytest.approx(0.5)  # at the threshold: kept
    assert anls("abcde", ["abxyz"]) == 0.0  # similarity 0.4 < 0.5: zero
    assert anls("", [""]) == 1.0


def test_token_f1():
    # "the red square" vs "a red circle" -> {red, square} vs {red, circle}: P = R = 1/2.
    assert token_f1("the red square", ["a red circle"]) == pytest.approx(0.5)
    assert token_f1("red", ["red square"]) == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert token_f1("red red", ["red"]) == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert token_f1("blue", ["red"]) == 0.0
    assert token_f1("The", ["a"]) == 1.0  # both empty after normalisation


def test_metric_names_are_checked():
    assert check_metric_names(["exact_match,anls", "token_f1"]) == ["exact_match", "anls", "token_f1"]
    assert "loss" in check_metric_names("all") and "relaxed_accuracy" in check_metric_names("all")
    with pytest.raises(ValueError, match="unknown metric.*accuracy"):
        check_metric_names(["accuracy"])


def _prediction(em, loss, tokens, group):
    return {"scores": {"exact_match": em, "loss": loss}, "answer_tokens": tokens, "groups": {"kind": group}}


def test_aggregate_weights_loss_by_answer_tokens_and_groups():
    predictions = [_prediction(1.0, 1.0, 1, True), _prediction(0.0, 2.0, 3, False), _prediction(1.0, 0.5, 2, False)]
    overall = aggregate(predictions, ["exact_match", "loss"])
    assert overall["exact_match"] == pytest.approx(2 / 3) and overall["samples"] == 3
    assert overall["loss"] == pytest.approx((1.0 + 6.0 + 1.0) / 6)  # per answer token, not per sample
    assert overall["perplexity"] == pytest.approx(math.exp(8 / 6))
    groups = group_metrics(predictions, ["exact_match", "loss"], ["kind"])["kind"]
    assert groups["True"] == {"exact_match": 1.0, "loss": 1.0, "perplexity": pytest.approx(math.e), "samples": 1}
    assert groups["False"]["exact_match"] == 0.5 and groups["False"]["loss"] == pytest.approx(7 / 5)


def test_debug_view_shows_raw_and_normalised_side_by_side():
    p = {
        "id": 7,
        "prompt": "What colour is the sky?",
        "prediction": "The sky is blue.",
        "references": ["The sky is blue!"],
        "scores": {"exact_match": 1.0, "exact_match_raw": 0.0},
    }
    text = debug_view([p, {**p, "id": 8}], 1)
    line = next(x for x in text.splitlines() if x.startswith("prediction:"))
    assert "'The sky is blue.'" in line and line.rstrip().endswith("'sky is blue'")
    assert "'The sky is blue!'" in text and "exact_match=1" in text and "exact_match_raw=0" in text
    assert "id 8" not in text
