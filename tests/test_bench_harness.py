"""The benchmark harness measures every pair of sides alike: ABBA order, medians, ratios, failures shown.

These are the numbers bench/RESULTS.md quotes; a harness that ran one side first every time (warm caches)
or divided the wrong way would publish a wrong speedup.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import harness  # noqa: E402
import workload  # noqa: E402


def _result(seconds: float, peak: float, start: float = 0.0) -> dict:
    return {"seconds": seconds, "peak_rss": peak, "rss_at_start": start, "cuda_at_start": 0}


def test_sides_alternate_in_abba_order():
    order = []
    runs = harness.alternate(("a", "b"), 4, lambda side: order.append(side) or _result(1.0, 1.0), steps=1)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(runs["a"]), len(runs["b"])] == [4, 4]


def test_a_failing_side_stops_the_comparison_and_shows_why(capsys):
    outcomes = iter([_result(1.0, 1.0), {"error": "b failed (exit 1):\nout of memory"}])
    assert harness.alternate(("a", "b"), 2, lambda side: next(outcomes), steps=1) == {}
    assert "out of memory" in capsys.readouterr().out


def test_ratios_are_the_candidate_over_the_baseline_from_medians():
    runs = {
        "baseline": [_result(4.0, 200.0), _result(4.0, 200.0), _result(40.0, 900.0)],  # one slow outlier
        "candidate": [_result(2.0, 100.0), _result(2.0, 100.0), _result(2.0, 100.0)],
    }
    rows = harness.summarise(runs, harness.Workload(batch=4, steps=2, device="cpu"), {"candidate": 3.0})
    assert rows["baseline"]["samples"] == pytest.approx(4 * 2 / 4.0)
    assert rows["candidate"]["trained"] == pytest.approx(4 * 2 / 2.0 * 3.0)
    assert harness.ratios(rows, "baseline", "candidate") == pytest.approx((2.0, 0.5))


def test_measure_reads_a_worker_result_or_reports_its_failure(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text(f"print('noise'); print({harness.RESULT!r} + '{{\"seconds\": 1.5}}')")
    assert harness.measure([sys.executable, str(ok)], "ok") == {"seconds": 1.5}
    bad = tmp_path / "bad.py"
    bad.write_text("import sys; print('CUDA out of memory'); sys.exit(3)")
    error = harness.measure([sys.executable, str(bad)], "vlmtune")["error"]
    assert "vlmtune failed (exit 3)" in error and "CUDA out of memory" in error


@pytest.mark.parametrize("script", ["compare", "dpo_compare"])
def test_each_benchmark_runs_both_sides_on_a_tiny_model(script, tiny_model_dir, tmp_path):
    """Both sides of bench/compare.py and bench/dpo_compare.py run their timed steps on today's vlmtune,
    TRL and transformers (bench/RESULTS.md quotes them; a side that stopped running would go unnoticed until
    someone measures), and the SFT bench's token counts say what each side trains."""
    module = importlib.import_module(script)
    rows = 2
    writer = workload.write_data if script == "compare" else workload.write_preference_data
    data = writer(tmp_path / "data", rows, 64)
    args = argparse.Namespace(
        model_dir=tiny_model_dir("qwen2_vl"), data_file=str(data), device="cpu", batch=1, steps=1, warmup=1,
        lora_r=4, learning_rate=1e-5, trl_lora_targets="all-linear", threads=1, vlmtune_args=[],
    )  # fmt: skip
    for name, side in module.SIDES.items():
        timer = harness.step_timer(args.warmup, args.steps)
        side.run(args, timer, str(tmp_path / name))
        assert timer.end > timer.start, name
    if script == "compare":
        tokens = module.tokens_per_sample(args.model_dir, data, 8)
        assert tokens["recipe"]["tokens"] == tokens["vlmtune"]["tokens"]  # the same rows, encoded alike
        assert tokens["recipe"]["trained"] > tokens["vlmtune"]["trained"] > 0  # the recipe trains the prompt too
