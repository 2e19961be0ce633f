"""The hub and the network never crash a run: uploads that cannot work are refused at the start with the
reason and the fix; an upload that fails at the end keeps the trained model and gives the command that
uploads it later; `--report_to` back-ends that are missing or failing cost one warning, not the run.

This machine has no network: the hub is `tests/hub_server.py`, a stand-in on 127.0.0.1 that
huggingface_hub talks to through HF_ENDPOINT, as it would to huggingface.co.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_files import write_rows
from tests.hub_server import FakeHub
from vlmtune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _train_argv(model_dir, shapes_data, out, *extra) -> list[str]:
    return [
        "train",
        "--model_name_or_path",
        model_dir,
        "--dataset_name",
        str(shapes_data["train"]),
        "--output_dir",
        str(out),
        "--use_cpu",
        "--max_steps",
        "2",
        "--max_train_samples",
        "8",
        "--val_split_ratio",
        "0",
        "--eval_accuracy",
        "false",
        *extra,
    ]


def _online(tmp_path, endpoint: str, token: str | None) -> dict:
    """The environment of a user online: huggingface_hub reads these when it is imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf_home")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.pop("HF_TOKEN", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    if token:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture
def online_user(online, monkeypatch, tmp_path):
    """`online_user(endpoint, token)`: this process as `_online`'s user (huggingface_hub's endpoint and token
    as HF_ENDPOINT, HF_TOKEN and an empty HF_HOME set them at import), for checks made before any model
    loads: the same run as a `vlmtune` process's, without its seconds of imports."""
    from huggingface_hub import constants

    def become(endpoint: str, token: str | None) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        if token:
            monkeypatch.setenv("HF_TOKEN", token)

    return become


def _vlmtune(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmtune.cli", *argv], env=env, capture_output=True, text=True, timeout=600
    )


def test_the_trl_recipes_push_to_hub_offline_is_refused_at_the_start(tiny_model_dir, shapes_data, tmp_path, capsys):
    out = tmp_path / "qwen2-7b-instruct-trl-sft-ChartQA"
    with pytest.raises(SystemExit) as refused:
        main(_train_argv(tiny_model_dir("qwen2_vl"), shapes_data, out, "--push_to_hub", "true"))
    err = capsys.readouterr().err
    assert refused.value.code == 1 and "Traceback" not in err and "bug" not in err
    assert "--push_to_hub" in err and "HF_HUB_OFFLINE=1" in err  # what was asked, and why not here
    assert "--push_to_hub false" in err and "vlmtune push" in err  # the fix
    assert not out.exists(), "refused before any work"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "token, repo, reachable, says",
    [
        (None, "my-adapter", True, ["no Hugging Face token", "hf auth login"]),
        ("hf_write", "my-adapter", False, ["no network connection to http://127.0.0.1:", "--push_to_hub false"]),
        ("hf_expired", "my-adapter", True, ["refused the token (401", "hf auth login"]),
        ("hf_read", "my-adapter", True, ["token of tester is read-only", "write access"]),
        ("hf_write", "someone-else/my-adapter", True, ["tester cannot create repositories in 'someone-else'"]),
    ],
    ids=["no token", "no network", "refused token", "read-only token", "foreign namespace"],
)
def test_an_upload_that_cannot_work_is_refused_before_the_model_loads(
    tiny_model_dir, shapes_data, tmp_path, online_user, capsys, token, repo, reachable, says
):
    out = tmp_path / "run"
    argv = _train_argv(tiny_model_dir("qwen2_vl"), shapes_data, out, "--push_to_hub", "true", "--hub_model_id", repo)
    with FakeHub() as hub:
        online_user(hub.url if reachable else f"http://127.0.0.1:{_closed_port()}", token)
        with pytest.raises(SystemExit) as refused:
            main(argv)
    err = capsys.readouterr().err
    assert refused.value.code == 1, err[-2000:]
    assert "Traceback" not in err and f"--push_to_hub to {repo}" in err
    for text in says:
        assert text in err, (text, err[-2000:])
    assert "Loading weights" not in err and not out.exists(), "refused before any work"
    assert not hub.repos, "nothing was created on the hub"


def test_a_failed_upload_at_the_end_keeps_the_model_and_vlmtune_push_uploads_it_later(
    tiny_model_dir, shapes_data, tmp_path, online_user, capsys
):
    out = tmp_path / "run"
    with FakeHub() as hub:
        env = _online(tmp_path, hub.url, "hf_write")
        hub.uploads_fail = True  # the hub was there at the start; its uploads fail by the end
        argv = _train_argv(tiny_model_dir("qwen2_vl"), shapes_data, out, "--push_to_hub", "true")
        trained = _vlmtune([*argv, "--hub_model_id", "my-adapter"], env)
        assert trained.returncode == 1, trained.stderr[-3000:]
        err = trained.stderr
        assert "Traceback" not in err and "HTTP Request" not in err
        assert f"the result is saved in {out}, but uploading it to tester/my-adapter failed" in err
        assert "the hub answered 503" in err
        command = f"vlmtune push {out} --hub_model_id tester/my-adapter"
        assert f"Upload it later with: {command}" in err
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
        assert not hub.repos["tester/my-adapter"], "the repository was created, nothing was uploaded"

        hub.uploads_fail = False
        online_user(hub.url, "hf_write")  # the same user, later: `vlmtune push` (in this process)
        main(command.split()[1:])
        assert f"Uploaded {out} to {hub.url}/tester/my-adapter" in capsys.readouterr().out
    uploaded = hub.repos["tester/my-adapter"]
    local = {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("_")}
    assert set(uploaded) == local and "adapter_model.safetensors" in uploaded and "README.md" in uploaded
    assert all(uploaded[name] == (out / name).read_bytes() for name in uploaded)
    assert not any(name.startswith("checkpoint-") for name in uploaded)


