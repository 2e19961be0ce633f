"""The parser of every command: transformers' `HfArgumentParser` over the command's dataclasses, with
config files, other tools' option names, value checks and messages that name the flag (or the file and
key) and suggest a close name.

A command hands `parse_args` its dataclasses; everything else here is shared, so a new command is one more
dataclass (e.g. `parse_args(argv, (*TRAINING_ARGUMENTS, DpoArguments))`).
"""

from __future__ import annotations

import argparse
import re
from argparse import ArgumentError
from collections.abc import Mapping

from transformers import HfArgumentParser, TrainingArguments

from .. import compat
from ..errors import UsageError
from . import aliases
from .arguments import TRAINING_ARGUMENTS
from .checks import check_values, checks_for
from .files import file_to_argv, read_config_file, take_config_files
from .launch import prepare_launch_environment, resolve_launch_shortcuts
from .merge import COMMAND_LINE, Setting, merge
from .suggest import did_you_mean


class VlmArgumentParser(HfArgumentParser):
    """`HfArgumentParser` that never guesses and never exits: no prefix matching (`--learning_rat` is not
    `--learning_rate`), and every mistake is a `UsageError` naming the flag, or the config file and key
    the value came from, with a "did you mean" for misspelt names.

    `extra_names` maps other names users may type (aliases) to our option names, for the suggestions.
    """

    def __init__(self, classes, extra_names: Mapping[str, str] | None = None, **kwargs):
        super().__init__(classes, allow_abbrev=False, exit_on_error=False, **kwargs)
        self.extra_names = dict(extra_names or {})
        self.settled: dict[str, Setting] = {}  # field name -> its value and where it came from
        checks = checks_for(classes if isinstance(classes, (list, tuple)) else (classes,))
        for action in self._actions:
            if action.dest in checks and action.help and action.option_strings:
                action.help += f" [{checks[action.dest].describe()}]"

    def option_names(self) -> list[str]:
        """Every option name without dashes (`learning_rate`, `no_eval_accuracy`, ...)."""
        return sorted({o.lstrip("-") for o in self._option_string_actions if o.startswith("--") and "-" not in o[2:]})

    def where(self, name: str) -> str:
        """How to name an option to the user: its config file and key, or its flag, as the user wrote it."""
        setting = self.settled.get(name)
        written = setting.given.written if setting and not setting.given.derived else name
        if setting is None or setting.source == COMMAND_LINE:
            return f"--{written}"
        return f"{setting.source}: key {written!r}"

    def dest(self, name: str) -> str:
        """The field `--name` sets (`--no_eval_accuracy` sets eval_accuracy); the name itself if unknown."""
        action = self._option_string_actions.get(f"--{name}")
        return action.dest if action is not None else name

    def typed(self, name: str, values: tuple[str, ...]) -> object:
        """What parsing `--name values` gives (1e-4 and 0.0001 are one value); the text itself where the
        option is not ours or the text is not a value of its type (parsing then names that mistake)."""
        action = self._option_string_actions.get(f"--{name}")
        if action is None:
            return values
        if not values:
            return action.const
        convert = action.type if callable(action.type) else str
        try:
            items = tuple(convert(v) for v in values)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            return values
        return items[0] if len(items) == 1 and action.nargs in (None, "?") else items

    def error(self, message: str):
        """argparse calls this for the errors it does not raise (required options); never exit."""
        raise UsageError(f"{message}; `{self.prog} --help` lists the options")

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parse, with its errors and any unknown option turned into a `UsageError`."""
        try:
            namespace, remaining = super().parse_known_args(args, namespace)
        except ArgumentError as err:
            name = (err.argument_name or "").split("/")[0].lstrip("-")
            where = self.where(name) if name else "arguments"
            hint = self._hint(name, err.message)
            raise UsageError(f"{where}: {err.message}{hint}") from None
        if remaining:
            raise UsageError(self.unknown_message(remaining))
        return namespace, remaining

    def _hint(self, name: str, message: str) -> str:
        """What to add to argparse's own message: a close choice, or how to pass a value starting with '-'."""
        if "expected one" in message:
            return f" (a value that starts with '-' goes as --{name}=VALUE)"
        value = re.search(r"invalid choice: '([^']*)'", message)
        action = self._option_string_actions.get(f"--{name}")
        if value and action is not None and action.choices:
            return did_you_mean(value.group(1), [str(c) for c in action.choices])
        return ""

    def unknown_message(self, remaining: list[str]) -> str:
        flags = [a for a in remaining if a.startswith("--") or (a.startswith("-") and not _is_number(a))]
        if not flags:
            return (
                f"unexpected argument {remaining[0]!r}: options are given as --name value "
                f"(e.g. --dataset_name {remaining[0]}); `{self.prog} --help` lists them"
            )
        name = flags[0].split("=", 1)[0].lstrip("-")
        hint = did_you_mean(name, self.option_names(), self.extra_names, "--")
        return f"unknown option --{name}{hint or f'; `{self.prog} --help` lists the options'}"

    def check_keys(self, path: str, keys) -> None:
        """Refuse a config file key that is not an option, naming the file and key."""
        known = self.option_names()
        for key in keys:
            if str(key).replace("-", "_") not in known:
                hint = did_you_mean(str(key), known, self.extra_names)
                raise UsageError(f"{path}: unknown key {key!r}{hint or f'; `{self.prog} --help` lists the options'}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the epilog (other tools' option names) kept as written."""


def make_parser(classes=TRAINING_ARGUMENTS, **kwargs) -> VlmArgumentParser:
    kwargs.setdefault("epilog", aliases.help_epilog())
    kwargs.setdefault("formatter_class", HelpFormatter)
    return VlmArgumentParser(classes, **kwargs)


def parse_args(
    argv: list[str], classes=TRAINING_ARGUMENTS, prog: str | None = None, extra_names: Mapping[str, str] | None = None
) -> tuple:
    """Parse `argv` into the argument objects; a leading `.yaml`/`.yml`/`.json` path (or `--config FILE`)
    supplies defaults. Other tools' option names are translated first (`aliases`, one warning per name),
    then files and command line become one value per setting (`merge`: the command line overrides a file,
    two values within one are refused); every mistake is a `UsageError` naming the flag, or the file and
    key; `extra_names` (other names -> option names) widen the "did you mean" suggestions beyond the alias
    table."""
    argv = list(argv)
    parser = make_parser(classes, prog=prog, extra_names={**aliases.suggestion_names(), **(extra_names or {})})
    known = set(parser.option_names())
    train_known = known if classes is TRAINING_ARGUMENTS else set(make_parser().option_names())
    warned: set[str] = set()  # each foreign name is explained once per run
    sources: list[tuple[str, list[aliases.Given]]] = []
    for path in take_config_files(argv):
        values = read_config_file(path)
        # Foreign keys are translated below; a training config's own keys are dropped for other commands.
        parser.check_keys(path, [k for k in values if str(k) not in aliases.BY_NAME and str(k) not in train_known])
        given = aliases.translate_given(file_to_argv(values), known, warned)
        sources.append((path, aliases.shared_config(given, known, train_known, path)))
    sources.append((COMMAND_LINE, aliases.translate_given(argv, known, warned)))
    tokens, parser.settled = merge(sources, parser)
    # Before TrainingArguments: it opens the DeepSpeed/FSDP files and sets up the process group.
    args = resolve_launch_shortcuts(tokens)
    prepare_launch_environment()
    try:
        parsed = parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)
    except UsageError:
        raise
    except ValueError as err:  # TrainingArguments' own checks (in its __post_init__)
        message = " ".join(str(err).split())  # one paragraph, whatever transformers' line breaks
        raise UsageError(f"{message} (`{parser.prog} --help` lists the options)") from None
    check_values(parsed, parser.where)
    for obj in parsed:  # what the user wrote, before transformers sets do_eval from --eval_strategy
        if isinstance(obj, TrainingArguments):
            obj.do_train_given, obj.do_eval_given = compat.given_bools(args, ("do_train", "do_eval"))
    return parsed
