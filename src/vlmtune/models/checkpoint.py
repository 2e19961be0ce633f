"""Say plainly why a model or adapter cannot be loaded, instead of a hub lookup traceback.

transformers treats any name that is not an existing folder as a hub id, so a mistyped local path comes
back as "Repo id must be in the form 'namespace/repo_name'", and an offline machine as a connection
error. These checks run first (and translate what transformers raises) so the message says what is
wrong with the name the user gave and what to pass instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..compat import offline_variables
from ..errors import ModelError, UsageError, VlmtuneError

EXAMPLE = "a local model folder or a hub id such as Qwen/Qwen2-VL-2B-Instruct"


def looks_local(name: str) -> bool:
    """A name that can only be a path: a hub id is `name` or `owner/name`, never `./x`, `/x`, `a/b/c`."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


# Files that hold a full model's weights (an adapter folder has adapter_model.safetensors instead).
MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_path(name: str | None, flag: str = "--model_name_or_path") -> None:
    """Refuse a missing name, a local path that does not exist, a file, or a folder that is not a model."""
    if not name:
        raise UsageError(f"{flag} is required: {EXAMPLE}")
    path = Path(name).expanduser()
    if not path.exists():
        if looks_local(name):
            raise ModelError(f"{flag} {name}: no such folder; pass {EXAMPLE}")
        return
    if not path.is_dir():
        raise ModelError(f"{flag} {name} is a file; pass the folder that holds its config.json and weights")
    # An adapter folder also holds its base model's config.json (written beside it), but no weights of its own.
    if (path / "adapter_config.json").exists() and not any((path / f).exists() for f in MODEL_WEIGHTS):
        raise ModelError(
            f"{flag} {name} is a LoRA adapter, not a base model; pass it as --adapter (eval, predict, merge) "
            f"and its base model as {flag} (or leave that out: the adapter records it)"
        )
    if not (path / "config.json").exists():
        raise ModelError(f"{flag} {name}: not a model folder (no config.json); pass {EXAMPLE}")


def check_adapter_path(adapter: str, flag: str = "--adapter") -> None:
    """Refuse an adapter folder that does not exist or holds no adapter (a full model, say)."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"{flag} {adapter}: {'is a file' if path.exists() else 'no such folder'}; pass the folder "
            "`vlmtune train` wrote (it holds adapter_config.json)"
        )
    if not (path / "adapter_config.json").exists():
        full = (path / "config.json").exists()
        hint = (
            "it holds a full model: pass it as --model_name_or_path"
            if full
            else "pass the folder `vlmtune train` wrote"
        )
        raise ModelError(f"{flag} {adapter}: no adapter_config.json in this folder; {hint}")


def _explain(name: str, flag: str, err: Exception) -> str | None:
    """The user-facing reason behind what transformers/huggingface_hub raised, or None if not ours."""
    text = " ".join(str(err).split())
    if "custom code" in text or "trust_remote_code" in text:
        return (
            f"{flag} {name} ships its own model code, which vlmtune runs only when asked: pass "
            "--trust_remote_code true if you trust the checkpoint's authors"
        )
    if "does not recognize this architecture" in text or "Unrecognized model" in text:
        return f"{flag} {name}: transformers does not know this model type; upgrade transformers or pass another model"
    if "Unrecognized configuration class" in text:
        return f"{flag} {name} is not a vision-language model that vlmtune can fine-tune; docs/models.md lists them"
    if not isinstance(err, OSError):
        return None
    if Path(name).expanduser().is_dir():
        return f"{flag} {name}: cannot load it: {text}"
    offline = offline_variables()
    if offline or "couldn't connect" in text or "offline" in text.lower():
        reason = f"{offline[0]} is set" if offline else "no network connection to huggingface.co"
        return (
            f"{flag} {name}: no such local folder, and as a hub id it cannot be downloaded ({reason}) and is "
            f"not in the local cache; pass a local folder, or download it where there is a network (hf download {name})"
        )
    return (
        f"{flag} {name}: not found on the Hugging Face hub (check the spelling; a private or gated model "
        "needs `hf auth login`), and no such local folder"
    )


@contextmanager
def model_errors(name: str, flag: str = "--model_name_or_path") -> Iterator[None]:
    """Turn the loading failures a user can fix into a `ModelError` naming the flag and the fix."""
    try:
        yield
    except VlmtuneError:
        raise
    except (OSError, ValueError) as err:
        message = _explain(name, flag, err)
        if message is None:
            raise
        raise ModelError(message) from err
