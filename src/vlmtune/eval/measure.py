"""Measure what vlmtune does with a tiny model of every architecture of transformers' image-text mapping.

For each `model_type` of `AutoModelForImageTextToText`: build a tiny model (its recipe, with the real chat
template, where one exists; else the generic builder, `tiny/generic.py`, with a stand-in template), derive
its family (`family_for`), encode conversations with vlmtune's own collator (single-turn, multi-turn with
a system prompt, text-only, several images where the family takes them), and check that

- the labels are exactly each answer followed by the end of its turn (nothing of prompts, images, padding);
- default LoRA (`apply_finetuning`) adapts every linear layer of the language model except the output
  layer and MoE routers, and nothing in the vision tower or projector, whose weights stay frozen;
- forward and backward run with a finite loss for two optimizer steps.

The outcome is `trains` (every check holds), `refused` (derivation refuses the family, with the reason),
`not buildable here` (the tiny model cannot be made or run on this machine, with why) or `WRONG` (a check
fails, or vlmtune's code crashes: what). Nothing here runs at training time; `main` writes docs/models.md's
"Measured" section (`python -m vlmtune.eval.measure --write docs/models.md`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, BatchFeature, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from ..config import FinetuneArguments
from ..data.collate import VlmCollator, pad_rows
from ..data.encode import IGNORE_INDEX
from ..data.prepare import Preparer
from ..data.schema import detect_schema
from ..errors import DataError
from ..models.catalog import MEASURED_FILE
from ..models.derive import DerivationError, family_for
from ..models.loading import apply_finetuning, language_linears, part_of, with_chat_template
from ..models.registry import FamilySpec, default_chat_template
from ..models.tiny import RECIPES
from ..models.tiny.common import open_zero_paths
from ..models.tiny.generic import NotBuildable, generic_build

OUTCOMES = ("trains", "refused", "not buildable here", "WRONG")

# Architectures measured WRONG whose cause is not fixed yet: model_type -> the bug (tests/test_models_measured.py
# holds each as a strict expected failure, so a fix shows; docs/models.md's table shows them as WRONG).
KNOWN_WRONG: dict[str, str] = {
    "glm4v_moe": "PEFT 0.21 rewrites every gate/up/down_proj LoRA target of MoE models it converts from "
    "transformers v4's layout to the routed experts, on creating and on loading an adapter "
    "(huggingface/peft#3711): vlmtune leaves the dense MLP and shared experts out, with a warning, so that the "
    "adapter reloads as trained; full coverage waits for PEFT's fix",
}
VLMTUNE = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class Measured:
    """What the measurement found for one architecture."""

    model_type: str
    outcome: str
    template: str  # "real" (its recipe's), "GLM-4.1V's" (a relative's), "stand-in" (the generic builder's), "-"
    detail: str


def _image(colour: str, size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _turn(role: str, text: str, images: int = 0) -> dict:
    return {"role": role, "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]}


def rows(multi_image: bool) -> list[dict]:
    """The conversations measured: multi-turn with a system prompt, single-turn, text-only, two images in
    one turn (where the family takes several)."""
    multi_turn = [
        _turn("system", "Answer briefly."),
        _turn("user", "What colour is it?", 1),
        _turn("assistant", "red"),
        _turn("user", "And the second one?", 1),
        _turn("assistant", "a blue circle"),
    ]
    out = [
        {"messages": multi_turn, "images": [_image("red"), _image("blue", (96, 64))]},
        {"messages": [_turn("user", "Shape?", 1), _turn("assistant", "square")], "images": [_image("green")]},
        {"messages": [_turn("user", "Say hello."), _turn("assistant", "hello there")], "images": []},
    ]
    if multi_image:
        two = [_turn("user", "Which is larger?", 2), _turn("assistant", "the left one")]
        out.append({"messages": two, "images": [_image("red"), _image("white", (64, 96))]})
    return [{"__index__": i, **row} for i, row in enumerate(out)]


# The rows a family may refuse with a data error naming the row (its processor takes no text-only
# sample, or one image only): what a user sees is that message, not wrong labels.
OPTIONAL = {2: "text-only rows", 3: "two images in one turn"}


def encoded(collator: VlmCollator, data: list[dict]) -> tuple[list[dict], BatchFeature, list[str]]:
    """The rows the family's processor takes, their padded batch (as the collator makes it), and a note
    for each optional row it refuses."""
    kept, encodings, notes = [], [], []
    for row in data:
        try:
            encodings.append(collator.encode(row))
        except DataError as err:
            if row["__index__"] not in OPTIONAL:
                raise
            notes.append(f"{OPTIONAL[row['__index__']]} refused with a data error ({str(err).split(': ')[-1][:80]})")
            continue
        kept.append(row)
    tokenizer = collator.processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return kept, BatchFeature(pad_rows(encodings, pad, collator.preparer.facts.row_inputs)), notes


def _answers(row: dict, last_only: bool) -> list[str]:
    texts = [m["content"][-1]["text"] for m in row["messages"] if m["role"] == "assistant"]
    return texts[-1:] if last_only else texts


def _runs(labels: list[int]) -> list[list[int]]:
    """The labelled stretches of a row, in order."""
    runs, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = [*runs, current], []
    return runs


def label_problem(tokenizer, spec: FamilySpec, row: dict, labels: list[int]) -> str | None:
    """Why the row's labels are not exactly its answers each followed by an end of turn (None: they are)."""
    ends = [e for e in (*spec.turn_end, tokenizer.eos_token) if e]
    found = [tokenizer.decode(run).strip() for run in _runs(labels)]
    expected = _answers(row, spec.prefix_suffix)
    good = len(found) == len(expected) and all(
        text.startswith(answer) and text[len(answer) :].strip() in ends for text, answer in zip(found, expected)
    )
    return None if good else f"row {row['__index__']}: trained {found!r}, expected {expected!r} each + {ends[0]!r}"


