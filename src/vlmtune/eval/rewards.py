"""The rewards of `vlmtune grpo`: vlmtune's answer metrics, an end-of-turn format reward, or the user's function.

Every reward is called by TRL's `GRPOTrainer` once per batch of completions, with the rows' columns
repeated per completion (`data/prompts.py`), and returns one score per completion. What a reward sees:

- `completions`: each completion's decoded text, without the end-of-turn marker, surrounding whitespace
  stripped (as evaluation compares answers);
- `answers`: the row's reference answer, one per completion (row-aligned with `completions`);
- `prompts`: the row's question (the text of its last user turn);
- keyword arguments: `references` (every acceptable answer of the row), `images` (the row's PIL images),
  `row` and `source` (where the row came from), `completion_ids` (the generated token ids, end-of-turn
  included when the completion reached it), `trainer_state`, and TRL's `log_metric` / `log_extra`.

A user function (`--reward my_rewards.py:score`) has that signature (`USER_SIGNATURE`); one that raises,
or returns something other than one number per completion, stops the run with a message naming the
function and the row it failed on.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import did_you_mean
from ..data.conversation import text_of
from ..errors import UsageError
from .metrics import anls, exact_match, relaxed_accuracy, token_f1

USER_SIGNATURE = "score(completions: list[str], answers: list[str], prompts: list[str], **kwargs) -> list[float]"

# `--reward NAME`: the answer metrics of eval/metrics.py, (completion, references) -> score in [0, 1].
ANSWER_REWARDS: dict[str, Callable[[str, list[str]], float]] = {
    "exact_match": exact_match,
    "relaxed_accuracy": relaxed_accuracy,
    "anls": anls,
    "f1": token_f1,
}
FORMAT = "format"


def completion_text(completion) -> str:
    """One TRL completion as text: conversational ones are a list holding the assistant's message."""
    if isinstance(completion, list):
        return "".join(text_of(message) for message in completion).strip()
    return str(completion).strip()


def _where(kwargs: dict, i: int) -> str:
    """File and row of completion `i`, for messages."""
    rows, sources = kwargs.get("row") or [], kwargs.get("source") or []
    row = rows[i] if i < len(rows) else "?"
    return f"{sources[i] if i < len(sources) else 'dataset'}, row {row}"


class AnswerReward:
    """An answer metric as a reward: each completion scored against its row's references."""

    def __init__(self, name: str):
        self.__name__ = name
        self.metric = ANSWER_REWARDS[name]

    def __call__(self, prompts, completions, references: Sequence[list[str]], **kwargs) -> list[float]:
        return [self.metric(completion_text(c), list(refs)) for c, refs in zip(completions, references)]


class FormatReward:
    """1 for a completion that ends its turn itself (its last token is an end-of-turn id: generation stopped
    there, not at --max_completion_length), else 0. Nothing follows the end of turn: TRL cuts it there."""

    __name__ = FORMAT

    def __init__(self, end_of_turn_ids: Sequence[int]):
        self.end_of_turn_ids = set(end_of_turn_ids)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [float(bool(ids) and ids[-1] in self.end_of_turn_ids) for ids in completion_ids]


class UserReward:
    """The user's function, called with texts (see the module docstring); its failures name the function
    and the row."""

    def __init__(self, function: Callable, label: str):
        self.function, self.label = function, label
        self.__name__ = getattr(function, "__name__", label)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = [completion_text(c) for c in completions]
        answers, questions = kwargs.pop("answer"), kwargs.pop("question")
        try:
            scores = self.function(texts, list(answers), list(questions), **kwargs)
        except Exception as err:  # noqa: BLE001 - the user's code: any failure is theirs to fix
            raise self._failure(err, texts, answers, questions, kwargs) from err
        return self._checked(scores, texts, kwargs)

    def _failure(self, err: Exception, texts, answers, questions, kwargs) -> UsageError:
        """The message for a call that raised: the first row that raises alone, called one completion at a time."""
        for i in range(len(texts)):
            one = {k: [v[i]] if isinstance(v, list) and len(v) == len(texts) else v for k, v in kwargs.items()}
            try:
                self.function([texts[i]], [answers[i]], [questions[i]], **one)
            except Exception as single:  # noqa: BLE001
                return self._error(f"raised {type(single).__name__}: {single}", texts, kwargs, i)
        return UsageError(
            f"--reward {self.label} raised {type(err).__name__}: {err} on a batch of {len(texts)} completions "
            f"({_where(kwargs, 0)} to {_where(kwargs, len(texts) - 1)}), though on none of them alone"
        )

    def _error(self, problem: str, texts, kwargs, i: int) -> UsageError:
        return UsageError(
            f"--reward {self.label} {problem} for {_where(kwargs, i)} (completion {texts[i]!r}); a reward is "
            f"{USER_SIGNATURE}"
        )

    def _checked(self, scores, texts, kwargs) -> list[float]:
        """`scores` as floats, one per completion (None allowed: TRL skips that reward for the completion)."""
        if not isinstance(scores, Sequence) or isinstance(scores, str) or len(scores) != len(texts):
            size = len(scores) if isinstance(scores, Sequence) else type(scores).__name__
            return_problem = f"returned {size} for {len(texts)} completions; it must return one number per completion"
            raise UsageError(f"--reward {self.label} {return_problem}; a reward is {USER_SIGNATURE}")
        out = []
        for i, score in enumerate(scores):
            if score is None:
                out.append(None)
                continue
            try:
                value = float(score)
            except (TypeError, ValueError):
                raise self._error(f"returned {score!r}, not a number,", texts, kwargs, i) from None
            if not math.isfinite(value):
                raise self._error(f"returned {value}", texts, kwargs, i)
            out.append(value)
        return out


def load_user_function(spec: str) -> Callable:
    """`FILE.py:NAME` imported: the function NAME of the Python file FILE.py."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text).expanduser()
    if not path_text or not name or path.suffix != ".py":
        raise UsageError(f"--reward {spec}: give a built-in reward or FILE.py:FUNCTION (e.g. my_rewards.py:score)")
    if not path.is_file():
        raise UsageError(f"--reward {spec}: no such file {path}")
    module_name = f"vlmtune_user_reward_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataloader workers and pickling find it again
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file
        raise UsageError(f"--reward {spec}: importing {path} failed: {type(err).__name__}: {err}") from err
    function = getattr(module, name, None)
    if not callable(function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        what = "is not a function" if function is not None else "is not defined there"
        raise UsageError(f"--reward {spec}: {name} {what}; functions in {path.name}: {', '.join(found) or 'none'}")
    return function


def build_rewards(names: Sequence[str], end_of_turn_ids: Sequence[int]) -> list[Callable]:
    """The reward callables for `--reward` (built-in names, or FILE.py:NAME)."""
    rewards: list[Callable] = []
    for name in names:
        if name in ANSWER_REWARDS:
            rewards.append(AnswerReward(name))
        elif name == FORMAT:
            rewards.append(FormatReward(end_of_turn_ids))
        elif ":" in name:
            rewards.append(UserReward(load_user_function(name), name))
        else:
            known = [*ANSWER_REWARDS, FORMAT]
            hint = did_you_mean(name, known)
            raise UsageError(
                f"--reward {name}: not a reward; choose from {', '.join(known)}, or give FILE.py:FUNCTION{hint}"
            )
    return rewards
