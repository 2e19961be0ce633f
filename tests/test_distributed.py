"""Several processes, one job: real multi-process runs on CPU (gloo) through torchrun and through the
standard environment variables, the shipped DeepSpeed/FSDP configs, and what sharded engines need.

FSDP and DeepSpeed do not run on CPU under accelerate (docs/multi-gpu.md says why); their configs are
checked against TrainingArguments here, and the runs are refused with a message on CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.data_files import png, write_rows
from tests.helpers import train_args
from vlmtune.cli import main
from vlmtune.config import DataArguments, KtoArguments, parse_args
from vlmtune.config.launch import config_path, resolve_launch_shortcuts
from vlmtune.data.kto import build_kto_splits
from vlmtune.errors import RunError
from vlmtune.models.loading import load_model, load_processing
from vlmtune.train.checkpoints import complete_checkpoints
from vlmtune.train.distributed import sharded_quantization_kwargs
from vlmtune.train.fsdp import default_fsdp_wrap
from vlmtune.train.run import run_training
from vlmtune.train.vision_step import run_vision_every_step

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "distributed_worker.py")


def _env(**extra) -> dict:
    pythonpath = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_flags(model_dir, shapes_data, out, **flags) -> list[str]:
    base = {
        "model_name_or_path": model_dir,
        "dataset_name": shapes_data["train"],
        "output_dir": out,
        "per_device_train_batch_size": 4,
        "lora_dropout": 0,
        "save_strategy": "no",
        "report_to": "none",
        **flags,
    }
    return [item for key, value in base.items() for item in (f"--{key}", str(value))]


def test_torchrun_two_processes_learn_in_step_write_once_and_split_the_evaluation(
    tiny_model_dir, shapes_data, tmp_path
):
    out = tmp_path / "ddp"
    torchrun = str(Path(sys.executable).parent / "torchrun")  # installed with torch
    flags = _train_flags(
        tiny_model_dir("qwen2_vl"),
        shapes_data,
        out,
        eval_dataset_name=shapes_data["validation"],
        max_steps=200,
        learning_rate=5e-3,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        max_new_tokens=8,
        logging_steps=50,
    )
    command = [torchrun, "--standalone", "--nproc_per_node", "2", WORKER, *flags]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # The worker's callback compared both ranks' weights after every step (it fails the job otherwise).
    assert "ranks in step: 200 steps checked across 2 processes" in done.stdout
    # One process prints and writes; the topology is said once.
    assert done.stdout.count("Topology: 2 processes = 1 node(s) x 2, backend gloo, cpu, data parallel") == 1
    assert done.stdout.count("Saved to") == 1 and done.stdout.count("language_model") == 1
    # Each process generated answers for half of the 60 held-out rows; the gathered result covers all.
    assert "Evaluation: 60 rows answered by 2 processes [30, 30]" in done.stdout
    predictions = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(p)["row"] for p in predictions] == list(range(60))
    metrics = json.loads((out / "metrics.json").read_text())
    # 6 colours: chance is 17%; the shared model learned the colour from the image.
    assert metrics["samples"] == 60 and metrics["exact_match"] >= 0.7, metrics
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 200 and state["epoch"] == pytest.approx(200 * 4 * 2 / 300, rel=0.02)


def test_processes_started_with_the_standard_variables_train_as_one_job_and_resume_on_one(
    tiny_model_dir, shapes_data, tmp_path
):
    out = tmp_path / "env"
    flags = _train_flags(
        tiny_model_dir("qwen2_vl"),
        shapes_data,
        out,
        max_steps=6,
        max_train_samples=48,
        val_split_ratio=0,
        save_strategy="steps",
        save_steps=3,
    )
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    processes = [
        subprocess.Popen(
            [sys.executable, WORKER, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(**common, RANK=str(rank), LOCAL_RANK=str(rank)),
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    stdout = "".join(o for o, _ in outputs)
    assert stdout.count("Topology: 2 processes = 1 node(s) x 2, backend gloo, cpu") == 1
    assert "ranks in step: 6 steps checked across 2 processes" in stdout
    assert stdout.count("Saved to") == 1
    state = json.loads((out / "trainer_state.json").read_text())
    # 6 steps x 4 rows x 2 processes = 48 rows: one epoch, so the processes shared the data.
    assert state["global_step"] == 6 and state["epoch"] == pytest.approx(1.0)

    # The 2-process DDP checkpoint resumes in one process (optimizer, scheduler, step count).
    checkpoint = out / "checkpoint-6"
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= {f.name for f in checkpoint.iterdir()}
    resumed = run_training(
        *train_args(
            tiny_model_dir("qwen2_vl"),
            str(shapes_data["train"]),
            str(out),
            max_steps=8,
            max_train_samples=48,
            val_split_ratio=0,
            eval_accuracy=False,
            resume_from_checkpoint=str(checkpoint),
        )
    )
    assert resumed.trainer.state.global_step == 8


@pytest.mark.parametrize(
    ("variables", "missing"),
    [({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"), ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "RANK")],
)
def test_incomplete_launch_variables_are_refused_before_any_work(
    variables, missing, monkeypatch, capsys, tmp_path, tiny_model_dir
):
    for name in ("RANK", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    argv = ["train", "--model_name_or_path", tiny_model_dir("qwen2_vl"), "--output_dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--dataset_name", "data.csv"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2" in err and missing in err and "torchrun" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_launch_that_did_not_become_one_job_is_refused_before_any_writing(
    tiny_model_dir, shapes_data, tmp_path, monkeypatch
):
    out = tmp_path / "alone"
    args = train_args(tiny_model_dir("qwen2_vl"), str(shapes_data["train"]), str(out), max_steps=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher asked for 2 processes; this one is alone
    with pytest.raises(RunError, match="WORLD_SIZE=2 is set but accelerate formed a job of 1 process"):
        run_training(*args)
    assert not out.exists()


@pytest.mark.parametrize("flag", [["--fsdp", "full_shard"], ["--deepspeed", "zero2"]])
def test_sharded_engines_on_cpu_are_refused_not_silently_downgraded(
    flag, tiny_model_dir, shapes_data, tmp_path, capsys
):
    if flag[0] == "--deepspeed":
        pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    argv = ["train", *_train_flags(tiny_model_dir("qwen2_vl"), shapes_data, tmp_path / "s", max_steps=1), *flag]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--use_cpu", "true"])
    finally:
        unset_hf_deepspeed_config()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{flag[0]} needs GPUs" in err and "Traceback" not in err


def test_shortcuts_name_the_shipped_configs_and_unknown_names_are_refused(capsys):
    shipped = str(config_path("zero3_offload"))
    assert resolve_launch_shortcuts(["--deepspeed", "zero3_offload"]) == ["--deepspeed", shipped]
    assert resolve_launch_shortcuts(["--fsdp=hybrid_shard"]) == [
        "--fsdp",
        "--fsdp_config",
        str(config_path("hybrid_shard")),
    ]
    # A user's own fsdp_config wins over the shipped one; other values pass unchanged.
    own = ["--fsdp", "full_shard", "--fsdp_config", "my.json"]
    assert resolve_launch_shortcuts(own) == ["--fsdp", "--fsdp_config", "my.json"]
    assert resolve_launch_shortcuts(["--fsdp", "shard_grad_op auto_wrap"]) == ["--fsdp", "shard_grad_op auto_wrap"]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--deepspeed", "zero4", "--output_dir", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--deepspeed zero4: no such file" in err and "zero3_offload" in err


def test_fsdp_shortcut_wraps_the_registry_layer_classes(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen2_vl")
    *_, training = parse_args(["--output_dir", str(tmp_path), "--fsdp", "full_shard"])
    assert training.fsdp and training.fsdp_config["version"] == 2 and training.fsdp_config["reshard_after_forward"]
    loaded = load_model(model_dir)
    assert default_fsdp_wrap(training, loaded.model, loaded.spec) == ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]
    assert training.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "Qwen2VLDecoderLayer,Qwen2VLVisionBlock"


@pytest.mark.parametrize("shortcut", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_fill_every_auto_from_the_training_arguments(shortcut, tiny_model_dir, tmp_path):
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    model = load_model(tiny_model_dir("qwen2_vl")).model  # before ZeRO-3 is configured (it would partition it)
    flags = ["--output_dir", str(tmp_path), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    flags += ["--max_grad_norm", "0.5", "--load_in_4bit"]
    try:
        *_, finetune, training = parse_args(["--deepspeed", shortcut, *flags])
        config = training.hf_deepspeed_config
        config.trainer_config_finalize(training, model, 100)
        assert config.mismatches == [] and '"auto"' not in json.dumps(config.config)
        values = config.config
        assert values["train_micro_batch_size_per_gpu"] == 4 and values["gradient_accumulation_steps"] == 2
        assert values["gradient_clipping"] == 0.5 and values["train_batch_size"] == 8
        assert config.is_zero3() == shortcut.startswith("zero3")
        # QLoRA: ZeRO-3 shards the 4-bit weights, so they are stored in the compute dtype and not placed by hand.
        quant = sharded_quantization_kwargs(finetune, training, torch.bfloat16)
        assert quant == ({"bnb_4bit_quant_storage": torch.bfloat16, "device_map": None} if config.is_zero3() else {})
    finally:
        unset_hf_deepspeed_config()  # the config is process-global while set: keep it out of other tests


def test_qlora_loads_with_the_storage_dtype_fsdp_shards(tiny_model_dir):
    import bitsandbytes as bnb

    storage = {"bnb_4bit_quant_storage": torch.float32, "device_map": None}  # as under FSDP / ZeRO-3
    loaded = load_model(tiny_model_dir("qwen2_vl"), load_in_4bit=True, **storage)
    quantised = [m.weight for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and {w.dtype for w in quantised} == {torch.float32}
    batch = loaded.processor.tokenizer(["a red square"], return_tensors="pt")
    assert torch.isfinite(loaded.model(**batch).logits).all()


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next", "idefics3"])
def test_text_only_batch_runs_the_vision_tower_with_unchanged_loss_and_gradients(family, tiny_model_dir):
    """Under ZeRO-3/FSDP a rank whose batch has no image must still run the vision tower, or the job hangs."""
    loaded = load_model(tiny_model_dir(family))
    model = loaded.model.train()
    batch = loaded.processor.tokenizer(["the answer is red", "blue"], return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].clone()

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_before, grads_before = loss_and_grads()
    vision_calls = []
    vision = model.get_submodule(loaded.spec.vision_keys[0])
    vision.register_forward_hook(lambda *_: vision_calls.append(1))
    hook = run_vision_every_step(model, loaded.processor)
    loss_after, grads_after = loss_and_grads()
    assert vision_calls and hook.runs == 1, "the vision tower ran on the text-only batch"
    assert torch.equal(loss_before, loss_after)
    assert all(torch.equal(grads_before[n], grads_after[n]) for n in grads_before)
    vision_grads = [g for n, g in grads_after.items() if n not in grads_before]
    assert vision_grads and all((g == 0).all() for g in vision_grads), "vision weights join backward with zeros"
    model.eval()
    model(**{k: v for k, v in batch.items() if k != "labels"})
    assert hook.runs == 1, "generation and evaluation are left alone"


# --- preemption: real signals to a real 2-process job ------------------------------------------------


def _ranks(launcher: subprocess.Popen) -> dict[int, int]:
    """RANK → pid of the launcher's training processes (read from /proc)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        variables = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        ranks[int(variables["RANK"])] = pid
    return ranks


