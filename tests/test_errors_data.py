"""Bad data is a message naming the file, line or row, and field, never a traceback; good data reaches the
model exactly as written (text as typed, pictures as they look in a viewer)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tests.data_files import data_args, png, png_bytes, write_rows
from tests.helpers import family_spec, short_run
from vlmtune.cli import main
from vlmtune.data.collate import VlmCollator
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.data.splits import build_splits
from vlmtune.models.tiny import BUILDERS

ROW = {"image_path": "ok.png", "prompt": "Q?", "response": "red"}


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _csv_row(folder: Path, **changes) -> Path:
    """A one-row CSV beside a good ok.png, with `changes` applied to the row."""
    png(folder / "ok.png")
    return write_rows(folder / "d.csv", [{**ROW, **changes}])


def _saved_then_damaged(folder: Path) -> Path:
    datasets.Dataset.from_list([ROW]).save_to_disk(str(folder / "saved"))
    for arrow in (folder / "saved").glob("*.arrow"):
        arrow.write_bytes(b"not arrow at all")
    return folder / "saved"


def _folder_with_other_columns(folder: Path) -> Path:
    png(folder / "data" / "ok.png")
    write_rows(folder / "data" / "a_train.csv", [ROW])
    write_rows(folder / "data" / "b_train.csv", [{"image": "ok.png", "question": "Q?", "answer": "red"}])
    return folder / "data"


def _image_row(folder: Path, data: bytes) -> Path:
    _write(folder / "pic.png", data)
    return _csv_row(folder, image_path="pic.png")


def _messages_row(folder: Path, messages, **extra) -> Path:
    png(folder / "ok.png")
    return write_rows(folder / "d.jsonl", [{"messages": messages, **extra}])


USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}
ANSWER = {"role": "assistant", "content": "red"}

# kind -> (write the data under a folder, return --dataset_name; what the message must contain).
# `{d}` in an expected piece is the data's folder.
BAD = {
    "empty csv file": (lambda d: _write(d / "d.csv", b""), ["{d}/d.csv: the file is empty"]),
    "empty jsonl file": (lambda d: _write(d / "d.jsonl", b""), ["{d}/d.jsonl: the file is empty"]),
    "csv header only": (lambda d: _write(d / "d.csv", "image_path,prompt,response\n"), ["{d}/d.csv: no rows"]),
    "csv not utf-8": (
        lambda d: _write(d / "d.csv", b"image_path,prompt,response\nok.png,Q?,red\nok.png,caf\xe9?,red\n"),
        ["{d}/d.csv, line 3: not valid UTF-8", "byte 0xe9"],
    ),
    "tsv not utf-8": (
        lambda d: _write(d / "d.tsv", b"image_path\tprompt\tresponse\nok.png\t\xff\tred\n"),
        ["{d}/d.tsv, line 2: not valid UTF-8"],
    ),
    "jsonl not utf-8": (
        lambda d: _write(d / "d.jsonl", b'{"prompt": "Q?"}\n{"prompt": "\x80"}\n'),
        ["{d}/d.jsonl, line 2: not valid UTF-8"],
    ),
    "csv row with extra fields": (
        lambda d: _write(d / "d.csv", "image_path,prompt,response\nok.png,Q?,red\nok.png,Q, really?,red\n"),
        ["{d}/d.csv, line 3: 4 fields, but the header has 3"],
    ),
    "csv header with an unnamed column": (
        lambda d: _write(d / "d.csv", "image_path,prompt,response,\nok.png,Q?,red,\n"),
        ["{d}/d.csv, line 1: column 4 of the header has no name"],
    ),
    "tsv repeated column name": (
        lambda d: _write(d / "d.tsv", "prompt\tprompt\tresponse\nQ?\tQ?\tred\n"),
        ["{d}/d.tsv, line 1: column name(s) 'prompt' appear more than once"],
    ),
    "broken jsonl line": (
        lambda d: _write(d / "d.jsonl", '{"prompt": "Q?", "response": "a"}\n{"prompt": "Q?", "response": \n'),
        ["{d}/d.jsonl, line 2: not valid JSON"],
    ),
    "jsonl line not an object": (
        lambda d: _write(d / "d.jsonl", '{"prompt": "Q?", "response": "a"}\n["Q?", "a"]\n'),
        ["{d}/d.jsonl, line 2: expected a JSON object {{...}}, got an array"],
    ),
    "json syntax error": (
        lambda d: _write(
            d / "d.json", '[\n  {"prompt": "Q?", "response": "a"},\n  {"prompt": "Q?" "response": "b"}\n]'
        ),
        ["{d}/d.json, line 3, column 19: not valid JSON"],
    ),
    "json not an array": (lambda d: _write(d / "d.json", '"just text"'), ["{d}/d.json: expected a JSON array"]),
    "json array item not an object": (
        lambda d: _write(d / "d.json", '[{"prompt": "Q?", "response": "a"}, 42]'),
        ["{d}/d.json, row 1: expected a JSON object {{...}}, got a string or number"],
    ),
    "truncated gzip file": (
        lambda d: _write(d / "d.jsonl.gz", gzip.compress(b'{"prompt": "Q?", "response": "red"}\n' * 50)[:-12]),
        ["{d}/d.jsonl.gz: cannot decompress this gzip file"],
    ),
    "damaged parquet": (
        lambda d: _write(d / "d.parquet", b"PAR1 this is not parquet"),
        ["{d}/d.parquet: cannot read this Parquet file"],
    ),
    "damaged save_to_disk folder": (_saved_then_damaged, ["{d}/saved: cannot read this save_to_disk folder"]),
    "folder files with different columns": (
        _folder_with_other_columns,
        ["{d}/data: the train files do not have the same columns", "a_train.csv", "b_train.csv", "lacks image_path"],
    ),
    "folder without data files": (lambda d: _write(d / "data" / "notes.txt", "hi").parent, ["no .csv"]),
    "unsupported file type": (lambda d: _write(d / "d.xlsx", b"PK\x03\x04"), ["{d}/d.xlsx: unsupported file type"]),
    "missing data file": (lambda d: d / "trian.csv", ["{d}/trian.csv: no such file or folder"]),
    "empty required csv cell": (lambda d: _csv_row(d, response=""), ["{d}/d.csv, row 0, field 'response': empty"]),
    "missing image file": (
        lambda d: _csv_row(d, image_path="nope.png"),
        ["{d}/d.csv, row 0, field 'image_path', image 0: image file not found: 'nope.png'"],
    ),
    "not an image": (
        lambda d: _image_row(d, b"GIF89a but not really"),
        ["{d}/d.csv, row 0, field 'image_path', image 0: cannot decode image"],
    ),
    "truncated png": (
        lambda d: _image_row(d, png_bytes("red", (64, 64))[:60]),
        ["{d}/d.csv, row 0, field 'image_path', image 0: cannot decode image"],
    ),
    "image url with another scheme": (
        lambda d: _csv_row(d, image_path="s3://bucket/ok.png"),
        ["{d}/d.csv, row 0, field 'image_path', image 0: unsupported URL scheme 's3'"],
    ),
    "invalid base64 image": (
        lambda d: _csv_row(d, image_path="data:image/png;base64,@@@@"),
        ["{d}/d.csv, row 0, field 'image_path', image 0: invalid base64"],
    ),
    "model's image token typed in a csv prompt": (
        lambda d: _csv_row(d, prompt="<|image_pad|> Q?"),
        ["{d}/d.csv, row 0, field 'prompt': the text contains '<|image_pad|>'", "remove '<|image_pad|>' from it"],
    ),
    "messages not json in csv": (
        lambda d: write_rows(d / "d.csv", [{"messages": '[{"role": "user", "content": "Q?"', "image": ""}]),
        ["{d}/d.csv, row 0, field 'messages': not valid JSON"],
    ),
    "messages unknown role": (
        lambda d: _messages_row(d, [{"role": "bot", "content": "Q?"}, ANSWER], images=["ok.png"]),
        ["{d}/d.jsonl, row 0, field 'messages', message 0: role 'bot'"],
    ),
    "messages placeholders and images disagree": (
        lambda d: _messages_row(d, [USER, ANSWER], images=["ok.png", "ok.png"]),
        ["{d}/d.jsonl, row 0, field 'messages': 1 image placeholder(s) but 2 image(s)"],
    ),
    "messages end with a user turn": (
        lambda d: _messages_row(d, [USER], images=["ok.png"]),
        ["{d}/d.jsonl, row 0, field 'messages': the last message must be a non-empty assistant turn"],
    ),
}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_data_is_a_message_naming_where_never_a_traceback(tmp_path, tiny_model_dir, capsys, kind):
    write, expected = BAD[kind]
    dataset = write(tmp_path)
    code, err = _run(
        ["data", "inspect", "--model_name_or_path", tiny_model_dir("qwen2_vl"), "--dataset_name", str(dataset)], capsys
    )
    assert code == 1, err
    assert "Traceback" not in err and "\nvlmtune: error: " in f"\n{err}"
    for piece in expected:
        assert piece.format(d=tmp_path) in err


def test_train_stops_at_a_bad_row_in_a_field_of_mixed_kinds(tmp_path, tiny_model_dir, capsys):
    """A list in one row of a text field (JSON) stops `train` before the model sees anything, naming it."""
    png(tmp_path / "ok.png")
    data = write_rows(tmp_path / "d.jsonl", [ROW, {**ROW, "prompt": ["Q?", "again"]}, ROW])
    argv = ["train", "--model_name_or_path", tiny_model_dir("qwen2_vl"), "--dataset_name", str(data)]
    code, err = _run([*argv, "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--max_steps", "1"], capsys)
    assert code == 1 and "Traceback" not in err
    assert f"{data}, row 1, field 'prompt': expected text, got list" in err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# ---- what the user wrote is what trains ------------------------------------------------------------------

WRITTEN = ["007", "1.50", "None", "NA", "NaN", "3", "n/a", "-0", "1e3", "TRUE"]


def _trained_texts(model_dir: str, dataset: Path, family: str = "qwen2_vl") -> tuple[list[dict], list[str]]:
    """The collator's labels for every row, decoded: exactly the text the model is trained to write."""
    from vlmtune.models.processors import load_processor

    processor = load_processor(model_dir)
    splits = build_splits(data_args(str(dataset), val_split_ratio=0), family_spec(family).encoding, processor=processor)
    rows = list(splits.train)
    batch = VlmCollator(processor, splits.preparer)(rows)
    texts = [processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) for labels in batch["labels"]]
    return rows, texts


