"""report.html as a person sees it: rendered by a real headless Chromium, checked on screen and in the DOM."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from PIL import Image

from tests.helpers import family_spec
from vlmtune.data.prepare import Preparer
from vlmtune.data.schema import Conversation, Schema
from vlmtune.eval.evaluate import EvalResult, aggregate, group_metrics
from vlmtune.eval.report import write_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
# .ci/run installs Chromium and sets this, so CI fails rather than skips when the browser is missing.
REQUIRED = os.environ.get("VLMTUNE_REQUIRE_CHROMIUM") == "1"

# Colours the page's own style never uses: finding them on screen means the thumbnails were decoded.
CYAN, MAGENTA, YELLOW = (0, 255, 255), (255, 0, 255), (255, 255, 0)


def _browser(*args: str, tmp_path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail("VLMTUNE_REQUIRE_CHROMIUM=1 but no chromium on PATH")
        pytest.skip("no headless Chromium on PATH (apt-get install chromium); .ci/run installs it")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=60, check=True)


def _sample(id_, colour, prediction, reference, em, kind):
    conv = Conversation(
        messages=[
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What colour is {id_}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": reference}]},
        ],
        images=[Image.new("RGB", (64, 64), colour)],
        meta={"row": id_, "kind": kind},
    )
    record = {
        "id": id_,
        "prompt": f"What colour is {id_}?",
        "images": ["<image 64x64>"],
        "prediction": prediction,
        "references": [reference],
        "scores": {"exact_match": em, "anls": em},
        "groups": {"kind": kind},
    }
    return conv, record


@pytest.fixture
def report(tmp_path):
    samples = [
        _sample("first-right", CYAN, "cyan", "cyan", 1.0, "plain"),
        _sample("the-wrong-one", MAGENTA, "<b>green</b>", "magenta", 0.0, "plain"),
        _sample("second-right", YELLOW, "yellow", "yellow", 1.0, "tricky"),
    ]
    convs, predictions = [s[0] for s in samples], [s[1] for s in samples]
    names = ["exact_match", "anls"]
    result = EvalResult(
        metrics=aggregate(predictions, names),
        predictions=predictions,
        groups=group_metrics(predictions, names, ["kind"]),
        metric_names=names,
        conversations=convs,
    )
    preparer = Preparer(schema=Schema("prompt_response", source="test"), facts=family_spec("qwen2_vl").encoding)
    return write_report(result, tmp_path / "report.html", preparer, details={"model": "tiny"})


def _centre_row(image: Image.Image, colour) -> float | None:
    """Mean y of the pixels of exactly `colour`, or None when there are fewer than 500 of them."""
    width = image.width
    ys = [i // width for i, p in enumerate(image.getdata()) if p == colour]
    return sum(ys) / len(ys) if len(ys) >= 500 else None


def test_report_renders_metrics_groups_and_wrong_first_gallery(report, tmp_path):
    shot = tmp_path / "shot.png"
    _browser(f"--screenshot={shot}", "--window-size=1000,1400", report.as_uri(), tmp_path=tmp_path)
    with Image.open(shot) as image:
        screen = image.convert("RGB")
    rows = {
        name: _centre_row(screen, colour) for name, colour in (("cyan", CYAN), ("magenta", MAGENTA), ("yellow", YELLOW))
    }
    assert all(rows.values()), f"thumbnails not visible on screen: {rows}"
    # Wrong answers first, then the right ones in dataset order.
    assert rows["magenta"] < rows["cyan"] < rows["yellow"]

    dom = _browser("--dump-dom", report.as_uri(), tmp_path=tmp_path).stdout
    metrics_table = dom[dom.index('id="metrics"') : dom.index("</table>", dom.index('id="metrics"'))]
    assert "exact_match" in metrics_table and "66.7%" in metrics_table and "<td>3</td>" in metrics_table
    groups = dom[dom.index('data-column="kind"') :]
    assert "<td>plain</td><td>2</td><td>50.0%</td>" in groups and "<td>tricky</td><td>1</td><td>100.0%</td>" in groups
    gallery = dom[dom.index('id="gallery"') :]
    order = [gallery.index(f'data-id="{i}"') for i in ("the-wrong-one", "first-right", "second-right")]
    assert order == sorted(order)
    # A model's output is shown as text, never interpreted as markup.
    assert "&lt;b&gt;green&lt;/b&gt;" in gallery and "<b>green</b>" not in gallery
    assert gallery.count("<img") == 3 and 'src="data:image/png;base64,' in gallery


def test_report_is_self_contained(report):
    text = report.read_text()
    # Nothing to fetch: no scripts, style sheets or images by URL.
    for needle in ("<script", "<link", 'src="http', 'src="file', "url("):
        assert needle not in text, needle