TORCHRUN_2 = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", WORKER]


def _job_flags(model_dir, shapes_data, out: Path) -> list[str]:
    """12 steps of 2 rows per process with dropout (RNG state matters), a checkpoint every 2 steps."""
    settings = dict(per_device_train_batch_size=2, max_steps=12, max_train_samples=48, val_split_ratio=0)
    settings |= dict(eval_accuracy="false", lora_dropout=0.1, save_strategy="steps", save_steps=2)
    return _train_flags(model_dir, shapes_data, out, **settings)


def _preempted_run(model_dir, shapes_data, out: Path, send, *extra: str) -> tuple[int, str]:
    """A 12-step torchrun job of 2 processes (steps slowed), signalled by `send(launcher)` once
    checkpoint-2 is complete; (the launcher's exit code, stderr). Fails the test if the job hangs."""
    stderr = out.parent / f"{out.name}.stderr"
    with open(stderr, "w") as err_file:
        launcher = subprocess.Popen(
            [*TORCHRUN_2, *_job_flags(model_dir, shapes_data, out), *extra],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            env=_env(VLMTUNE_TEST_STEP_SECONDS="0.5"),
            start_new_session=True,  # its own process group, as a terminal's job or a Slurm step has
        )
        try:
            marker = out / "checkpoint-2" / "checkpoint_complete.json"
            deadline = time.monotonic() + 300
            while not marker.exists() and launcher.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert launcher.poll() is None, stderr.read_text()[-3000:]
            send(launcher)
            code = launcher.wait(timeout=120)  # every process stops: no hang
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    return code, stderr.read_text()