def test_vlmtune_push_offline_says_why_and_uploads_nothing(tmp_path, capsys):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as refused:
        main(["push", str(folder), "--hub_model_id", "me/adapter"])
    err = capsys.readouterr().err
    assert refused.value.code == 1 and "vlmtune push to me/adapter" in err and "HF_HUB_OFFLINE=1" in err


# --- --report_to --------------------------------------------------------------------------------------


def test_a_report_to_back_end_that_is_not_installed_costs_one_line_and_the_run_logs_locally(
    tiny_model_dir, shapes_data, tmp_path, capsys
):
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    if "mlflow" in get_available_reporting_integrations():
        pytest.skip("mlflow is installed here")
    out = tmp_path / "run"
    main(_train_argv(tiny_model_dir("qwen2_vl"), shapes_data, out, "--report_to", "mlflow"))
    printed = capsys.readouterr()
    line = "--report_to mlflow: mlflow is not installed (pip install mlflow): logging locally only"
    assert (printed.out + printed.err).count(line) == 1, printed
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "adapter_model.safetensors").is_file()


def test_a_report_to_back_end_that_fails_steps_aside_with_one_warning(tiny_model_dir, shapes_data, tmp_path):
    pytest.importorskip("wandb")  # W&B with no login, online: its own init fails (not installed here by default)
    env = {**os.environ, "WANDB_MODE": "online", "WANDB_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_DISABLED", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    out = tmp_path / "run"
    done = _vlmtune(_train_argv(tiny_model_dir("qwen2_vl"), shapes_data, out, "--report_to", "wandb"), env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("--report_to wandb failed") == 1
    assert "training goes on, logged locally only" in done.stderr and "WANDB_MODE=offline" in done.stderr
    assert (out / "adapter_model.safetensors").is_file()

    env["WANDB_MODE"] = "offline"  # honoured: W&B logs to its folder, nothing fails
    offline = _vlmtune(
        _train_argv(tiny_model_dir("qwen2_vl"), shapes_data, tmp_path / "off", "--report_to", "wandb"), env
    )
    assert offline.returncode == 0 and "--report_to wandb failed" not in offline.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*"))


# --- downloads the data asks for: a hub dataset id, image URLs in rows -------------------------------------


def _inspect(tiny_model_dir, dataset) -> list[str]:
    return ["data", "inspect", "--model_name_or_path", tiny_model_dir("qwen2_vl"), "--dataset_name", str(dataset)]


def test_a_hub_dataset_offline_says_what_why_and_how_to_bring_it(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as refused:
        main(_inspect(tiny_model_dir, "HuggingFaceM4/ChartQA"))
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "Traceback" not in err
    assert "HuggingFaceM4/ChartQA: no such local file or folder" in err  # what was asked
    assert "offline mode is on (HF_HUB_OFFLINE=1" in err  # why not here
    assert "load_dataset('HuggingFaceM4/ChartQA').save_to_disk('ChartQA')" in err  # the fix, either way
    assert "--dataset_name ChartQA" in err and "unset HF_HUB_OFFLINE" in err


def test_a_hub_dataset_without_a_network_says_so(tiny_model_dir, online_user, monkeypatch, capsys, caplog):
    import datasets

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    online_user(endpoint, None)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    with pytest.raises(SystemExit) as refused:
        main(_inspect(tiny_model_dir, "HuggingFaceM4/ChartQA"))
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "Traceback" not in err, err[-2000:]
    assert "HuggingFaceM4/ChartQA: no such local file or folder" in err
    assert "no network connection to http://127.0.0.1:" in err and "save_to_disk" in err
    assert "Retrying in" not in caplog.text + err, "one refused connection says so, without 23 s of retries"


def test_an_image_url_in_a_row_offline_names_the_row_the_url_and_the_fix(tiny_model_dir, tmp_path, capsys):
    url = "https://example.com/chart.png"
    data = write_rows(tmp_path / "d.csv", [{"image_path": url, "prompt": "Highest value?", "response": "42"}])
    with pytest.raises(SystemExit) as refused:
        main(_inspect(tiny_model_dir, data))
    err = capsys.readouterr().err
    assert refused.value.code == 1 and "Traceback" not in err
    assert f"{data}, row 0, field 'image_path', image 0: image URL '{url}' cannot be downloaded" in err
    assert "offline mode is on (HF_HUB_OFFLINE=1" in err
    assert "write their local paths in the data" in err and "unset HF_HUB_OFFLINE" in err
