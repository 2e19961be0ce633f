"""Check samples before they reach the model: bad ones stop the run or are skipped, over-long ones are
shortened from the prompt side or skipped, and every decision is counted for the run's report.

Every row goes through the same encoding path as training (`encode.render_row`: conversation, chat
template, trained spans), so template errors and image/placeholder mismatches are found before the
first step, naming file, row and field. Kept fast: images are opened for their header only (size, EXIF
orientation), and each image's token count comes from the processor's own arithmetic
(`_get_num_multimodal_tokens`) instead of running the image processor. With `--max_seq_length`, a
row whose estimate is clearly within the limit is kept on the estimate; only rows near or over it (and
rows of processors without that arithmetic) go through the full processor for their exact length.

Non-streaming data is checked in one pass before training, so a bad row at 90% cannot end a run hours
in; streaming data is checked lazily by the same function as it is read. The pass stores nothing but how
many prompt characters to cut (`__cut__`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import datasets

from ..errors import UsageError
from .conversation import Conversation
from .encode import encode, render_row, token_ids
from .prepare import CUT, LENGTH, Preparer
from .schema import DataError, cut_prompt, user_text
from .sources import INDEX, Rows

MAX_REASONS = 5
SKIP = -1
# How far below the exact length an estimate may be: tokens per image (Gemma 3's newlines and end-of-image
# marker) and per row (PaliGemma's BOS, separator and EOS). tests/test_data_checks.py holds every family to it.
ESTIMATE_MARGIN = (8, 4)


@dataclass
class CheckReport:
    """What the check did to one split."""

    split: str
    rows: int = 0
    bad: int = 0
    too_long: int = 0
    shortened: int = 0
    reasons: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    # Per kept row, in order: the most tokens it can take (exact where measured, else the estimate plus
    # what an estimate may miss); stored as the `LENGTH` column for packing and length-grouped batches.
    bounds: list[int] = field(default_factory=list)
    lazy: bool = False
    estimated: bool = False

    @property
    def kept(self) -> int:
        return self.rows - self.bad - self.too_long

    def skip(self, reason: str) -> int:
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)
        return SKIP

    def summary(self) -> str:
        if self.lazy and not self.rows:
            return f"{self.split}: streamed; samples are checked as they are read"
        parts = [f"{self.split}: {self.kept} of {self.rows} samples kept"]
        if self.bad:
            parts.append(f"{self.bad} bad samples skipped")
        if self.shortened:
            parts.append(f"{self.shortened} shortened from the prompt side to fit --max_seq_length")
        if self.too_long:
            parts.append(f"{self.too_long} longer than --max_seq_length skipped")
        if self.lengths:
            median = statistics.median(self.lengths)
            how = " (estimated from image sizes)" if self.estimated else ""
            parts.append(f"tokens min/median/max {min(self.lengths)}/{median:g}/{max(self.lengths)}{how}")
        return "; ".join(parts) + "".join(f"\n  skipped: {r}" for r in self.reasons)


@dataclass
class Checker:
    """Renders each row as training will and decides: keep (cutting how much prompt), or skip.

    Without a processor only conversion and images are checked (no lengths).
    """

    preparer: Preparer
    processor: object | None = None
    max_seq_length: int | None = None
    on_bad_sample: str = "error"
    train_on_prompt: bool = False

    def __post_init__(self) -> None:
        if self.on_bad_sample not in ("error", "skip"):
            raise UsageError(f"--on_bad_sample must be error or skip, not {self.on_bad_sample!r}")

    def check(self, row: dict, report: CheckReport) -> int:
        """Characters to cut from the start of the prompt (0: fits as is), or `SKIP`."""
        report.rows += 1
        try:
            conv = self.preparer.conversation(row, row.get(INDEX, report.rows - 1))
            sizes = self.preparer.image_sizes(conv)
            if self.processor is None:
                return 0
            estimate, counted = self._estimate(conv, sizes)  # (not counted: one token per image)
            if self.max_seq_length is None or (counted and self._surely_fits(estimate, len(sizes))):
                report.estimated = True
                report.lengths.append(estimate)
                report.bounds.append(self._bound(estimate, len(sizes)))
                return 0
            images = self.preparer.load_images(conv)
            length = self._length(conv, images)
        except DataError as err:
            if self.on_bad_sample == "error":
                raise DataError(f"{err}\n(pass --on_bad_sample skip to drop bad samples instead)") from err
            report.bad += 1
            return report.skip(str(err))
        if length <= self.max_seq_length:
            report.lengths.append(length)
            report.bounds.append(length)
            return 0
        cut, length = self._shorten(conv, images, length)
        if cut == SKIP:
            report.too_long += 1
            return report.skip(
                f"{conv.where}: {length} tokens; cutting the prompt cannot fit --max_seq_length {self.max_seq_length}"
            )
        report.shortened += 1
        report.lengths.append(length)
        report.bounds.append(length)
        return cut

    def estimate(self, conv: Conversation, sizes: list[tuple[int, int]]) -> int:
        """The row's token count without running the image processor (see `_estimate`)."""
        return self._estimate(conv, sizes)[0]

    def _estimate(self, conv: Conversation, sizes: list[tuple[int, int]]) -> tuple[int, bool]:
        """The row's token count without running the image processor, and whether its images' tokens
        were counted; a placeholder count that does not match the images is a `DataError`.

        Text tokens come from the chat-template text; each image's tokens from the processor's own
        arithmetic on the image size where transformers has it, else one token (Mllama's, which reads
        images by cross-attention, is exactly that).
        """
        facts = self.preparer.facts
        rendered = render_row(self.processor, conv, facts, self.train_on_prompt)
        ids = self.processor.tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"]
        placeholder = token_ids(self.processor, [facts.image_placeholder])
        found = sum(tok in placeholder for tok in ids)
        if placeholder and found != len(sizes):  # (a placeholder the tokenizer lacks cannot be counted)
            raise DataError(
                f"{self.preparer.where(conv)}: the chat template wrote {found} image placeholder(s) "
                f"({facts.image_placeholder}) for {len(sizes)} image(s); every image needs its placeholder"
            )
        tokens = self._image_tokens(sizes)
        return len(ids) - found + (len(sizes) if tokens is None else sum(tokens)), tokens is not None

    def _surely_fits(self, estimate: int, images: int) -> bool:
        """Whether a row fits `max_seq_length` whatever the estimate missed (tokens the processor adds
        around each image or to the row); without the processor's arithmetic, only the exact length tells."""
        if images and getattr(self.processor, "_get_num_multimodal_tokens", None) is None:
            return False
        return self._bound(estimate, images) <= self.max_seq_length

    def _bound(self, estimate: int, images: int) -> int:
        """The most tokens a row with this estimate can take (unknown without the processor's arithmetic:
        the estimate then counts one token per image, so the bound is as rough as the estimate)."""
        return estimate + ESTIMATE_MARGIN[0] * images + ESTIMATE_MARGIN[1]

    def _image_tokens(self, sizes: list[tuple[int, int]]) -> list[int] | None:
        """Each image's tokens by the processor's arithmetic; None where it has none that works for these
        images (LLaVA's reads a `crop_size` that SigLIP image processors lack): only the exact length tells."""
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if not sizes:
            return []
        if count is None:
            return None
        try:
            return list(count(image_sizes=[(h, w) for w, h in sizes]).num_image_tokens)
        except (AttributeError, KeyError, TypeError, ValueError):  # a processor without the helper's inputs
            return None

    def _length(self, conv: Conversation, images: list) -> int:
        return encode(self.processor, conv, images, self.preparer.facts, self.train_on_prompt).length

    def _shorten(self, conv: Conversation, images: list, length: int) -> tuple[int, int]:
        """Cut prompt text from the start until the sample fits; images and answers are never cut.

        Token boundaries shift when text is cut, so the cut is re-measured and extended a few times.
        A sample whose prompt would vanish entirely is skipped instead.
        """
        text, cut = user_text(conv), 0
        for _ in range(4):
            offsets = self.processor.tokenizer(text[cut:], add_special_tokens=False, return_offsets_mapping=True)
            excess = length - self.max_seq_length
            if excess >= len(offsets["offset_mapping"]):
                return SKIP, length
            cut += offsets["offset_mapping"][excess][0]
            length = self._length(cut_prompt(conv, cut), images)
            if length <= self.max_seq_length:
                return cut, length
        return SKIP, length


def check_rows(rows: Rows, checker: Checker, split: str) -> tuple[Rows, CheckReport]:
    """Check `rows` now (a `Dataset`) or as they stream (an `IterableDataset`); drop skipped rows."""
    report = CheckReport(split, lazy=isinstance(rows, datasets.IterableDataset))
    if report.lazy:
        checked = rows.map(lambda row: {CUT: checker.check(row, report)})
        return checked.filter(lambda row: row[CUT] != SKIP), report
    cuts = [checker.check(row, report) for row in rows]
    if any(c > 0 for c in cuts):
        rows = rows.add_column(CUT, cuts)
    keep = [i for i, c in enumerate(cuts) if c != SKIP]
    if not keep:
        raise DataError(f"no usable samples left in the {report.summary()}")
    rows = rows.select(keep) if len(keep) < len(rows) else rows
    if len(report.bounds) == len(keep):  # measured (a checker with a processor): one bound per kept row
        rows = rows.add_column(LENGTH, report.bounds)
    return rows, report
