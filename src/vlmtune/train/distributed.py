"""Several processes, one job: the detected topology, and what sharded engines need.

Everything distributed is done by accelerate and the Trainer; this module checks that the processes
really joined one job before anything is written, and says what it found. The shipped DeepSpeed/FSDP
configs and the launcher's variables are settled earlier, while the arguments are parsed
(`config/launch.py`).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import torch

from ..config.launch import launched_world_size
from ..errors import RunError, UsageError

logger = logging.getLogger(__name__)


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
    expected = launched_world_size()
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