def _stopped_together(out: Path, err: str, name: str) -> None:
    """Both ranks stopped at one step before the end and saved one complete checkpoint of it."""
    stopped = re.findall(rf"vlmtune: error: training stopped by {name} at step (\d+) of 12", err)
    assert len(stopped) == 1, err[-3000:]  # said once, by the first process
    step = int(stopped[0])
    assert 2 <= step < 12
    assert [p.name for p in complete_checkpoints(out)][-1] == f"checkpoint-{step}"
    folder = out / f"checkpoint-{step}"
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in folder.iterdir()}, "both ranks saved"
    assert not (out / "adapter_model.safetensors").exists()
    assert "Traceback" not in err.split("training stopped by")[0], "no rank crashed before stopping"


def test_ctrl_c_to_a_torchrun_job_checkpoints_every_rank_at_one_step_and_resumes_exactly(
    tiny_model_dir, shapes_data, tmp_path
):
    model = tiny_model_dir("qwen2_vl")
    # A terminal's Ctrl-C reaches every process of the job at once, and torchrun passes it on again.
    code, err = _preempted_run(model, shapes_data, tmp_path / "run", lambda p: os.killpg(p.pid, signal.SIGINT))
    assert code != 0
    _stopped_together(tmp_path / "run", err, "SIGINT")
    assert "vlmtune: interrupted" not in err, "the signal passed on by torchrun is not a second Ctrl-C"
    assert err.count("SIGINT received: saving a checkpoint") == 2  # each process, once

    def job(out: Path, *extra: str) -> None:
        done = subprocess.run(
            [*TORCHRUN_2, *_job_flags(model, shapes_data, out), *extra],
            capture_output=True, text=True, env=_env(), timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    job(tmp_path / "run", "--resume_from_checkpoint", "latest")
    job(tmp_path / "straight")
    got = load_file(tmp_path / "run" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected), "the resumed run is the uninterrupted one"


def test_slurms_warning_signal_to_one_rank_stops_the_whole_job_at_one_step(tiny_model_dir, shapes_data, tmp_path):
    def to_rank_1(launcher):
        os.kill(_ranks(launcher)[1], signal.SIGUSR1)

    out = tmp_path / "run"
    code, err = _preempted_run(
        tiny_model_dir("qwen2_vl"), shapes_data, out, to_rank_1, "--save_on_signal", "SIGTERM", "SIGUSR1"
    )
    assert code != 0
    _stopped_together(out, err, "SIGUSR1")
    assert "vlmtune [rank 1]: SIGUSR1 received" in err and "vlmtune [rank 0]: SIGUSR1" not in err
    # torchrun alone would not pass SIGUSR1 on: said at the start, with the launcher flag that fixes it.
    assert "--signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in err


def test_sigterm_to_the_launcher_alone_checkpoints_every_rank(tiny_model_dir, shapes_data, tmp_path):
    out = tmp_path / "run"
    code, err = _preempted_run(tiny_model_dir("qwen2_vl"), shapes_data, out, lambda p: p.send_signal(signal.SIGTERM))
    assert code != 0
    _stopped_together(out, err, "SIGTERM")


# --- dpo, kto and grpo: a text-only batch on one rank, images on the other --------------------------------


def _mixed_rows(folder: Path, n: int, answer_columns: dict, with_image=lambda i: i % 2 == 0) -> list[dict]:
    """`n` conversational rows: those `with_image` says (by default the even ones) ask about a coloured image,
    the others are text-only (no image). Read in order, the even rows are rank 0's batches of one row and the
    odd ones rank 1's."""
    colours = ["red", "green", "blue"]
    rows = []
    for i in range(n):
        colour = colours[i % 3]
        if with_image(i):
            png(folder / f"img{i}.png", colour)
            content = [{"type": "image"}, {"type": "text", "text": "What colour?"}]
            rows.append({"images": [str(folder / f"img{i}.png")], "prompt": [{"role": "user", "content": content}]})
        else:
            rows.append({"images": [], "prompt": [{"role": "user", "content": f"Say {colour}."}]})
        rows[-1].update({name: make(colour) for name, make in answer_columns.items()})
    return rows


def _job(command: str, flags: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    """`vlmtune COMMAND` as a torchrun job of 2 processes that must finish in time: a hang fails the test,
    and the whole job (launcher and ranks) is killed."""
    launcher = subprocess.Popen(
        [*TORCHRUN_2, command, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        out, err = launcher.communicate()
        pytest.fail(f"vlmtune {command} on 2 processes hung (killed after {timeout} s): {err[-2000:]}")
    assert launcher.returncode == 0, err.split("torch.distributed.elastic")[0][-3000:]
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err)


def _one_adapter_written(done: subprocess.CompletedProcess, out: Path, steps: int) -> None:
    """The ranks stayed in step through batches with and without images, and one process wrote the result."""
    assert f"ranks in step: {steps} steps checked across 2 processes" in done.stdout
    mixed = int(re.search(r"image and text-only batches in one step: (\d+) steps", done.stdout).group(1))
    assert mixed == steps, done.stdout[-2000:]  # every step: images on one rank, none on the other
    assert done.stdout.count("Topology: 2 processes = 1 node(s) x 2, backend gloo, cpu") == 1
    assert done.stdout.count("Saved to") == 1
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_dpo_on_two_processes_with_a_text_only_batch_on_one_rank_finishes_in_step(tiny_model_dir, tmp_path):
    wrong = {"red": "blue", "green": "red", "blue": "green"}
    rows = _mixed_rows(tmp_path, 8, {"chosen": lambda c: c, "rejected": lambda c: wrong[c]})
    data = write_rows(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "dpo"
    flags = _train_flags(
        tiny_model_dir("qwen2_vl"),
        {"train": data},
        out,
        per_device_train_batch_size=1,
        max_steps=4,
        val_split_ratio=0,
        train_sampling_strategy="sequential",  # rank 0 reads the even rows (images), rank 1 the odd ones
        eval_accuracy="false",
    )
    done = _job("dpo", flags)
    _one_adapter_written(done, out, 4)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and any("rewards/accuracies" in entry for entry in state["log_history"])


def test_kto_on_two_processes_with_a_text_only_batch_on_one_rank_finishes_in_step(tiny_model_dir, tmp_path):
    """KTO reads its rows in one seeded shuffled order (`data/kto.py`), 2 rows per rank and step (its KL
    estimate pairs neighbours, and TRL gathers it across the ranks every step): the rows the shuffle puts in
    rank 0's batches have images, rank 1's none, one desirable and one undesirable row in each batch."""
    model, steps = tiny_model_dir("qwen2_vl"), 3
    n = steps * 2 * 2
    answers = {"completion": lambda colour: colour, "label": lambda colour: True}
    first = write_rows(tmp_path / "first.jsonl", _mixed_rows(tmp_path, n, answers))
    processor, spec = load_processing(model)
    data_args = DataArguments(dataset_name=str(first), val_split_ratio=0.0)
    shuffled = build_kto_splits(data_args, spec.encoding, processor, KtoArguments(), seed=0).train
    position = {row["__index__"]: p for p, row in enumerate(shuffled)}  # the order depends on n and the seed only
    rows = _mixed_rows(tmp_path, n, answers, with_image=lambda i: position[i] // 2 % 2 == 0)
    for i, row in enumerate(rows):
        row["label"] = position[i] % 2 == 0
    data = write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "kto"
    flags = _train_flags(
        model, {"train": data}, out, per_device_train_batch_size=2, max_steps=steps, val_split_ratio=0, seed=0,
        eval_accuracy="false",
    )  # fmt: skip
    done = _job("kto", flags)
    _one_adapter_written(done, out, steps)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps and any("kl" in entry for entry in state["log_history"])


def test_grpo_on_two_processes_with_a_text_only_prompt_on_one_rank_finishes_in_step(tiny_model_dir, tmp_path):
    # Two prompts, one with an image: each step's 2 x 2 completions are both prompts, one per rank.
    rows = []
    for row in _mixed_rows(tmp_path, 2, {"answer": lambda c: c}):
        reply = {"role": "assistant", "content": row.pop("answer")}
        rows.append({"images": row["images"], "messages": [*row["prompt"], reply]})
    data = write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "grpo"
    flags = _train_flags(
        tiny_model_dir("qwen2_vl"),
        {"train": data},
        out,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        max_steps=3,
        val_split_ratio=0,
        eval_accuracy="false",
        reward="exact_match",
    )
    done = _job("grpo", flags)
    _one_adapter_written(done, out, 3)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
