"""What a launch needs before `TrainingArguments` exists: the shipped engine configs' shortcuts, and the
launcher's environment variables checked.

`TrainingArguments` opens the `--deepspeed`/`--fsdp_config` files and sets up the process group while it
is built, so both happen on the command line and the environment first. Training's own view of the
processes that joined (topology, sharding) is `train/distributed.py`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import UsageError

CONFIG_DIR = Path(__file__).parent / "engines"
DEEPSPEED_CONFIGS = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}
FSDP_CONFIGS = {"full_shard": "fsdp_full_shard.json", "hybrid_shard": "fsdp_hybrid_shard.json"}


def config_path(name: str) -> Path:
    """The shipped config file for a shortcut (`zero2`, `full_shard`...) or a file name in `engines/`."""
    file = DEEPSPEED_CONFIGS.get(name) or FSDP_CONFIGS.get(name) or name
    return CONFIG_DIR / file


def _flag_value(argv: list[str], flag: str) -> tuple[int, int, str | None] | None:
    """(start, end, value) of the last `flag VALUE` / `flag=VALUE` in argv; None when absent."""
    found = None
    for i, item in enumerate(argv):
        if item == flag:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            found = (i, i + 2 if has_value else i + 1, argv[i + 1] if has_value else None)
        elif item.startswith(flag + "="):
            found = (i, i + 1, item.split("=", 1)[1])
    return found


def resolve_launch_shortcuts(argv: list[str]) -> list[str]:
    """Replace `--deepspeed zero2|zero3|zero3_offload` with the shipped config's path and
    `--fsdp full_shard|hybrid_shard` with `--fsdp --fsdp_config <shipped config>`, before
    TrainingArguments reads them (it would look for a file named `zero2`). Other values pass unchanged."""
    argv = list(argv)
    ds = _flag_value(argv, "--deepspeed")
    if ds and ds[2] in DEEPSPEED_CONFIGS:
        argv[ds[0] : ds[1]] = ["--deepspeed", str(config_path(ds[2]))]
    elif ds and ds[2] and not ds[2].lstrip().startswith("{") and not Path(ds[2]).is_file():
        raise UsageError(
            f"--deepspeed {ds[2]}: no such file. Give a DeepSpeed JSON config or one of the shipped ones: "
            f"{', '.join(DEEPSPEED_CONFIGS)} (see docs/multi-gpu.md)"
        )
    if ds and importlib.util.find_spec("deepspeed") is None:
        raise UsageError(
            "--deepspeed needs the deepspeed package: pip install 'vlmtune[deepspeed]' (on a machine without "
            "CUDA build tools: DS_BUILD_OPS=0 pip install deepspeed)"
        )
    fsdp = _flag_value(argv, "--fsdp")
    if fsdp and fsdp[2] in FSDP_CONFIGS:
        replacement = ["--fsdp"]
        if not _flag_value(argv, "--fsdp_config"):
            replacement += ["--fsdp_config", str(config_path(fsdp[2]))]
        argv[fsdp[0] : fsdp[1]] = replacement
    return argv


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.is_available()


def launched_world_size(environ=os.environ) -> int:
    """How many processes the launcher says the job has (torchrun's and accelerate's WORLD_SIZE; 1 without)."""
    return int(environ.get("WORLD_SIZE", "1") or 1)


def prepare_launch_environment(environ=os.environ) -> None:
    """Make processes started with the standard variables join one job, or refuse before any work.

    accelerate initialises the process group from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; on a machine
    without an accelerator it does so only in CPU mode, and otherwise runs each process alone (two
    writers of one output folder). So without an accelerator vlmtune switches CPU mode on.
    """
    world_size = launched_world_size(environ)
    if world_size <= 1:
        return
    missing = [v for v in ("RANK", "MASTER_ADDR") if not environ.get(v)]
    if _has_accelerator() and "LOCAL_RANK" not in environ:
        missing.append("LOCAL_RANK")
    if missing:
        raise UsageError(
            f"WORLD_SIZE={world_size} asks for one job of {world_size} processes, but {', '.join(missing)} "
            "is not set, so the processes cannot find each other and would each train alone. Set RANK (0 to "
            "WORLD_SIZE-1), MASTER_ADDR/MASTER_PORT (rank 0's address) and LOCAL_RANK (index on this machine), "
            "or start with torchrun / accelerate launch, which set them (docs/multi-gpu.md)"
        )
    if not _has_accelerator():
        environ.setdefault("ACCELERATE_USE_CPU", "true")
