"""Say plainly why a model or adapter cannot be loaded, instead of a hub lookup traceback.

transformers treats any name that is not an existing folder as a hub id, so a mistyped local path comes
back as "Repo id must be in the form 'namespace/repo_name'", and an offline machine as a connection
error. These checks run first (and translate what transformers raises) so the message says what is
wrong with the name the user gave and what to pass instead.

A local folder's files are read before anything loads from it: a half-downloaded weights file, a
truncated JSON file or an unparsable chat template surfaces deep inside transformers, safetensors or PEFT
as an error that names neither the file nor the fix, so these checks name the file (with line and column
for JSON). Only headers are read, never the weights themselves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import peft
from safetensors import SafetensorError, safe_open

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


# The JSON files transformers and PEFT parse when they load a model or adapter folder.
JSON_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "trainer_state.json",
)
CHAT_TEMPLATE = "chat_template.jinja"
MODEL_FIX = "download or copy the checkpoint again (a hub model: hf download ID --force-download), or pass another one"
ADAPTER_FIX = "copy the adapter folder again, or pass another checkpoint-N folder of its training run"
DAMAGED = "the file is truncated or corrupt"


def read_json(path: Path, fix: str = MODEL_FIX) -> object:
    """`path` parsed, or a `ModelError` naming the file, the line and column, and `fix`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: not UTF-8 text (byte {err.start}); {DAMAGED}: {fix}") from None
    except json.JSONDecodeError as err:
        raise ModelError(
            f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}); {DAMAGED}: {fix}"
        ) from None


def check_chat_template(path: Path, fix: str = MODEL_FIX) -> None:
    """Compile a `chat_template.jinja` as transformers will: a syntax error names its line here, not when
    the first sample renders."""
    from jinja2 import TemplateSyntaxError

    try:  # transformers' own environment (its `{% generation %}` tag, its filters); private, so optional
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # (moved in another release: the template is still checked when it first renders)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: not UTF-8 text (byte {err.start}); {DAMAGED}: {fix}") from None
    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as err:
        raise ModelError(
            f"{path}, line {err.lineno}: not a valid Jinja template ({(err.message or '').rstrip('.')}); fix that "
            f"line, or {fix}"
        ) from None


def check_safetensors(path: Path, fix: str = MODEL_FIX) -> None:
    """Open a safetensors file's header (no tensor is read): a truncated or overwritten file fails here."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as err:
        raise ModelError(f"{path} is truncated or corrupt (safetensors: {_header_error(err)}); {fix}") from None


def _header_error(err: SafetensorError) -> str:
    """safetensors' reason without its generic prefix ("incomplete metadata, file not fully covered")."""
    return str(err).removeprefix("Error while deserializing header: ")


def weight_files(folder: Path, fix: str = MODEL_FIX) -> list[Path]:
    """The safetensors files holding a folder's weights: the shards its index names, or the single file."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return [p for p in (folder / "model.safetensors", folder / "adapter_model.safetensors") if p.is_file()]
    weight_map = read_json(index, fix)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index}: no weight_map (which tensor is in which shard); {DAMAGED}: {fix}")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise ModelError(f"{index} names shards that are not in {folder}: {', '.join(missing)}; {fix}")
    return [folder / s for s in shards]


def check_files(folder: Path, fix: str = MODEL_FIX) -> None:
    """Refuse a local folder whose JSON files, chat template or safetensors headers are damaged, naming the
    file: transformers would fail on it later with a message that names neither file nor fix."""
    for name in JSON_FILES:
        if (folder / name).is_file():
            read_json(folder / name, fix)
    if (folder / CHAT_TEMPLATE).is_file():
        check_chat_template(folder / CHAT_TEMPLATE, fix)
    for path in weight_files(folder, fix):
        check_safetensors(path, fix)


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
    check_files(path)


def check_vision_language(config, name: str, flag: str = "--model_name_or_path") -> None:
    """Refuse, from its config and before any weights load, a model that takes no images (a text-only LLM):
    it has no vision_config and transformers has no image-text-to-text class for its model_type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as VLM_TYPES

    if getattr(config, "vision_config", None) is not None or config.model_type in VLM_TYPES:
        return
    if "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {}):  # its own code says it is one
        return
    classes = ", ".join(getattr(config, "architectures", None) or [])
    raise ModelError(
        f"{flag} {name} is not a vision-language model: its config.json has model_type '{config.model_type}'"
        f"{f' ({classes})' if classes else ''}, with no vision part (no vision_config), and transformers has no "
        "image-text-to-text class for it; pass a model that takes images (`vlmtune models` lists every "
        "architecture vlmtune can fine-tune)"
    )


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
    check_peft_config(path / "adapter_config.json")
    check_files(path, ADAPTER_FIX)


def check_peft_config(path: Path) -> dict:
    """An adapter_config.json PEFT can read (its `peft_type` is one PEFT knows), parsed."""
    config = read_json(path, ADAPTER_FIX)
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind not in {t.value for t in peft.PeftType}:
        found = "no peft_type" if kind is None else f"peft_type {kind!r}, which PEFT {peft.__version__} does not know"
        raise ModelError(
            f"{path} is not a PEFT adapter config ({found}); pass the folder `vlmtune train` (or PEFT's "
            f"save_pretrained) wrote, or {ADAPTER_FIX}"
        )
    return config


