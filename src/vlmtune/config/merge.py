"""One value per setting, from the config files and the command line together: where they meet.

Every source (each config file, then the command line) arrives translated (`aliases.translate_given`),
each option with what the user wrote for it. Decisions:

- Within one source, one setting given twice under two names (`lr` and `learning_rate`, `--eval_accuracy
  true` and `--no_eval_accuracy`) with values that differ once converted is a `UsageError` quoting both,
  where each came from and the fix: vlmtune does not guess which was meant. Equal values are fine. The
  very same flag repeated on the command line is an override, as argparse and shell scripts that append
  `$COMMON --learning_rate X` mean it: the later wins, with an INFO line. (A key written twice in one
  config file is refused by `files.py`, with its lines.)
- Across sources the later one wins, whatever name it uses: the command line overrides the config file
  (documented in README.md and docs/troubleshooting.md), a later `--config` file an earlier one; an INFO
  line says what was replaced.
- Meanings that contradict each other: warmup as a fraction (`warmup_ratio`) and as steps, both non-zero;
  `bf16` and `fp16` both on.
- Axolotl's `micro_batch_size` (per device) with `batch_size` (the total per optimizer step): the
  accumulation steps are derived, batch_size / (micro_batch_size x WORLD_SIZE), and must be whole and
  agree with `gradient_accumulation_steps` when that is given too. `batch_size` alone keeps mixtrain's
  and VizSage's meaning, the per-device batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

from ..errors import UsageError
from .aliases import Given, Tokens
from .launch import launched_world_size

logger = logging.getLogger(__name__)

COMMAND_LINE = "command line"
# Keys that only imply a setting: VizSage's `wandb_project` names where W&B would log, and turns W&B on
# when nothing else says; `use_wandb: false` (or `report_to`) beside it is the user's actual choice.
IMPLIED_BY = {"report_to": ("wandb_project",)}
# Axolotl's total batch while it is being settled (not an option: it becomes gradient_accumulation_steps).
TOTAL_BATCH = "batch_size"
PER_DEVICE = "per_device_train_batch_size"
ACCUMULATION = "gradient_accumulation_steps"


class Reader(Protocol):
    """What the parser knows of an option: the field it sets (`--no_eval_accuracy` sets eval_accuracy) and
    what it makes of `--name values` (so 1e-4 equals 0.0001, and "true" equals "1")."""

    def dest(self, name: str) -> str: ...

    def typed(self, name: str, values: tuple[str, ...]) -> object: ...


@dataclass(frozen=True)
class Setting:
    """One option's value and the source it came from: a config file's path, or `COMMAND_LINE`."""

    given: Given
    source: str

    def describe(self) -> str:
        """`lr: 2e-4` (in run.yaml, meaning --learning_rate 2e-4), as the user wrote it and where."""
        g = self.given
        raw = " ".join(g.raw)
        if self.source == COMMAND_LINE:
            text, where = f"--{g.written} {raw}".rstrip(), "on the command line"
        else:
            text, where = f"{g.written}: {raw}", f"in {self.source}"
        meaning = "" if (g.written, g.raw) == (g.name, g.values) else f", meaning --{g.name} {' '.join(g.values)}"
        return f"`{text}` ({where}{meaning.rstrip()})"


def merge(sources: list[tuple[str, list[Given]]], reader: Reader) -> tuple[Tokens, dict[str, Setting]]:
    """The argv to parse (one value per setting) and each setting's `Setting` by the field it sets, from
    `sources` in order (source name, its options); a `UsageError` for two values of one setting within a
    source."""
    sources = _axolotl_total(sources)
    positional: Tokens = []
    settled: dict[str, Setting] = {}
    for source, given in sources:
        positional += [token for g in given if not g.name for token in g.values]
        for field, setting in _one_per_setting(source, [g for g in given if g.name], reader).items():
            earlier = settled.get(field)
            if earlier is not None and _value(reader, earlier) != _value(reader, setting):
                logger.info("%s replaces %s", setting.describe(), earlier.describe())
            settled[field] = setting
    _derive_accumulation(settled, reader)
    _refuse_two_precisions(settled, reader)
    return positional + [token for s in settled.values() for token in s.given.tokens()], settled


def _value(reader: Reader, setting: Setting) -> object:
    return reader.typed(setting.given.name, setting.given.values)


def _one_per_setting(source: str, given: list[Given], reader: Reader) -> dict[str, Setting]:
    """Each setting once: a second value under another name must equal the first (a derived value, or the
    same flag repeated, replaces it)."""
    kept: dict[str, Setting] = {}
    for g in given:
        field = reader.dest(g.name)
        setting, first = Setting(g, source), kept.get(field)
        if first is None or g.derived:
            kept[field] = setting
        elif first.given.written == g.written and _value(reader, first) != _value(reader, setting):
            logger.info("%s replaces %s", setting.describe(), first.describe())  # one flag, repeated: an override
            kept[field] = setting
        else:
            kept[field] = _agreeing(first, setting, reader)
    return kept


def _agreeing(first: Setting, second: Setting, reader: Reader) -> Setting:
    """The one value two mentions of a setting give; a `UsageError` when they differ."""
    name = reader.dest(first.given.name)
    a, b = _value(reader, first), _value(reader, second)
    if a == b:
        return second
    implied = IMPLIED_BY.get(name, ())
    if (first.given.written in implied) != (second.given.written in implied):  # the explicit one says it
        return second if first.given.written in implied else first
    if name == "warmup_steps" and 0 in (a, b):  # no warmup one way, some warmup the other: that one
        return first if b == 0 else second
    if name == "warmup_steps" and "warmup_ratio" in (first.given.written, second.given.written):
        problem = "both set the warmup, as a fraction of the run and as steps: give one (or set the other to 0)"
    else:
        problem = (
            f"set --{name} to different values; vlmtune does not guess which you meant: keep one "
            f"(vlmtune's name for it is {name})"
        )
    raise UsageError(f"{first.describe()} and {second.describe()} {problem}")


def _axolotl_total(sources: list[tuple[str, list[Given]]]) -> list[tuple[str, list[Given]]]:
    """With Axolotl's `micro_batch_size` anywhere, its `batch_size` is the total batch, not per device."""
    written = {g.written for _, given in sources for g in given}
    if "micro_batch_size" not in written:
        return sources

    def relabel(g: Given) -> Given:
        is_total = g.written == TOTAL_BATCH and g.name == PER_DEVICE
        return replace(g, name=TOTAL_BATCH, values=g.raw) if is_total else g

    return [(source, [relabel(g) for g in given]) for source, given in sources]