def lora_expected(model: torch.nn.Module, spec: FamilySpec) -> set[str]:
    """The linears default LoRA must adapt: the language model's, bar the output layer and MoE routers."""
    return set(language_linears(model, spec))


def coverage_problem(expected: set[str], tuned: torch.nn.Module, spec: FamilySpec) -> str | None:
    """Why default LoRA (`tuned`, after `apply_finetuning`) adapts other than `expected`, or leaves the
    vision tower or projector trainable (None: it adapts exactly those, and nothing else changes)."""
    adapted = {n.removeprefix("base_model.model.") for n, m in tuned.named_modules() if hasattr(m, "lora_A")}
    gap, outside = sorted(expected - adapted), sorted(adapted - expected)
    if gap:
        return f"coverage gap: {len(gap)} language-model linears not adapted ({', '.join(gap[:3])})"
    if outside:
        return f"adapted outside the language model: {', '.join(outside[:3])}"
    changing = [n.removeprefix("base_model.model.") for n, p in tuned.named_parameters() if p.requires_grad]
    moving = [n for n in changing if ".lora_" not in n and part_of(n, spec) != "language_model"]
    return f"vision tower or projector trainable: {', '.join(moving[:3])}" if moving else None


def train_problem(model: torch.nn.Module, batch) -> str | None:
    """Why two optimizer steps on `batch` fail to give a finite loss and gradients (None: they do)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for step in range(2):
        loss = model(**batch).loss
        if loss is None or not math.isfinite(loss.item()):
            return f"step {step}: loss {None if loss is None else loss.item()}"
        loss.backward()
        if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in params):
            return f"step {step}: no gradient reaches the adapters"
        optimizer.step()
        optimizer.zero_grad()
    return None


def _built(model_type: str) -> tuple[PretrainedConfig, object, str]:
    """(config, processor, template) from the architecture's recipe or the generic builder."""
    recipe = RECIPES.get(model_type) or next(
        (r for r in RECIPES.values() if r.config_cls.model_type == model_type), None
    )
    if recipe is not None:
        config, processor = recipe.build()
        # As loading does: the registry's template where the checkpoints ship none (PaliGemma's).
        template = "real" if recipe.template_of is None else f"{recipe.template_of}'s"
        return config, with_chat_template(processor, default_chat_template(config.model_type)), template
    return (*generic_build(model_type), "stand-in")


def _where(err: BaseException) -> str:
    """'vlmtune' when the innermost frame of `err` is vlmtune's own code (not its tiny builders)."""
    frames = traceback.extract_tb(err.__traceback__)
    last = frames[-1].filename if frames else ""
    return "vlmtune" if last.startswith(VLMTUNE) and "/tiny/" not in last else "transformers"


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}"


def _runs_alone(model, processor, data: list[dict]) -> bool:
    """Whether the tiny model runs on its processor's own output for the same conversations, rendered by
    its chat template (no vlmtune code involved): if not, a crash is the tiny build's, not vlmtune's."""
    texts = [processor.apply_chat_template(row["messages"], tokenize=False) for row in data]
    images = [row["images"] for row in data]
    for given in (images, [image for sample in images for image in sample]):  # nested per sample, or flat
        try:
            inputs = processor(text=texts, images=given or None, padding=True, return_tensors="pt")
            with torch.no_grad():
                model(**inputs)
        except Exception:  # noqa: BLE001, S112 - any failure: try the other layout, else the build does not run
            continue
        return True
    return False


def measure(model_type: str) -> Measured:
    """Build, derive, encode, adapt and train one architecture's tiny model (see the module docstring)."""
    try:
        config, processor, template = _built(model_type)
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config)
    except NotBuildable as err:
        return Measured(model_type, "not buildable here", "-", str(err))
    except ImportError as err:
        return Measured(model_type, "not buildable here", "-", f"needs a library not installed here: {_short(err)}")
    except Exception as err:  # noqa: BLE001 - the tiny build itself failed: say how
        return Measured(model_type, "not buildable here", "-", f"the generic tiny build fails: {_short(err)}")
    return _measure_built(model_type, config, processor, model, template)


