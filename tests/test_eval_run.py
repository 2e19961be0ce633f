"""Evaluation, inference and export end to end on a tiny trained Qwen2-VL (and LLaVA for export)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText

from tests.helpers import train_args
from vlmtune.cli import main
from vlmtune.eval.plots import EVAL_PLOT, TRAINING_PLOT
from vlmtune.train.run import run_training

EVAL_SAMPLES_DURING_TRAINING = 30


@pytest.fixture(scope="module")
def trained(tiny_model_dir, shapes_data, tmp_path_factory):
    """LoRA on the shapes task with accuracy measured at every evaluation (about 10 s on 2 cores).

    Trained only part way (about 80% held-out accuracy), so right and wrong answers both occur.
    """
    out = tmp_path_factory.mktemp("eval_run")
    args = train_args(
        tiny_model_dir("qwen2_vl"),
        str(shapes_data["train"]),
        str(out),
        str(shapes_data["validation"]),
        max_steps=150,
        per_device_train_batch_size=8,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        eval_strategy="steps",
        eval_steps=50,
        eval_metrics=["exact_match", "relaxed_accuracy", "loss"],
        eval_metrics_samples=EVAL_SAMPLES_DURING_TRAINING,
        metric_for_best_model="exact_match",
    )
    return run_training(*args)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_evaluates_accuracy_at_each_evaluation_and_plots(trained):
    history = trained.trainer.state.log_history
    evals = [e for e in history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [50, 100, 150]
    for e in evals:
        assert e["eval_generation_samples"] == EVAL_SAMPLES_DURING_TRAINING
        assert 0.0 <= e["eval_exact_match"] <= 1.0 and "eval_relaxed_accuracy" in e
    accuracies = [e["eval_exact_match"] for e in evals]
    assert accuracies[-1] > accuracies[0] and accuracies[-1] >= 0.5  # it learns, and the metric sees it
    # metric_for_best_model can use accuracy, not only loss.
    assert trained.trainer.state.best_metric == max(accuracies)
    for name in (TRAINING_PLOT, EVAL_PLOT):
        with Image.open(trained.output_dir / name) as image:
            pixels = image.convert("L")
            assert image.width >= 600 and len(set(pixels.getdata())) > 20, f"{name} looks empty"


def test_eval_command_reproduces_the_training_runs_accuracy(trained, shapes_data, tmp_path, capsys):
    out = tmp_path / "eval"
    main(
        [
            "eval",
            "--adapter",
            str(trained.output_dir),
            "--dataset_name",
            str(shapes_data["validation"]),
            "--output_dir",
            str(out),
            "--metrics",
            "exact_match",
            "relaxed_accuracy",
            "loss",
            "--per_device_eval_batch_size",
            "8",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    accuracy = trained.metrics["eval_exact_match"]
    assert 0.3 < accuracy < 1.0, "a run part-way trained makes the comparison meaningful"
    assert metrics["samples"] == 60
    assert (
        metrics["exact_match"] == accuracy and metrics["relaxed_accuracy"] == trained.metrics["eval_relaxed_accuracy"]
    )
    assert metrics["loss"] == pytest.approx(trained.metrics["eval_loss"], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-6)

    ours, theirs = _read_jsonl(out / "predictions.jsonl"), _read_jsonl(trained.output_dir / "predictions.jsonl")
    assert [p["prediction"] for p in ours] == [p["prediction"] for p in theirs]
    first = ours[0]
    assert first["id"] == 0 and first["images"] == ["images/validation_0000.png"]
    assert first["prompt"] == "What colour is the shape? Answer with one word."
    assert set(first["scores"]) == {"exact_match", "relaxed_accuracy", "loss"} and first["answer_tokens"] >= 2
    assert sum(p["scores"]["exact_match"] for p in ours) / 60 == pytest.approx(accuracy)
    printed = capsys.readouterr().out
    assert "report.html" in printed and "exact_match" in printed
    report = (out / "report.html").read_text()
    assert f"{100 * accuracy:.1f}%" in report and report.count("data:image/png;base64,") == 60


def test_group_by_label_lists_and_debug_view(trained, shapes_data, tmp_path, capsys):
    """VizSage-style JSON: per-group results for `need_external_knowledge`; `answer` lists count any match."""
    import csv

    rows = list(csv.DictReader(open(shapes_data["validation"])))
    data = []
    for i, row in enumerate(rows):
        external = i % 3 == 0
        # Rows needing "external knowledge" get an answer the model cannot give; the others a label list
        # whose second entry is the true colour.
        answer = ["a sunset over the sea"] if external else ["not this", row["response"]]
        data.append(
            {
                "image": row["image_path"],
                "question": row["prompt"],
                "answer": answer,
                "need_external_knowledge": external,
            }
        )
    path = shapes_data["validation"].parent / "vizsage_val.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "grouped"
    main(
        [
            "eval",
            "--adapter",
            str(trained.output_dir),
            "--dataset_name",
            str(path),
            "--output_dir",
            str(out),
            "--metrics",
            "exact_match,exact_match_raw,token_f1",
            "--group_by",
            "need_external_knowledge",
            "--debug_samples",
            "2",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    groups = metrics["groups"]["need_external_knowledge"]
    assert groups["True"]["samples"] == 20 and groups["False"]["samples"] == 40
    assert groups["True"]["exact_match"] == 0.0
    # The same images and prompts as the training run's eval, so the same answers: the label list's
    # second entry makes every right answer count.
    trained_scores = [p["scores"]["exact_match"] for p in _read_jsonl(trained.output_dir / "predictions.jsonl")]
    expected = sum(s for i, s in enumerate(trained_scores) if i % 3) / 40
    assert expected > 0.3 and groups["False"]["exact_match"] == pytest.approx(expected)
    assert metrics["exact_match"] == pytest.approx(expected * 40 / 60)
    predictions = _read_jsonl(out / "predictions.jsonl")
    assert predictions[1]["references"] == ["not this", rows[1]["response"]]
    assert predictions[0]["groups"] == {"need_external_knowledge": True}

    printed = capsys.readouterr().out
    assert "--- sample 1 (id 0) ---" in printed and "--- sample 2 (id 1) ---" in printed
    assert "--- sample 3" not in printed and "normalised" in printed
    assert "need_external_knowledge=True" in printed and "need_external_knowledge=False" in printed
    report = (out / "report.html").read_text()
    assert 'data-column="need_external_knowledge"' in report


def test_unknown_group_column_is_a_clear_error(trained, shapes_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "eval",
                "--adapter",
                str(trained.output_dir),
                "--dataset_name",
                str(shapes_data["validation"]),
                "--output_dir",
                str(tmp_path),
                "--group_by",
                "difficulty",
                "--max_eval_samples",
                "2",
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "no such metadata column" in err and "Traceback" not in err


def test_predict_answers_a_jsonl_of_requests(trained, shapes_data, tmp_path):
    requests = tmp_path / "requests.jsonl"
    image_dir = shapes_data["validation"].parent / "images"
    lines = [
        {
            "id": "a",
            "image": str(image_dir / "validation_0000.png"),
            "prompt": "What colour is the shape? Answer with one word.",
        },
        {
            "id": "b",
            "images": [str(image_dir / "validation_0001.png")],
            "question": "What colour is the shape? Answer with one word.",
        },
        {
            "id": "c",
            "image": str(image_dir / "validation_0002.png"),
            "prompt": "What colour is the shape? Answer with one word.",
        },
    ]
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = tmp_path / "answers.jsonl"
    main(["predict", "--adapter", str(trained.output_dir), "--requests", str(requests), "--output_file", str(answers)])
    got = _read_jsonl(answers)
    expected = [p["prediction"] for p in _read_jsonl(trained.output_dir / "predictions.jsonl")[:3]]
    assert [g["id"] for g in got] == ["a", "b", "c"] and [g["answer"] for g in got] == expected


# Loads a merged model with plain transformers, vlmtune blocked from importing, and writes its inputs and
# logits for one image and prompt. Where AutoProcessor cannot work (Qwen2-VL without torchvision: no video
# processor), it uses the family's processor class with the video part left out, as docs/evaluate.md says.
PLAIN_LOAD = r"""
import json, sys
sys.modules["vlmtune"] = None  # any attempt to import vlmtune fails
import torch, transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

