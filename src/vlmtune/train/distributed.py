"""Several processes, one job: launch shortcuts, the detected topology, and what sharded engines need.

Everything distributed is done by accelerate and the Trainer; this module only chooses their settings
(shipped DeepSpeed/FSDP configs), checks that the processes really joined one job before anything is
written, and says what it found.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RunError, UsageError

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
DEEPSPEED_CONFIGS = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}
FSDP_CONFIGS = {"full_shard": "fsdp_full_shard.json", "hybrid_shard": "fsdp_hybrid_shard.json"}
# Variables a launcher (torchrun, accelerate launch, a cluster script) sets for every process.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def config_path(name: str) -> Path:
    """The shipped config file for a shortcut (`zero2`, `full_shard`...) or a file name in `configs/`."""
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
    return torch.accelerator.is_available()


def prepare_launch_environment(environ=os.environ) -> None:
    """Make processes started with the standard variables join one job, or refuse before any work.

    accelerate initialises the process group from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; on a machine
    without an accelerator it does so only in CPU mode, and otherwise runs each process alone (two
    writers of one output folder). So without an accelerator vlmtune switches CPU mode on.
    """
    world_size = int(environ.get("WORLD_SIZE", "1") or 1)
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


@dataclass(frozen=True)
class Topology:
    """What the processes agreed on: sizes, this process's place, and the engine."""

    world_size: int
    rank: int
    local_world_size: int
    nodes: int
    backend: str | None
    device: str
    engine: str

    def describe(self) -> str:
        if self.world_size == 1:
            return f"Topology: 1 process on {self.device} ({self.engine})"
        return (
            f"Topology: {self.world_size} processes = {self.nodes} node(s) x {self.local_world_size}, "
            f"backend {self.backend}, {self.device}, {self.engine}"
        )


def engine_name(training_args) -> str:
    """DDP, DeepSpeed ZeRO-n (with offload) or FSDP version/strategy, as the arguments configure it."""
    if training_args.deepspeed:
        zero = training_args.hf_deepspeed_config.config.get("zero_optimization", {})
        offload = " with CPU offload" if zero.get("offload_param") or zero.get("offload_optimizer") else ""
        return f"DeepSpeed ZeRO-{zero.get('stage', 0)}{offload}"
    if training_args.fsdp:
        config = training_args.fsdp_config
        strategy = config.get("reshard_after_forward", True)
        return f"FSDP{config.get('version', 2)} ({strategy if isinstance(strategy, str) else 'full_shard'})"
    return "data parallel (DDP)" if training_args.world_size > 1 else "single process"


def detect_topology(training_args) -> Topology:
    """The topology accelerate set up, refusing a launch that did not become one job.

    Refused: WORLD_SIZE>1 in the environment but a process group of another size (each process would
    train alone and all would write the same files), and DeepSpeed/FSDP without an accelerator
    (accelerate then runs plain DDP, or DeepSpeed with a wrong world size).
    """
    state = training_args.distributed_state
    expected = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if training_args.world_size != expected:
        raise RunError(
            f"WORLD_SIZE={expected} is set but accelerate formed a job of {training_args.world_size} "
            "process(es): each process would train alone and write the same output folder. Launch with "
            "torchrun or accelerate launch, or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process"
        )
    device = training_args.device
    if device.type == "cpu" and (training_args.deepspeed or training_args.fsdp):
        flag = "--deepspeed" if training_args.deepspeed else "--fsdp"
        raise UsageError(
            f"{flag} needs GPUs: on CPU accelerate does not shard the model (it would silently run plain data "
            f"parallelism). Drop {flag} to train data parallel on CPU, or run on GPUs (docs/multi-gpu.md)"
        )
    hosts = _hosts(training_args.world_size)
    return Topology(
        world_size=training_args.world_size,
        rank=training_args.process_index,
        local_world_size=max(hosts.count(h) for h in hosts),
        nodes=len(set(hosts)),
        backend=getattr(state, "backend", None),
        device=device.type,
        engine=engine_name(training_args),
    )


def _hosts(world_size: int) -> list[str]:
    """Each process's host name, in rank order (one gather through accelerate): the node count, which no
    variable reliably gives (LOCAL_WORLD_SIZE is torchrun's; a hand launch may set only RANK/WORLD_SIZE)."""
    if world_size == 1:
        return [socket.gethostname()]
    from accelerate.utils import gather_object

    return gather_object([socket.gethostname()])


def announce(topology: Topology) -> None:
    """Print the topology once (rank 0); quiet vlmtune's own INFO logs on the other ranks."""
    if topology.rank == 0:
        print(topology.describe())
    else:
        logging.getLogger("vlmtune").setLevel(logging.WARNING)


def shards_parameters(training_args) -> bool:
    """ZeRO-3 and FSDP split each weight across ranks: every rank must run the same modules each step."""
    if training_args.deepspeed:
        return training_args.hf_deepspeed_config.config.get("zero_optimization", {}).get("stage", 0) == 3
    return bool(training_args.fsdp)


def sharded_quantization_kwargs(finetune_args, training_args, compute_dtype: torch.dtype) -> dict:
    """QLoRA under FSDP or ZeRO-3: 4-bit weights stored in the compute dtype (so they can be flattened and
    sharded with the rest) and no device_map (the engine places the shards). ZeRO-2 and DDP need nothing."""
    if not finetune_args.load_in_4bit or not shards_parameters(training_args):
        return {}
    return {"bnb_4bit_quant_storage": compute_dtype, "device_map": None}


def full_parameters_for_generation(trainer):
    """A context in which the trained model can generate: FSDP1 keeps the root's own weights (embeddings,
    output layer) as flat shards outside any wrapped block, so those are gathered for the duration (the
    wrapped blocks gather themselves as they run); FSDP2 and ZeRO-3 gather per module in forward
    (`generate` passes `synced_gpus` itself); DDP and single processes hold full weights."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 1:
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.model_wrapped, writeback=False, recurse=False)