def _answer_of(trained: str) -> str:
    """The trained text minus the turn-end token the template adds after each answer."""
    return trained.split("<|im_end|>")[0]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_cells_train_as_written_not_as_numbers_or_missing(tmp_path, tiny_model_dir, suffix):
    png(tmp_path / "ok.png")
    # `note` has gaps: pandas would read its `3` as 3.0 and the gaps as NaN.
    rows = [{**ROW, "response": w, "note": "3" if i % 2 else ""} for i, w in enumerate(WRITTEN)]
    data = write_rows(tmp_path / f"d{suffix}", rows)
    loaded, trained = _trained_texts(tiny_model_dir("qwen2_vl"), data)
    assert [_answer_of(t) for t in trained] == WRITTEN
    assert [r["note"] for r in loaded] == ["", "3"] * 5


def test_json_numbers_train_as_written(tmp_path, tiny_model_dir):
    png(tmp_path / "ok.png")
    lines = [
        '{"image_path": "ok.png", "prompt": "Q?", "response": 1.50, "score": 0.10}',
        '{"image_path": "ok.png", "prompt": "Q?", "response": 10.0}',
        '{"image_path": "ok.png", "prompt": "Q?", "response": 1e3}',
        '{"image_path": "ok.png", "prompt": "Q?", "response": -0}',
        '{"image_path": "ok.png", "prompt": "Q?", "response": true}',
        '{"image_path": "ok.png", "prompt": "Q?", "response": "007"}',
    ]
    data = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    loaded, trained = _trained_texts(tiny_model_dir("qwen2_vl"), data)
    assert [_answer_of(t) for t in trained] == ["1.50", "10.0", "1e3", "-0", "true", "007"]
    assert loaded[0]["score"] == "0.10"


