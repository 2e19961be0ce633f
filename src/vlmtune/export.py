"""`vlmtune merge`: fold a LoRA adapter into its base model and save a standalone checkpoint.

The output folder holds everything plain transformers needs, with no vlmtune and no PEFT:
`model.safetensors` (sharded for big models), `config.json`, `generation_config.json`, and the
processor (tokenizer, image processor, `chat_template.jinja`). Load it with
`AutoModelForImageTextToText.from_pretrained(OUT)` and `AutoProcessor.from_pretrained(OUT)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import arg
from .config.arguments import FAMILY_FILE_HELP
from .config.family import read_family_file
from .errors import OutputError, UsageError
from .hub import check_push, push_folder
from .models.loading import load_for_inference
from .outputs import check_output_folder

logger = logging.getLogger(__name__)

# Files whose presence means a folder already holds a model.
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


@dataclass
class MergeArguments:
    adapter: str = arg(None, "The LoRA adapter folder to merge (from `vlmtune train`).")
    output_dir: str = arg(None, "Folder for the merged model.")
    model_name_or_path: str | None = arg(None, "Base model (read from the adapter if omitted).")
    dtype: str = arg("auto", "dtype to save in: auto (the base model's), float32, bfloat16 or float16.")
    max_shard_size: str = arg("5GB", "Largest safetensors shard.")
    overwrite_output_dir: bool = arg(False, "Replace a model already in --output_dir.")
    push_to_hub: bool = arg(False, "Upload the merged model to the Hugging Face Hub (needs a login or --hub_token).")
    hub_model_id: str | None = arg(None, "Hub repository (user/name); default: the output folder's name.")
    hub_private_repo: bool = arg(False, "Create the hub repository as private.")
    hub_token: str | None = arg(None, "Hub token (default: the one `hf auth login` saved).")
    trust_remote_code: bool = arg(False, "Allow model code from the hub checkpoint.")
    family_file: str | None = arg(None, FAMILY_FILE_HELP)


def check_merge_output(output_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds a model, unless told to replace it."""
    existing = [f for f in MODEL_FILES if (output_dir / f).exists()]
    if existing and not overwrite:
        raise OutputError(
            f"--output_dir {output_dir} already holds a model ({', '.join(existing)}); "
            "pass --overwrite_output_dir to replace it or choose another --output_dir"
        )


def merge_adapter(args: MergeArguments) -> Path:
    """Merge `args.adapter` into its base model and save the result to `args.output_dir`."""
    if not args.adapter or not args.output_dir:
        raise UsageError("vlmtune merge: --adapter and --output_dir are required")
    out = Path(args.output_dir)
    if out.resolve() == Path(args.adapter).resolve():
        raise UsageError("vlmtune merge: --output_dir must differ from --adapter")
    check_output_folder(out)
    check_merge_output(out, args.overwrite_output_dir)
    repo_id = None
    if args.push_to_hub:  # an upload that cannot work is refused before the merge
        repo_id = check_push(args.hub_model_id or out.resolve().name, args.hub_token, "--push_to_hub")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = load_for_inference(
        args.model_name_or_path,
        args.adapter,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        family=read_family_file(args.family_file),
    )
    model = loaded.model.merge_and_unload()
    if out.exists():  # stale shards of an earlier model must not mix with the new ones
        for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
            stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True, max_shard_size=args.max_shard_size)
    if not (out / "generation_config.json").exists() and model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    logger.info("Merged %s into %s", args.adapter, out)
    if repo_id is not None:
        push_folder(out, repo_id, private=args.hub_private_repo, token=args.hub_token, message="vlmtune merge")
    return out
