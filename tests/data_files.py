"""Writers for the small data files the data tests build: images and rows in every supported format."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import datasets
from PIL import Image

from vlmtune.config import DataArguments


def png_bytes(colour: str = "red", size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def png(path: Path, colour: str = "red", size: tuple[int, int] = (64, 64), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(colour, size, mode))
    return path


def data_uri(colour: str = "blue", size: tuple[int, int] = (64, 64)) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(colour, size)).decode()


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write `rows` as the file type `path`'s suffix names (csv, tsv, json array, jsonl, parquet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        raise ValueError(suffix)
    return path


def shapes_rows(folder: Path, n: int = 6, prefix: str = "img") -> list[dict]:
    """`n` image_path/prompt/response rows whose images (relative paths) are written under `folder`."""
    colours = ["red", "green", "blue"]
    rows = []
    for i in range(n):
        colour = colours[i % 3]
        png(folder / "images" / f"{prefix}{i}.png", colour)
        rows.append({"image_path": f"images/{prefix}{i}.png", "prompt": "What colour?", "response": colour})
    return rows


def data_args(dataset: str, **overrides) -> DataArguments:
    return DataArguments(dataset_name=dataset, **overrides)
