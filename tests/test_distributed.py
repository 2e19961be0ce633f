"""Several processes: `torchrun` data parallelism through the Trainer, on CPU (gloo), as on GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def test_two_processes_train_one_model_and_write_once(tiny_model_dir, shapes_data, tmp_path):
    out = tmp_path / "ddp"
    torchrun = str(Path(sys.executable).parent / "torchrun")  # installed with torch
    command = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vlmtune.cli",
        "train",
        "--model_name_or_path",
        tiny_model_dir("qwen2_vl"),
        "--dataset_name",
        str(shapes_data["train"]),
        "--output_dir",
        str(out),
        "--max_steps",
        "10",
        "--per_device_train_batch_size",
        "3",
        "--max_train_samples",
        "60",
        "--val_split_ratio",
        "0",
        "--use_cpu",
        "true",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Saved to") == 1, "one process reports and writes"
    state = json.loads((out / "trainer_state.json").read_text())
    # 10 steps x 3 rows x 2 processes = 60 rows: exactly one epoch of the 60 training rows.
    assert state["global_step"] == 10 and state["epoch"] == pytest.approx(1.0)
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
