"""`report.html`: one self-contained page a person can open from disk.

It shows the metrics table, the per-group table and a gallery of samples (image thumbnail, prompt,
prediction, references, scores), the wrong ones first. Thumbnails are embedded as base64 PNG data URIs,
the style sheet is inline, and there is no script, so the file can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .evaluate import EvalResult

THUMBNAIL = 256  # longest side, pixels

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d1d1f;
       background: #ffffff; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; }
.meta { color: #555; font-size: 13px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
.sample { display: flex; gap: 16px; border: 1px solid #d0d0d0; border-radius: 6px; padding: 10px;
          margin: 0 0 10px; max-width: 980px; }
.sample.wrong { border-left: 6px solid #8a1c1c; }
.sample.partial { border-left: 6px solid #a06a00; }
.sample.right { border-left: 6px solid #2b6e2b; }
.images { flex: 0 0 auto; display: flex; flex-direction: column; gap: 6px; }
.images img { min-width: 128px; max-width: 256px; height: auto; image-rendering: pixelated;
              border: 1px solid #d0d0d0; }
.text { flex: 1 1 auto; font-size: 14px; }
.text div { margin: 2px 0 6px; }
.label { color: #666; font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; }
.badge { display: inline-block; font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 10px;
         color: #ffffff; }
.wrong .badge { background: #8a1c1c; } .partial .badge { background: #a06a00; }
.right .badge { background: #2b6e2b; }
.prediction { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; }
"""


def thumbnail_uri(image: Image.Image, size: int = THUMBNAIL) -> str:
    """A PNG data URI of `image`, shrunk (aspect kept) so its longest side is at most `size`."""
    image = image.convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _format(name: str, value) -> str:
    if isinstance(value, float):
        if name in ("loss", "perplexity"):
            return f"{value:.4f}"
        return f"{100 * value:.1f}%"
    return _esc(value)


def primary_metric(result: EvalResult) -> str | None:
    """The metric that decides right and wrong in the gallery: the first text metric asked for."""
    return next((n for n in result.metric_names if n != "loss"), None)


def verdict(score: float | None) -> str:
    if score is None:
        return "unscored"
    return "right" if score >= 1.0 else ("wrong" if score <= 0.0 else "partial")


def _metrics_table(metrics: dict) -> str:
    rows = "".join(
        f"<tr><td>{_esc(name)}</td><td>{_format(name, value)}</td></tr>"
        for name, value in metrics.items()
        if name != "samples"
    )
    return (
        f'<table id="metrics"><tr><th>metric</th><th>value</th></tr>{rows}'
        f"<tr><td>samples</td><td>{metrics.get('samples', 0)}</td></tr></table>"
    )


def _groups_table(groups: dict) -> str:
    if not groups:
        return ""
    parts = ["<h2>By group</h2>"]
    for column, values in groups.items():
        names = [n for n in next(iter(values.values())) if n != "samples"] if values else []
        head = "".join(f"<th>{_esc(n)}</th>" for n in names)
        body = "".join(
            f"<tr><td>{_esc(value)}</td><td>{metrics['samples']}</td>"
            + "".join(f"<td>{_format(n, metrics[n])}</td>" for n in names)
            + "</tr>"
            for value, metrics in values.items()
        )
        parts.append(
            f'<table class="groups" data-column="{_esc(column)}"><tr><th>{_esc(column)}</th><th>samples</th>'
            f"{head}</tr>{body}</table>"
        )
    return "".join(parts)


def gallery_order(result: EvalResult) -> list[int]:
    """Indices of the predictions, worst first by the primary metric (ties keep dataset order)."""
    name = primary_metric(result)
    if name is None:
        return list(range(len(result.predictions)))
    return sorted(range(len(result.predictions)), key=lambda i: result.predictions[i]["scores"][name])


def _card(prediction: dict, thumbnails: list[str], name: str | None) -> str:
    score = prediction["scores"].get(name) if name else None
    kind = verdict(score)
    images = "".join(f'<img alt="sample image" src="{uri}">' for uri in thumbnails)
    references = " | ".join(_esc(r) for r in prediction["references"])
    scores = ", ".join(f"{_esc(k)} {v:.3g}" for k, v in prediction["scores"].items())
    return (
        f'<div class="sample {kind}" data-id="{_esc(prediction["id"])}">'
        f'<div class="images">{images}</div><div class="text">'
        f'<span class="badge">{kind}</span> <span class="meta">id {_esc(prediction["id"])} &middot; {scores}</span>'
        f'<div class="label">prompt</div><div class="prompt">{_esc(prediction["prompt"])}</div>'
        f'<div class="label">prediction</div><div class="prediction">{_esc(prediction["prediction"])}</div>'
        f'<div class="label">reference</div><div class="reference">{references}</div>'
        "</div></div>"
    )


def render_report(
    result: EvalResult,
    load_images: Callable[[int], list[Image.Image]] | None = None,
    title: str = "vlmtune evaluation",
    details: dict | None = None,
    max_samples: int = 100,
) -> str:
    """The report page as a string. `load_images(i)` gives prediction i's images (for thumbnails)."""
    order = gallery_order(result)[:max_samples]
    name = primary_metric(result)
    cards = []
    for i in order:
        thumbnails = [thumbnail_uri(img) for img in load_images(i)] if load_images else []
        cards.append(_card(result.predictions[i], thumbnails, name))
    details = {**(details or {}), "written": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    meta = " &middot; ".join(f"{_esc(k)}: {_esc(v)}" for k, v in details.items() if v)
    shown = f"{len(order)} of {len(result.predictions)} samples"
    ordering = f", wrong first by {_esc(name)}" if name else ""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{_STYLE}</style></head><body>"
        f'<h1>{_esc(title)}</h1><div class="meta">{meta}</div>'
        f"<h2>Metrics</h2>{_metrics_table(result.metrics)}"
        f"{_groups_table(result.groups)}"
        f'<h2>Samples</h2><div class="meta">{shown}{ordering}</div>'
        f'<div id="gallery">{"".join(cards)}</div>'
        "</body></html>\n"
    )


def write_report(result: EvalResult, path: str | Path, preparer=None, **kwargs) -> Path:
    """Write `report.html`; with a `preparer` the samples' images are loaded for thumbnails."""
    load_images = None
    if preparer is not None and result.conversations:

        def load_images(i: int) -> list[Image.Image]:
            return preparer.load_images(result.conversations[i])

    path = Path(path)
    path.write_text(render_report(result, load_images, **kwargs), encoding="utf-8")
    return path