def test_json_messages_keep_numbers_and_structure(tmp_path, tiny_model_dir):
    """A number as an assistant's whole content (ShareGPT exports have these) trains as written."""
    png(tmp_path / "ok.png")
    user = json.dumps(USER)
    data = _write(
        tmp_path / "d.json",
        f'[{{"messages": [{user}, {{"role": "assistant", "content": 2.50}}], "images": ["ok.png"]}}]',
    )
    _, trained = _trained_texts(tiny_model_dir("qwen2_vl"), data)
    assert [_answer_of(t) for t in trained] == ["2.50"]


def test_messages_as_json_text_in_a_csv_keep_numbers(tmp_path, tiny_model_dir):
    png(tmp_path / "ok.png")
    messages = f'[{json.dumps(USER)}, {{"role": "assistant", "content": 0.50}}]'
    data = write_rows(tmp_path / "d.csv", [{"messages": messages, "image": "ok.png"}])
    _, trained = _trained_texts(tiny_model_dir("qwen2_vl"), data)
    assert [_answer_of(t) for t in trained] == ["0.50"]


# ---- pictures as they look in a viewer ---------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def _sixteen_bit() -> bytes:
    pixels = np.zeros((32, 32), np.uint16)
    pixels[:, 16:] = 60000  # dark left half, light grey right half
    pixels[:, :16] = 1000
    return _encoded(Image.fromarray(pixels))