def adapter_base(adapter: str) -> tuple[str | None, str | None]:
    """The base model an adapter records (adapter_config.json's base_model_name_or_path) and that base's
    model_type: from the config.json `vlmtune train` saves beside the adapter, else from the base's folder."""
    recorded = check_peft_config(Path(adapter) / "adapter_config.json").get("base_model_name_or_path")
    places = [Path(adapter) / "config.json", *([Path(recorded).expanduser() / "config.json"] if recorded else [])]
    for place in places:
        config = read_json(place) if place.is_file() else None
        if isinstance(config, dict) and config.get("model_type"):
            return recorded, config["model_type"]
    return recorded, None


def check_adapter_base(adapter: str, model_name_or_path: str, model_type: str, flag: str = "--adapter") -> None:
    """Refuse an adapter trained on a model of another type than `model_name_or_path`: PEFT would load the
    layers whose names happen to match and leave the rest, or fail deep inside with an AttributeError."""
    recorded, adapter_type = adapter_base(adapter)
    if adapter_type is None or adapter_type == model_type:
        return
    raise ModelError(
        f"{flag} {adapter} was trained on {recorded} (a '{adapter_type}' model, as its adapter_config.json "
        f"and config.json say), but --model_name_or_path {model_name_or_path} is a '{model_type}' model; an "
        f"adapter only fits the base model it was trained on: pass --model_name_or_path {recorded} (or leave it "
        "out: the adapter records it), or an adapter trained on this model"
    )


def _explain(name: str, flag: str, err: Exception) -> str | None:
    """The user-facing reason behind what transformers/huggingface_hub raised, or None if not ours."""
    text = " ".join(str(err).split())
    if "custom code" in text or "trust_remote_code" in text:
        return (
            f"{flag} {name} ships its own model code, which vlmtune runs only when asked: pass "
            "--trust_remote_code true if you trust the checkpoint's authors"
        )
    if "does not recognize this architecture" in text or "Unrecognized model" in text:
        return _unknown_model_type(name, flag, text)
    if library := missing_library(text):
        return _missing_library(name, flag, library)
    if "Unrecognized configuration class" in text:
        return f"{flag} {name} is not a vision-language model that vlmtune can fine-tune; `vlmtune models` lists them"
    fix = ADAPTER_FIX if flag == "--adapter" else f"download it again (hf download {name} --force-download)"
    if isinstance(err, SafetensorError):  # (a hub model's cached files; a local folder's are checked first)
        return f"{flag} {name}: a weights file is truncated or corrupt (safetensors: {_header_error(err)}); {fix}"
    if isinstance(err, json.JSONDecodeError):
        return f"{flag} {name}: a file is not valid JSON ({text}); {DAMAGED}: {fix}"
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


def missing_library(text: str) -> str | None:
    """The library an import failure of transformers says is missing ("torchvision", "timm"), or None."""
    found = re.search(r"Missing optional dependencies: (\w+)|requires the (\w+) library", text)
    return (found[1] or found[2]).lower() if found else None


def _missing_library(name: str, flag: str, library: str) -> str:
    """A checkpoint whose processor or model needs a library this environment lacks (Llama 4's and LFM2-VL's
    image processors exist only for torchvision in transformers 5.24; Gemma 3n's tower needs timm)."""
    fix = f"pip install {library}"
    if library == "torchvision":
        fix += f" (the build matching torch {metadata.version('torch')}: torchvision's install table pairs them)"
    return f"{flag} {name} needs {library}, which is not installed here: {fix}, then run again"


def supported_range(package: str) -> str:
    """The versions of `package` vlmtune declares it works with (pyproject.toml), as pip writes them."""
    try:
        requirements = metadata.requires("vlmtune") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        requirements = []
    for requirement in requirements:
        if (found := re.fullmatch(rf"{re.escape(package)}\s*([<>=!~][^;]*)", requirement.strip())) is not None:
            return package + found[1].strip()
    return f"{package} in the range docs/dependencies.md gives"


def _unknown_model_type(name: str, flag: str, text: str) -> str:
    """A config.json whose model_type this transformers has no class for (a newer architecture, or one
    that ships its own code), or that names none."""
    found = re.search(r"model type `([^`]+)`", text)
    if found is None:
        return f"{flag} {name}: its config.json names no model_type transformers knows; {MODEL_FIX}"
    return (
        f"{flag} {name} has model_type '{found[1]}', which the installed transformers "
        f"{metadata.version('transformers')} does not know: upgrade transformers within the range vlmtune "
        f"supports (pip install -U '{supported_range('transformers')}'); if the checkpoint ships its own "
        "model code, pass --trust_remote_code true; else pass another model (docs/models.md lists the families)"
    )


@contextmanager
def model_errors(name: str, flag: str = "--model_name_or_path") -> Iterator[None]:
    """Turn the loading failures a user can fix into a `ModelError` naming the flag and the fix."""
    try:
        yield
    except VlmtuneError:
        raise
    except (OSError, ValueError, ImportError, SafetensorError) as err:
        message = _explain(name, flag, err)
        if message is None:
            raise
        raise ModelError(message) from err
