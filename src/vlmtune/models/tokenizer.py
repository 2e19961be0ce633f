"""A small byte-level BPE tokenizer trained offline, for tiny test and demo models.

Real checkpoints ship their own tokenizer; tiny models need one that behaves like theirs (byte-level,
special tokens atomic, chat-template friendly) without any download. We train one in well under a
second on text that is always on disk: the Python standard library's own sources plus a few words the
bundled demo uses.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen2 / Llama-3 style split: newlines form their own pre-tokens, so "\n\n" before an answer
# tokenises the same as "\n\n" alone (a GPT-2 style split breaks prompt/answer label masking).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_EXTRA_TEXT = (
    "red green blue yellow purple orange white black cyan magenta square circle triangle "
    "What colour is the shape? What shape is shown? Answer with one word. Describe the image. "
    "user assistant system You are a helpful assistant."
)


def _training_text(max_files: int = 120) -> list[str]:
    """Return deterministic training text from the standard library's sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:max_files]
    texts = [f.read_text(encoding="utf-8", errors="ignore") for f in files]
    return texts + [_EXTRA_TEXT] * 50


@functools.lru_cache(maxsize=8)
def _train_bpe(vocab_size: int) -> str:
    """Train the shared BPE once per vocab size and return it serialised (cheap to copy)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(
    special_tokens: dict[str, str],
    extra_special_tokens: list[str] = (),
    chat_template: str | None = None,
    vocab_size: int = 1024,
    named_tokens: dict[str, str] | None = None,
    **init_kwargs,
) -> PreTrainedTokenizerFast:
    """Build a fast tokenizer with the given role tokens (bos/eos/pad/unk) and extra atomic tokens.

    `special_tokens` maps transformers' names (``bos_token``, ``eos_token``, ``pad_token``...) to token
    strings; `extra_special_tokens` are family tokens such as ``<|image_pad|>`` that must never split;
    `named_tokens` are special tokens the processor reads as tokenizer attributes (Gemma 3's
    ``boi_token``, say).
    """
    tok = Tokenizer.from_str(_train_bpe(vocab_size))
    if named_tokens:
        init_kwargs["extra_special_tokens"] = dict(named_tokens)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens, **init_kwargs)
    extras = [t for t in extra_special_tokens if t not in special_tokens.values()]
    if extras:
        fast.add_special_tokens({"additional_special_tokens": extras})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