def _whole(setting: Setting) -> int:
    try:
        number = int(setting.given.values[0])
    except (IndexError, ValueError):
        number = 0
    if number < 1:
        raise UsageError(f"{setting.describe()}: give a whole number of samples, at least 1")
    return number


def _derive_accumulation(settled: dict[str, Setting], reader: Reader) -> None:
    """Axolotl's total batch as accumulation steps: total / (per-device batch x processes), whole."""
    total, micro = settled.pop(TOTAL_BATCH, None), settled.get(PER_DEVICE)
    if total is None or micro is None:  # a command without a training batch (eval reading a training file)
        return
    samples, per_device = _whole(total), _whole(micro)
    world = launched_world_size()
    per_step = per_device * world
    arithmetic = f"{samples} / ({per_device} x {world} process{'es' if world > 1 else ''})"
    if samples % per_step:
        raise UsageError(
            f"{total.describe()} is Axolotl's total batch per optimizer step, {micro.describe()} the batch per "
            f"device: the accumulation steps would be {arithmetic} = {samples / per_step:g}, not a whole "
            f"number. Make batch_size a multiple of {per_step}, or give gradient_accumulation_steps instead"
        )
    steps = samples // per_step
    given = settled.get(ACCUMULATION)
    if given is not None and _value(reader, given) != steps:
        raise UsageError(
            f"{total.describe()} with {micro.describe()} means {arithmetic} = {steps} accumulation steps, "
            f"but {given.describe()} says otherwise: keep gradient_accumulation_steps or batch_size, not both"
        )
    derived = Given(ACCUMULATION, (str(steps),), TOTAL_BATCH, total.given.raw, derived=True)
    settled[ACCUMULATION] = Setting(derived, total.source)
    logger.warning(
        "`--batch_size` (Axolotl) with `--micro_batch_size` is the total batch per optimizer step: vlmtune "
        "trains with --per_device_train_batch_size %d and --gradient_accumulation_steps %d (%s)",
        per_device,
        steps,
        arithmetic,
    )


def _refuse_two_precisions(settled: dict[str, Setting], reader: Reader) -> None:
    """`bf16` and `fp16` both on (e.g. `torch_dtype: float16` with `use_bf16: true`): say which gave each."""
    bf16, fp16 = settled.get("bf16"), settled.get("fp16")
    if bf16 and fp16 and _value(reader, bf16) is True and _value(reader, fp16) is True:
        raise UsageError(
            f"{bf16.describe()} and {fp16.describe()} ask for two mixed precisions: keep one (bf16 on "
            "Ampere or newer GPUs, Gaudi and recent CPUs; fp16 on older GPUs)"
        )
