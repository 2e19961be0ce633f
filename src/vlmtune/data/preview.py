"""`vlmtune data inspect`: the first samples exactly as the model will see them, before any GPU hour.

Each sample goes through the same path as training (schema, images, `encode.encode`: chat template,
processor, labels); the trained spans are highlighted in the rendered text, in colour on a terminal
and between ``[[`` and ``]]`` otherwise. Every sample of the shown split is checked and summarised
(schema, skipped rows and why, token lengths). Bad samples are reported rather than stopping the command, whatever
`--on_bad_sample` says, because finding them is the point.
"""

from __future__ import annotations

import dataclasses
import sys
from itertools import islice
from typing import TextIO

from ..errors import UsageError
from .encode import EncodingFacts, Rendered, encode
from .prepare import CUT, Preparer
from .splits import Splits, build_splits

COLOUR = ("\x1b[1;32m", "\x1b[0m")
BRACKETS = ("[[", "]]")


def highlight(rendered: Rendered, marks: tuple[str, str]) -> str:
    """The rendered text with each trained span wrapped in `marks`."""
    pieces, cursor = [], 0
    for start, end in rendered.spans:
        pieces += [rendered.text[cursor:start], marks[0], rendered.text[start:end], marks[1]]
        cursor = end
    return "".join(pieces) + rendered.text[cursor:]


def inspect_sample(processor, preparer: Preparer, row: dict, train_on_prompt: bool) -> tuple:
    """(conversation, images as read, images as fitted, encoding) of one row, through training's path."""
    conv = preparer.conversation(row, row["__index__"])
    raw = preparer.open_images(conv)
    fitted = [preparer.images.fit(image) for image in raw]
    return conv, raw, fitted, encode(processor, conv, fitted, preparer.facts, train_on_prompt)


def describe_sample(processor, preparer: Preparer, row: dict, marks: tuple[str, str], train_on_prompt: bool) -> str:
    """One sample: where it came from, image sizes before/after resizing, token counts, highlighted text."""
    conv, raw, fitted, encoded = inspect_sample(processor, preparer, row, train_on_prompt)
    image_id = processor.tokenizer.convert_tokens_to_ids(preparer.facts.image_token)
    trained = sum(label != -100 for label in encoded.labels)
    lines = [f"== {conv.meta['source']}, row {conv.meta['row']} =="]
    for i, (before, after) in enumerate(zip(raw, fitted)):
        lines.append(f"image {i}: {before.width}x{before.height} -> {after.width}x{after.height}")
    lines.append(
        f"tokens: {len(encoded.input_ids)} total, {encoded.input_ids.count(image_id)} image, {trained} trained"
    )
    if row.get(CUT):
        lines.append(f"(prompt shortened by {row[CUT]} characters to fit --max_seq_length)")
    lines.append(highlight(encoded.rendered, marks))
    return "\n".join(lines)


def inspect_data(processor, facts: EncodingFacts, data_args, args, out: TextIO | None = None) -> Splits:
    """Print the first `args.num_examples` samples of `args.inspect_split` and the check's summary; return
    the splits. `args` are the command's `InspectArguments` (`config/arguments.py`).

    `processor` and `facts` are the model's (the command loads them), so data/ never loads a model itself."""
    # Show the training data in file order: no hold-out unless the held-out split is what is shown.
    hold_out = data_args.val_split_ratio if args.inspect_split == "eval" else 0.0
    data_args = dataclasses.replace(data_args, on_bad_sample="skip", val_split_ratio=hold_out)
    splits = build_splits(data_args, facts, need_train=False, processor=processor)
    rows = {"train": splits.train, "eval": splits.eval, "test": splits.test}.get(args.inspect_split)
    if rows is None:
        raise UsageError(f"vlmtune data inspect: no {args.inspect_split!r} split (have: {', '.join(splits.reports)})")
    out = out or sys.stdout
    tty = out.isatty() if args.color == "auto" else args.color == "always"
    print(splits.schema.describe(), file=out)
    for row in islice(rows, args.num_examples):
        print(
            describe_sample(processor, splits.preparer, row, COLOUR if tty else BRACKETS, data_args.train_on_prompt),
            file=out,
        )
    print("== summary ==", file=out)
    print(splits.summary(), file=out)
    return splits
