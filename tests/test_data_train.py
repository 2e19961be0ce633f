"""Each schema, written to a real file of its usual kind, trains a few steps end to end."""

from __future__ import annotations

import json
import math

import datasets
import pytest
from PIL import Image

from tests.data_files import data_uri, png, png_bytes, shapes_rows, write_rows
from tests.helpers import train_args
from vlmtune.train.run import run_training

COLOURS = ("red", "green", "blue", "red", "green", "blue")


def csv_prompt_response(folder):
    return write_rows(folder / "train.csv", shapes_rows(folder, n=6)), {}


def jsonl_messages(folder):
    png(folder / "imgs" / "x.png", "green")
    rows = []
    for colour in COLOURS:
        messages = [
            {"role": "system", "content": [{"type": "text", "text": "One word."}]},
            {
                "role": "user",
                "content": [{"type": "image", "image": data_uri(colour)}, {"type": "text", "text": "Colour?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": colour}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "green"}]},
        ]
        rows.append({"messages": messages, "images": ["imgs/x.png"]})
    return write_rows(folder / "chat.jsonl", rows), {"dataset_text_field": "messages", "dataset_image_field": "images"}


def parquet_query_label(folder):
    rows = [
        {"image": {"bytes": png_bytes(c), "path": None}, "query": "Colour?", "label": [c, c.upper()]} for c in COLOURS
    ]
    return write_rows(folder / "chartqa.parquet", rows), {"system_prompt": "You read charts."}


def json_vizsage_with_context(folder):
    rows = []
    for i, colour in enumerate(COLOURS):
        png(folder / "Images" / f"{i}.png", colour)
        rows.append({"image": f"{i}.png", "question": "Who?", "answer": "Monet", "need_external_knowledge": i % 2 == 0})
    (folder / "semart.csv").write_text("IMAGE_FILE,DESCRIPTION\n0.png,Water lilies\n2.png,Haystacks\n")
    path = write_rows(folder / "AQUA" / "train.json", rows)
    return path, {
        "image_root": str(folder / "Images"),
        "context_file": str(folder / "semart.csv"),
        "context_join_on": "image=IMAGE_FILE",
    }


def save_to_disk_image_feature(folder):
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    data = {
        "image": [Image.new("RGB", (48, 40), c) for c in COLOURS],
        "question": ["Colour?"] * 6,
        "answer": list(COLOURS),
    }
    train = datasets.Dataset.from_dict(data, features=features)
    datasets.DatasetDict({"train": train, "validation": train.select([0, 1])}).save_to_disk(str(folder / "saved"))
    return folder / "saved", {}


def streaming_jsonl(folder):
    path = write_rows(folder / "big.jsonl", shapes_rows(folder, n=6))
    return path, {"streaming": True, "stream_buffer_size": 4}


CASES = {
    "csv": (csv_prompt_response, "qwen2_vl", "prompt/response (prompt/response); image column: image_path"),
    "jsonl": (jsonl_messages, "qwen2_vl", "messages (messages); image column: images"),
    "parquet": (parquet_query_label, "llava", "prompt/response (query/label); image column: image"),
    "json": (json_vizsage_with_context, "qwen2_vl", "kept as metadata: need_external_knowledge; context from"),
    "save_to_disk": (save_to_disk_image_feature, "qwen2_vl", "prompt/response (question/answer); image column: image"),
    "streaming": (streaming_jsonl, "qwen2_vl", "prompt/response (prompt/response); image column: image_path"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_schema_trains_from_its_file(case, tmp_path, tiny_model_dir, capsys):
    write, family, detected = CASES[case]
    dataset, data_overrides = write(tmp_path / "data")
    args = train_args(
        tiny_model_dir(family),
        str(dataset),
        str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        max_eval_samples=2,
        max_new_tokens=2,
        val_split_ratio=0.34,
        eval_accuracy=case == "parquet",  # generation costs seconds; one case checks the references
        **data_overrides,
    )
    result = run_training(*args)
    printed = capsys.readouterr().out
    assert detected in printed and "samples kept" in printed
    assert result.trainer.state.global_step == 2 and math.isfinite(result.metrics["train_loss"])
    if case == "parquet":  # ChartQA label lists: every acceptable answer is a reference
        lines = (result.output_dir / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all(p["references"][1] == p["references"][0].upper() for p in map(json.loads, lines))