out, result = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(out).eval()
try:
    processor, how = AutoProcessor.from_pretrained(out), "AutoProcessor"
except (OSError, ImportError, ValueError) as err:
    cls = getattr(transformers, json.load(open(f"{out}/processor_config.json"))["processor_class"])
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    body = {"get_attributes": classmethod(lambda c: attributes), "video_processor": None}
    image_only = type(cls.__name__, (cls,), body)
    processor, how = image_only.from_pretrained(out), f"{cls.__name__} without video ({type(err).__name__})"
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = processor(text=[text], images=[[Image.new("RGB", (64, 64), (30, 60, 220))]], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
torch.save({"inputs": dict(inputs), "logits": logits, "how": how}, result)
"""


def _merge_and_compare(base_dir: str, adapter_dir, out, tmp_path) -> str:
    main(["merge", "--adapter", str(adapter_dir), "--output_dir", str(out)])
    for name in ("model.safetensors", "config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (out / name).is_file(), name
    result = tmp_path / "plain.pt"
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), str(result)], check=True, cwd=tmp_path)
    plain = torch.load(result, weights_only=False)
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        expected = adapted(**plain["inputs"]).logits
        torch.testing.assert_close(plain["logits"], expected, rtol=1e-4, atol=1e-4)
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(**plain["inputs"]).logits, expected, atol=1e-3), "adapter must matter"
    return plain["how"]


def test_merged_model_loads_without_vlmtune_and_equals_the_adapter(trained, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    how = _merge_and_compare(tiny_model_dir("qwen2_vl"), trained.output_dir, out, tmp_path)
    if importlib.util.find_spec("torchvision") is None:
        # AutoProcessor finds the video processor's config and stops only for lack of torchvision.
        assert how == "Qwen2VLProcessor without video (ImportError)"
    else:
        assert how == "AutoProcessor"
    assert (out / "preprocessor_config.json").is_file()  # what AutoProcessor builds the video part from

    # Never overwrite a model unless asked.
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--adapter", str(trained.output_dir), "--output_dir", str(out)])
    assert exit_info.value.code == 1 and "--overwrite_output_dir" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    main(["merge", "--adapter", str(trained.output_dir), "--output_dir", str(out), "--overwrite_output_dir", "true"])


def test_merged_llava_loads_with_auto_processor(tiny_model_dir, shapes_data, tmp_path):
    adapter = tmp_path / "llava_adapter"
    args = train_args(
        tiny_model_dir("llava"), str(shapes_data["train"]), str(adapter), max_steps=3, eval_accuracy=False
    )
    run_training(*args)
    assert _merge_and_compare(tiny_model_dir("llava"), adapter, tmp_path / "merged", tmp_path) == "AutoProcessor"
