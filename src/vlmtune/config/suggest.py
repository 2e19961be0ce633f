"""The "did you mean" of every message about a misspelt option name or value."""

from __future__ import annotations

from collections.abc import Mapping
from difflib import get_close_matches


def did_you_mean(word: str, known: list[str], extra: Mapping[str, str] | None = None, dashes: str = "") -> str:
    """ "; did you mean --x or --y?" for a misspelt option name, or "" when nothing is close.

    Close spellings (difflib), options the word begins (`--lora` for `--lora_r`) and initials (`--lr` for
    `--learning_rate`) count; `extra` maps other known names (aliases) to the option each stands for.
    """
    word = word.replace("-", "_").lower()
    names = {name: name for name in known} | dict(extra or {})
    found = get_close_matches(word, list(names), n=3, cutoff=0.75)
    found += [n for n in names if n.startswith(word) and len(word) >= 3]
    found += [n for n in names if len(word) >= 2 and "".join(p[0] for p in n.split("_") if p) == word]
    targets = list(dict.fromkeys(names[n] for n in found))[:3]
    if not targets:
        return ""
    return "; did you mean " + " or ".join(f"{dashes}{t}" for t in targets) + "?"
