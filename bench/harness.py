"""The measuring half of a side-by-side benchmark: fresh processes, alternating sides, medians, ratios.

A benchmark script names its sides (the baseline users copy, and vlmtune) and how to run one of them; the
harness does the rest the same way for every pair, so a training comparison and a preference one are
measured alike:

- each measured run is a fresh subprocess (`measure`): its own peak RSS, plus the largest of its finished
  children's (data-loader workers), and on CUDA the peak allocated memory after a reset at train start;
- the first steps of each run are a warm-up that is not timed (`StepTimer`, a Trainer callback);
- the sides alternate in ABBA order over the repeats (`alternate`), and medians are reported (`report`),
  with throughput and memory ratios of the second side over the first in the last line.

A worker process calls `worker_result(timer)` after its run and prints the line `measure` reads back.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# Peak dense bf16 tensor FLOP/s, for model FLOPs utilisation.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
RESULT = "RESULT "


def rss_bytes() -> int:
    """This process's current resident memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def step_timer(warmup: int, steps: int):
    """A Trainer callback timing the `steps` after `warmup` and noting memory when training starts."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        start = end = None
        rss_at_start = cuda_at_start = 0

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_at_start = rss_bytes()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                self.cuda_at_start = torch.cuda.memory_allocated()
            if warmup == 0:  # (no step ends at step 0: time from here)
                self._sync()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self._sync()
                self.start = time.perf_counter()
            elif state.global_step == warmup + steps:
                self._sync()
                self.end = time.perf_counter()

    return StepTimer()


def worker_result(timer) -> None:
    """Print this run's timing and memory as the one line `measure` reads."""
    import torch

    result = {
        "seconds": timer.end - timer.start,
        # The process's own peak plus the largest peak of its finished children: the same bound of the
        # process tree's peak for every side.
        "peak_rss": sum(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        * 1024,
        "rss_at_start": timer.rss_at_start,
        "cuda_at_start": timer.cuda_at_start,
    }
    if torch.cuda.is_available():
        result["peak_cuda"] = torch.cuda.max_memory_allocated()
    print(RESULT + json.dumps(result), flush=True)


def measure(command: list[str], label: str) -> dict:
    """Run one worker command in a fresh process; its result, or {"error": ...} with the output's tail."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        return {"error": f"{label} failed (exit {proc.returncode}):\n{tail}"}
    return json.loads(lines[-1][len(RESULT) :])


def alternate(sides: tuple[str, str], repeats: int, run: Callable[[str], dict], steps: int, tag: str = "") -> dict:
    """`repeats` runs per side in ABBA order; {side: [results]}, or {} when a side failed (printed)."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            outcome = run(side)
            if "error" in outcome:
                print(outcome["error"])
                return {}
            runs[side].append(outcome)
            print(f"{tag}run {r + 1} {side}: {outcome['seconds'] / steps:.2f} s/step", flush=True)
    return runs


@dataclass
class Workload:
    """What both sides of one comparison ran: samples per step, timed steps, device."""

    batch: int
    steps: int
    device: str  # "cpu" or "cuda"


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarise(runs: dict[str, list[dict]], work: Workload, trained_per_sample: dict[str, float]) -> dict[str, dict]:
    """Per side: s/step, samples/s, trained tokens/s, peak memory and its growth during training."""
    memory_key, start_key = ("peak_cuda", "cuda_at_start") if work.device == "cuda" else ("peak_rss", "rss_at_start")
    rows = {}
    for side, side_runs in runs.items():
        seconds = median_of(side_runs, "seconds")
        samples = work.batch * work.steps / seconds
        rows[side] = dict(
            samples=samples,
            trained=samples * trained_per_sample[side] if side in trained_per_sample else None,
            memory=median_of(side_runs, memory_key),
            growth=median_of(side_runs, memory_key) - median_of(side_runs, start_key),
            step=seconds / work.steps,
        )
    return rows


def print_table(rows: dict[str, dict], runs: dict[str, list[dict]]) -> None:
    print(f"\n{'':<10}{'s/step':>9}{'samples/s':>11}{'trained tok/s':>15}{'peak memory':>14}{'peak-start':>12}")
    for side, r in rows.items():
        trained = "-" if r["trained"] is None else f"{r['trained']:.1f}"
        print(
            f"{side:<10}{r['step']:>9.2f}{r['samples']:>11.2f}{trained:>15}"
            f"{r['memory'] / 2**20:>11.0f} MiB{r['growth'] / 2**20:>8.0f} MiB"
        )
    print("per run (s): " + ", ".join(f"{side} {[round(r['seconds'], 2) for r in runs[side]]}" for side in runs))


def ratios(rows: dict[str, dict], baseline: str, candidate: str) -> tuple[float, float]:
    """(speedup, memory): the candidate's samples/s and peak memory over the baseline's."""
    return (
        rows[candidate]["samples"] / rows[baseline]["samples"],
        rows[candidate]["memory"] / rows[baseline]["memory"],
    )


def flops_per_token(model_dir: str) -> float:
    """Training FLOPs per token by the usual 6·N convention (N: language-model parameters, input embedding
    excluded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).text_config
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = h * (2 * h + 2 * kv) + 3 * h * inter
    return 6.0 * (layers * per_layer + h * config.vocab_size)


def print_mfu(rows: dict[str, dict], tokens_per_sample: dict[str, float], model_dir: str) -> None:
    """Model FLOPs utilisation per side, on a GPU whose peak is known."""
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if not peak:
        return
    per_token = flops_per_token(model_dir)
    for side, r in rows.items():
        mfu = r["samples"] * tokens_per_sample[side] * per_token / peak
        print(f"MFU {side}: {100 * mfu:.1f}% (6·N·tokens, {name}, {peak / 1e12:.0f} TFLOP/s bf16 peak)")


def device_line(device: str, threads: int) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU, {threads} threads"


def worker_command(script: str, side: str, options: dict[str, object], extra: list[str]) -> list[str]:
    """The command line that runs one side of `script` in a fresh process."""
    command = [sys.executable, script, "--worker", side]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    return command + (["--vlmtune_args", *extra] if extra else [])
