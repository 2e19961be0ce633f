"""The errors a user can fix, and the exit code each one ends the command with.

Everything vlmtune raises for a mistake in what the user gave it (flags, config files, data, model and
output paths) is a `VlmtuneError`. The command line's one error boundary (`cli.main`) prints such an
error as a message and exits with its `exit_code`; any other exception is a bug and keeps its traceback.
They subclass `ValueError` so library callers that catch `ValueError` keep working.
"""

from __future__ import annotations


class VlmtuneError(ValueError):
    """A failure the user can fix; the message says what, where, and how."""

    exit_code = 1


class UsageError(VlmtuneError):
    """A bad flag, config key or value (exit code 2, as argparse uses for usage errors)."""

    exit_code = 2


class DataError(VlmtuneError):
    """Bad input data; the message names the file, row and field."""


class ModelError(VlmtuneError):
    """A model, processor or adapter that cannot be found or loaded."""


class OutputError(VlmtuneError):
    """An output folder vlmtune refuses to write into (it would lose the user's files)."""


class RunError(VlmtuneError):
    """Training or evaluation cannot go on (diverged, interrupted, nothing to resume from)."""


class HubError(VlmtuneError):
    """An upload to (or download from) the Hugging Face hub that cannot work here: offline, no token, no
    network, no write access. The message says what was asked, why, and the fix."""