def _measure_built(model_type, config, processor, model, template) -> Measured:
    def out(outcome: str, detail: str) -> Measured:
        return Measured(model_type, outcome, template, detail)

    stage = "deriving its family"
    try:
        spec = family_for(config, processor, model=model)
        open_zero_paths(model, spec)
        stage = "encoding"
        collator = VlmCollator(processor, Preparer(detect_schema(["messages", "images"]), spec.encoding))
        data, batch, notes = encoded(collator, rows(spec.multi_image))
        for i, row in enumerate(data):
            problem = label_problem(processor.tokenizer, spec, row, batch["labels"][i].tolist())
            if problem:
                return out("WRONG", f"labels differ: {problem}")
        stage = "applying LoRA"
        expected = lora_expected(model, spec)
        tuned = apply_finetuning(model, spec, FinetuneArguments())
        problem = coverage_problem(expected, tuned, spec)
        if problem:
            return out("WRONG", problem)
        stage = "training"
        problem = train_problem(tuned, batch)
        if problem:
            return out("WRONG", f"training: {problem}")
    except DerivationError as err:
        return out("refused", str(err).split(": ", 1)[1].split("; supply it")[0])
    except Exception as err:  # noqa: BLE001 - classified below: vlmtune's crash, or the tiny build's
        if _where(err) == "vlmtune" or _runs_alone(model, processor, rows(multi_image=True)[:3]):
            return out("WRONG", f"crash while {stage}: {_short(err)}")
        return out(
            "not buildable here", f"the tiny model does not run even on its processor's own output: {_short(err)}"
        )
    detail = f"{len(data)} conversations: labels exact, LoRA on every language-model linear, vision frozen"
    return out("trains", "; ".join([detail, *notes]))


def measure_all(types: list[str] | None = None, progress: Callable[[Measured], None] | None = None) -> list[Measured]:
    """Measure every architecture of the mapping (or `types`), sorted by model_type."""
    logging.disable(logging.WARNING)  # derived families describe themselves; not wanted 100 times
    try:
        found = []
        for model_type in sorted(types or MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
            found.append(measure(model_type))
            if progress:
                progress(found[-1])
        return found
    finally:
        logging.disable(logging.NOTSET)


BEGIN, END = "<!-- vlmtune measured: begin -->", "<!-- vlmtune measured: end -->"
COMMAND = "python -m vlmtune.eval.measure --write docs/models.md"


def counts(found: list[Measured]) -> dict[str, int]:
    outcomes = [m.outcome for m in found]
    return {outcome: outcomes.count(outcome) for outcome in OUTCOMES}


def as_markdown(found: list[Measured], date: str | None = None) -> str:
    """The "Measured" section's body: date, transformers version, counts and one row per architecture."""
    tally = ", ".join(f"{n} {outcome}" for outcome, n in counts(found).items())
    lines = [
        f"Measured on {date or datetime.date.today().isoformat()} with transformers {transformers.__version__} "
        f"({len(found)} architectures: {tally}); regenerate with `{COMMAND}`.",
        "",
        "| `model_type` | outcome | template | detail |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| `{m.model_type}` | {m.outcome} | {m.template} | {m.detail.replace('|', '/')} |" for m in found]
    return "\n".join(lines)


def read_section(text: str) -> dict[str, tuple[str, str]]:
    """The documented outcome and template per model_type, from a docs page holding the section."""
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = [line.split(" | ") for line in body.splitlines() if line.startswith("| `")]
    return {row[0].strip("| `"): (row[1], row[2]) for row in rows if row[1] in OUTCOMES}


def write_section(path: Path, found: list[Measured]) -> None:
    """Replace the text between the section's markers in `path` with a fresh measurement."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{as_markdown(found)}\n{END}{tail}")


def write_outcomes(found: list[Measured], path: Path = MEASURED_FILE) -> None:
    """What `vlmtune models` reads to add the measurement to derived architectures' verdicts."""
    outcomes = {m.model_type: m.outcome for m in found}
    path.write_text(json.dumps({"transformers": transformers.__version__, "outcomes": outcomes}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    """`python -m vlmtune.eval.measure [--write docs/models.md] [model_type ...]`: print or write."""
    parser = argparse.ArgumentParser(prog="python -m vlmtune.eval.measure", description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, help="a docs page with the measured section's markers to rewrite")
    parser.add_argument("model_types", nargs="*", help="only these (default: every architecture of the mapping)")
    args = parser.parse_args(argv)
    found = measure_all(args.model_types or None)
    if args.write:
        write_section(args.write, found)
        if not args.model_types:
            write_outcomes(found)
    else:
        print(as_markdown(found))


if __name__ == "__main__":
    main()
