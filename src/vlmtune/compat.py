"""Hardware a run asks for but this machine lacks: say what is used instead, in one line, and run.

Commands written on a GPU or Gaudi machine (`--bf16`, `--tf32`, flash attention, W&B, `--use_habana`) must
also run on a laptop or a CI runner. transformers refuses such arguments with a ValueError deep in
`TrainingArguments.__post_init__`; vlmtune instead adjusts them before that check and prints one line per
change, so the user knows exactly what ran.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def accelerator() -> str | None:
    """The accelerator accelerate would use ("cuda", "xpu", "hpu", "mps", ...), or None on a CPU-only host."""
    from accelerate.utils import is_hpu_available, is_mps_available, is_xpu_available

    if torch.cuda.is_available():
        return "cuda"
    for name, available in (("hpu", is_hpu_available), ("xpu", is_xpu_available), ("mps", is_mps_available)):
        if available():
            return name
    return None


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = ("1", "ON", "YES", "TRUE")


def offline_variables(for_datasets: bool = False) -> list[str]:
    """The variables that keep the Hugging Face libraries off the network ([] when they may use it), as
    the libraries read them (once, when imported): huggingface_hub's HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE,
    and for `datasets` (`for_datasets`) also HF_DATASETS_OFFLINE, which overrides those two."""
    from huggingface_hub import constants

    offline, names = constants.HF_HUB_OFFLINE, OFFLINE_VARIABLES[:2]
    if for_datasets:
        from datasets import config

        offline, names = config.HF_HUB_OFFLINE, OFFLINE_VARIABLES
    if not offline:
        return []
    return [v for v in names if os.environ.get(v, "").strip().upper() in _TRUE] or ["HF_HUB_OFFLINE"]


def offline_reason(for_datasets: bool = False) -> str | None:
    """Why nothing is downloaded here ("offline mode is on (HF_HUB_OFFLINE=1)"), or None. In the base
    layer: uploads (hub.py), hub datasets and image URLs in the data (data/) all say it the same way."""
    variables = offline_variables(for_datasets)
    if not variables:
        return None
    return f"offline mode is on ({', '.join(f'{v}={os.environ.get(v, 1)}' for v in variables)})"


def is_network_error(err: BaseException) -> bool:
    """A connection that could not be made or timed out (the HTTP client's own types, whatever it is)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"TransportError", "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout"})


def _say(message: str) -> None:
    print(f"vlmtune: {message}")


# `--report_to` back-ends whose pip package is not named as transformers names them.
REPORTER_PACKAGES = {"azure_ml": "azureml-core", "flyte": "flytekit", "kubeflow": "kubeflow-training"}


def missing_reporters(reporters: list[str]) -> list[str]:
    """The `--report_to` back-ends transformers knows whose package is not installed here."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    installed = set(get_available_reporting_integrations())
    return [r for r in reporters if r in INTEGRATION_TO_CALLBACK and r not in installed]


def fit_training_args(args) -> None:
    """Adjust `TrainingArguments` fields this machine cannot honour (before transformers checks them)."""
    device = accelerator()
    if args.bf16 and device is None and not args.use_cpu:  # --use_cpu --bf16: CPU autocast, as asked
        args.bf16 = False
        _say("bf16 needs a GPU (or Gaudi/XPU) and there is none here: training in float32 on the CPU.")
    if args.fp16 and device is None:
        args.fp16 = False
        _say("fp16 needs a GPU and there is none here: training in float32 on the CPU.")
    if args.tf32 and not (device == "cuda" and torch.cuda.get_device_capability()[0] >= 8):
        args.tf32 = None
        _say("tf32 needs an NVIDIA Ampere (or newer) GPU and there is none here: ignoring --tf32.")
    reporters = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
    missing = missing_reporters(reporters)
    for name in missing:
        package = REPORTER_PACKAGES.get(name, name)
        _say(
            f"--report_to {name}: {package} is not installed (pip install {package}): logging locally only "
            "(the console, trainer_state.json and the training plots)."
        )
    if missing:
        args.report_to = [r for r in reporters if r not in missing] or "none"


def check_model_type(expected: str | None, config) -> None:
    """Axolotl's `--model_type`: vlmtune reads the architecture from the checkpoint; a different one is a
    mistake in `--base_model` or `--model_type` (a family prefix such as `llava` for llava_next matches)."""
    from .errors import UsageError

    actual = getattr(config, "model_type", None)
    if not expected or actual is None or actual.startswith(expected):
        return
    raise UsageError(
        f"--model_type {expected}, but the checkpoint is a {actual} model. vlmtune reads the architecture "
        "from the checkpoint's config.json: drop --model_type, or check --base_model/--model_name_or_path."
    )


def keep_4bit_trainable(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during evaluation.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode converts its weight to an inference-only
    layout and keeps it; the next training step then fails inside `matmul_4bit` ("a view of a leaf
    Variable ... in-place operation"). Evaluation during QLoRA training on the CPU needs the training
    layout to stay. Returns how many layers were switched.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def given_bools(argv: list[str], names: tuple[str, ...]) -> list[bool | None]:
    """Each boolean flag's last value on `argv` (bare: true), or None when not given."""
    values: list[bool | None] = []
    for name in names:
        value = None
        for i, token in enumerate(argv):
            flag, eq, text = token.partition("=")
            if flag == f"--{name}":
                nxt = text if eq else (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "")
                value = nxt.lower() not in ("false", "0", "no", "n", "off") if nxt else True
        values.append(value)
    return values


def run_steps(args) -> tuple[bool, bool]:
    """(train, evaluate) from `--do_train` / `--do_eval` as run_lora_vlm.py users write them.

    Neither given: train (and evaluate when there is evaluation data). `--do_eval` alone: evaluate only.
    `--do_train false`: no training.
    """
    do_train, do_eval = getattr(args, "do_train_given", None), getattr(args, "do_eval_given", None)
    train = do_train if do_train is not None else not (do_eval or args.do_predict)
    return train, bool(do_eval) or not train


def loss_metrics(trainer) -> dict:
    """`Trainer.evaluate()` (eval loss, runtime, samples per second) plus perplexity, exp(eval loss): the
    headline evaluation metric of run_lora_vlm.py."""
    metrics = trainer.evaluate()
    loss = metrics.get("eval_loss")
    if loss is not None:
        metrics["eval_perplexity"] = math.exp(loss) if loss < 700 else float("inf")
    return metrics


def save_base_config(model_args, out: Path) -> None:
    """The base checkpoint's own `config.json` beside an adapter (Axolotl's outputs have it): tools that
    read the architecture from the output folder find it. A full fine-tune already saved its own."""
    if (out / "config.json").exists():
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    config.save_pretrained(out)