def _rotated_by_exif() -> bytes:
    """Stored 64x32 with blue on the left; EXIF orientation 6 says: show it turned 90 degrees clockwise."""
    image = Image.new("RGB", (64, 32), "red")
    image.paste((0, 0, 255), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(image, "JPEG", exif=exif, quality=95)


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (32, 32), 1)
    image.putpalette([255, 0, 0, 0, 0, 0])
    image.paste(0, (0, 0, 16, 32))  # left half red, right half transparent (its colour is black)
    return _encoded(image, transparency=1)


def _cmyk() -> bytes:
    return _encoded(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)


def _grey_with_alpha() -> bytes:
    return _encoded(Image.new("LA", (32, 32), (0, 0)))


def _float_in_unit_range() -> bytes:
    return _encoded(Image.fromarray(np.full((32, 32), 0.25, np.float32)), "TIFF")


def _one_bit() -> bytes:
    image = Image.new("1", (32, 32), 1)
    image.paste(0, (0, 0, 16, 32))
    return _encoded(image)


def _close(pixel, expected, tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


PICTURES = {
    # kind -> (bytes, size the model gets, [(point, colour)])
    "16-bit greyscale": (_sixteen_bit, (32, 32), [((4, 4), (4, 4, 4)), ((28, 4), (233, 233, 233))]),
    "EXIF-rotated JPEG": (_rotated_by_exif, (32, 64), [((16, 8), (0, 0, 255)), ((16, 56), (255, 0, 0))]),
    "palette with transparency": (
        _palette_with_transparency,
        (32, 32),
        [((4, 4), (255, 0, 0)), ((28, 4), (255, 255, 255))],
    ),
    "CMYK JPEG": (_cmyk, (32, 32), [((16, 16), (255, 0, 0))]),
    "transparent grey": (_grey_with_alpha, (32, 32), [((16, 16), (255, 255, 255))]),
    "float TIFF in [0, 1]": (_float_in_unit_range, (32, 32), [((16, 16), (64, 64, 64))]),
    "1-bit": (_one_bit, (32, 32), [((4, 4), (0, 0, 0)), ((28, 4), (255, 255, 255))]),
}


@pytest.mark.parametrize("kind", list(PICTURES))
def test_images_reach_the_processor_as_they_look(tmp_path, kind):
    make, size, points = PICTURES[kind]
    _write(tmp_path / "pic.img", make())
    data = write_rows(tmp_path / "d.csv", [{**ROW, "image_path": "pic.img"}])
    splits = build_splits(data_args(str(data), val_split_ratio=0), family_spec("qwen2_vl").encoding)
    (image,) = splits.preparer.load_images(splits.preparer.conversation(splits.train[0], 0))
    assert image.mode == "RGB" and image.size == size
    for point, colour in points:
        assert _close(image.getpixel(point), colour), (point, image.getpixel(point), colour)


EXTREME = {"1x1": (1, 1), "3x50": (3, 50), "5000x10": (5000, 10), "10x3000": (10, 3000)}


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3", "idefics3", "mllama"])
def test_tiny_and_elongated_images_are_padded_for_every_family(tmp_path, family):
    """Sizes that crash Qwen-VL's resizing (aspect > 200) or confuse layout guessing (3 px) still encode,
    content kept at its own scale inside white padding."""
    _, processor = BUILDERS[family]()
    rows = []
    for name, size in EXTREME.items():
        png(tmp_path / f"{name}.png", "red", size)
        rows.append({**ROW, "image_path": f"{name}.png"})
    data = write_rows(tmp_path / "d.csv", rows)
    splits = build_splits(data_args(str(data), val_split_ratio=0), family_spec(family).encoding)
    for row, (w0, h0) in zip(splits.train, EXTREME.values()):
        (image,) = splits.preparer.load_images(splits.preparer.conversation(row, row["__index__"]))
        w, h = image.size
        assert min(w, h) >= 28 and max(w, h) / min(w, h) <= 100
        red = np.all(np.asarray(image) == (255, 0, 0), axis=-1)
        assert red.sum() == w0 * h0 and image.getpixel((0, 0)) == (255, 255, 255)
    batch = VlmCollator(processor, splits.preparer)(list(splits.train))
    assert batch["input_ids"].shape[0] == len(EXTREME) and torch.isfinite(batch["pixel_values"].float()).all()


def test_short_run_trains_on_messy_but_valid_data(tmp_path, tiny_model_dir):
    """Numbers-as-text answers, 16-bit/CMYK/palette/rotated/tiny images: training runs and saves."""
    rows = []
    for i, (kind, (make, _, _)) in enumerate(PICTURES.items()):
        _write(tmp_path / f"{i}.img", make())
        rows.append({"image_path": f"{i}.img", "prompt": f"What is {kind}?", "response": WRITTEN[i]})
    png(tmp_path / "tiny.png", "red", (2, 400))
    rows.append({"image_path": "tiny.png", "prompt": "And this?", "response": "007"})
    data = write_rows(tmp_path / "d.csv", rows * 2)
    result = short_run(tiny_model_dir("qwen2_vl"), {"train": data}, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert np.isfinite(result.trainer.state.log_history[-1]["train_loss"])


@pytest.mark.parametrize(
    "text",
    [
        '{"prompt": "Q?", "response": 1.50}\n{"prompt": "Q?", "response": "b"}\n',  # JSON Lines named .json
        '{"prompt": ["Q?", "Q?"], "response": [1.50, "b"]}',  # an object of columns
    ],
)
def test_other_json_layouts_are_read_as_rows(tmp_path, text):
    from vlmtune.data.sources import load_splits

    (rows,) = load_splits(str(_write(tmp_path / "d.json", text))).splits.values()
    assert [r["response"] for r in rows] == ["1.50", "b"]


@pytest.fixture
def http_server():
    """A local web server: /ok.png is an image, /away redirects to an ftp:// address."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "ftp://example.invalid/ok.png")
                self.end_headers()
                return
            body = png_bytes("green", (32, 32))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_urls_are_http_only_with_a_byte_cap(http_server, monkeypatch, online):
    from vlmtune.data import images
    from vlmtune.data.images import ImageError, load_image

    assert load_image(f"{http_server}/ok.png").getpixel((0, 0)) == (0, 128, 0)
    with pytest.raises(ImageError, match="redirects to a ftp: URL; only http"):
        load_image(f"{http_server}/away")
    monkeypatch.setattr(images, "URL_MAX_BYTES", 20)
    with pytest.raises(ImageError, match="is larger than"):
        load_image(f"{http_server}/ok.png")
