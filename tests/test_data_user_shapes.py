"""Data as users bring it: the dataset shapes and path spellings of this field, each written as a real file,
reach the canonical conversation intact (text unchanged, pixels equal, images in order), or stop with a
message naming the file, row, field and the fix."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.data_files import data_args, png, png_bytes, write_rows
from tests.helpers import family_spec
from vlmtune.data.schema import DataError
from vlmtune.data.sources import SOURCE
from vlmtune.data.splits import Splits, build_splits

QWEN = family_spec("qwen2_vl").encoding
LLAVA = family_spec("llava").encoding
RGB = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255)}


def _user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMAGE = {"type": "image"}


def _seen(splits: Splits, split: str = "train") -> list[tuple[list[dict], list[tuple[int, int, int]]]]:
    """Each row of `split` as the model gets it: its messages and its images' top-left pixel."""
    seen = []
    for row in getattr(splits, split):
        conv = splits.preparer.conversation(row, row["__index__"])
        seen.append((conv.messages, [image.getpixel((0, 0)) for image in splits.preparer.load_images(conv)]))
    return seen


def _load(path: Path, facts=QWEN, **overrides) -> Splits:
    return build_splits(data_args(str(path), **{"val_split_ratio": 0, **overrides}), facts)


# ---- files and folders --------------------------------------------------------------------------------


def test_gzipped_jsonl_reads_like_the_plain_file(tmp_path):
    png(tmp_path / "images" / "a.png", "red")
    row = {"image": "images/a.png", "question": "Which colour?", "answer": "red"}
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    splits = _load(path)
    assert _seen(splits) == [([_user(IMAGE, "Which colour?"), _assistant("red")], [RGB["red"]])]
    assert splits.train[0][SOURCE] == str(path)


def test_gzipped_files_in_a_folder_are_split_by_their_names(tmp_path):
    for name, colour in (("train.jsonl.gz", "red"), ("val.jsonl.gz", "blue"), ("test.csv.gz", "green")):
        png(tmp_path / f"{colour}.png", colour)
        plain = write_rows(tmp_path / "plain" / name.removesuffix(".gz"), [
            {"image": f"{colour}.png", "question": "Which colour?", "answer": colour}
        ])
        (tmp_path / name).write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    (tmp_path / "plain").rmdir()
    splits = build_splits(data_args(str(tmp_path)), QWEN)
    answers = {split: [r["answer"] for r in getattr(splits, split)] for split in ("train", "eval", "test")}
    assert answers == {"train": ["red"], "eval": ["blue"], "test": ["green"]}


def test_a_damaged_gzip_file_is_named(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b'{"question": "not gzip at all"}\n')
    with pytest.raises(DataError, match=rf"^{path}: cannot decompress this gzip file .*drop \.gz from its name"):
        _load(path)


def test_datasetdict_folder_with_train_validation_test(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    def split(colour: str, n: int) -> datasets.Dataset:
        rows = {"image": [Image.new("RGB", (64, 64), colour)] * n, "question": ["Which?"] * n, "answer": [colour] * n}
        return datasets.Dataset.from_dict(rows, features=features)

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": split("red", 3), "validation": split("blue", 2), "test": split("green", 1)}
                         ).save_to_disk(str(folder))
    splits = build_splits(data_args(str(folder)), QWEN)
    assert [pixels for _, pixels in _seen(splits, "train")] == [[RGB["red"]]] * 3
    assert [pixels for _, pixels in _seen(splits, "eval")] == [[RGB["blue"]]] * 2
    assert [pixels for _, pixels in _seen(splits, "test")] == [[RGB["green"]]]
    assert splits.eval[0][SOURCE] == f"{folder} [validation]"


def test_parquet_with_hf_image_structs_written_by_datasets_and_by_pyarrow(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    rows = {"image": [Image.new("RGB", (64, 64), "green")], "question": ["Which colour?"], "answer": ["green"]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "hf.parquet"))
    # The same struct without datasets' metadata (pandas, polars, pyarrow write it like this).
    table = pa.table({"image": [{"bytes": png_bytes("blue"), "path": "blue.png"}], "question": ["Which colour?"],
                      "answer": ["blue"]})
    pq.write_table(table, str(tmp_path / "plain.parquet"))
    expected = ("green", "blue")
    for name, colour in zip(("hf.parquet", "plain.parquet"), expected):
        assert _seen(_load(tmp_path / name)) == [([_user(IMAGE, "Which colour?"), _assistant(colour)], [RGB[colour]])]


def test_json_with_image_structs_whose_bytes_are_base64_text(tmp_path):
    b64 = base64.b64encode(png_bytes("blue")).decode()
    rows = [{"image": {"bytes": b64, "path": None}, "question": "Which colour?", "answer": "blue"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    assert _seen(_load(path)) == [([_user(IMAGE, "Which colour?"), _assistant("blue")], [RGB["blue"]])]
    path.write_text(json.dumps([{**rows[0], "image": {"bytes": "not base64 at all!", "path": None}}]))
    with pytest.raises(DataError, match=rf"^{path}, row 0, field 'image', image 0: the 'bytes' of this image value "
                                        "are text but not base64"):
        _load(path)


# ---- paths as users write them -------------------------------------------------------------------------


def test_windows_relative_paths_in_a_csv(tmp_path):
    png(tmp_path / "images" / "train" / "a.png", "red")
    path = write_rows(tmp_path / "d.csv", [{"image_path": "images\\train\\a.png", "prompt": "Q?", "response": "red"}])
    assert _seen(_load(path)) == [([_user(IMAGE, "Q?"), _assistant("red")], [RGB["red"]])]


def test_a_missing_windows_path_says_how_it_was_read_and_a_drive_letter_says_why(tmp_path):
    path = write_rows(tmp_path / "d.csv", [{"image_path": "images\\b.png", "prompt": "Q?", "response": "red"}])
    with pytest.raises(DataError, match=r"image file not found: 'images\\\\b.png' \(read as 'images/b.png'; looked in: "
                                        + str(tmp_path / "images" / "b.png")):
        _load(path)
    path = write_rows(tmp_path / "d.csv", [{"image_path": "C:\\data\\b.png", "prompt": "Q?", "response": "red"}])
    with pytest.raises(DataError, match=r"^.*row 0, field 'image_path', image 0: image file not found: .*; C: is a "
                                        "Windows drive, which this machine does not have: write image paths relative"):
        _load(path)


def test_file_uris_with_percent_encoding(tmp_path):
    image = png(tmp_path / "my pictures" / "my image.png", "green")
    uri = image.as_uri()
    assert "%20" in uri
    path = write_rows(tmp_path / "d.csv", [{"image_path": uri, "prompt": "Q?", "response": "green"}])
    assert _seen(_load(path)) == [([_user(IMAGE, "Q?"), _assistant("green")], [RGB["green"]])]
    missing = uri.replace("my%20image", "other%20image")
    write_rows(path, [{"image_path": missing, "prompt": "Q?", "response": "green"}])
    read = str(tmp_path / "my pictures" / "other image.png")
    with pytest.raises(DataError, match=rf"image file not found: '{missing}' \(read as '{read}'; looked in: {read}\)"):
        _load(path)


def test_base64_wrapped_at_76_columns(tmp_path):
    wrapped = base64.encodebytes(png_bytes("blue")).decode()  # MIME style: lines of 76 characters
    assert {len(line) for line in wrapped.splitlines()[:-1]} == {76}
    rows = [
        {"image": wrapped, "question": "Bare?", "answer": "blue"},
        {"image": "data:image/png;base64," + wrapped, "question": "URI?", "answer": "blue"},
    ]
    for suffix in (".jsonl", ".csv"):  # in a CSV the line breaks sit inside a quoted cell
        seen = _seen(_load(write_rows(tmp_path / f"d{suffix}", rows)))
        assert seen == [([_user(IMAGE, q), _assistant("blue")], [RGB["blue"]]) for q in ("Bare?", "URI?")]


def test_a_mistyped_image_root_is_said_before_any_row_is_read(tmp_path):
    typo = tmp_path / "imgaes"
    # The data file does not even exist: the flag is checked first.
    with pytest.raises(DataError, match=rf"^--image_root {typo}: no such folder; give the folder"):
        _load(tmp_path / "never_read.csv", image_root=str(typo))
    (tmp_path / "file.png").write_bytes(png_bytes())
    with pytest.raises(DataError, match=r"^--image_root .*file.png: is a file, not a folder"):
        _load(tmp_path / "never_read.csv", image_root=str(tmp_path / "file.png"))


# ---- conversation shapes -----------------------------------------------------------------------------


def test_llava_sharegpt_conversations_become_messages_with_images_in_order(tmp_path):
    png(tmp_path / "coco" / "a.png", "red")
    png(tmp_path / "coco" / "b.png", "blue")
    rows = [  # LLaVA's own file: a JSON array with id, image(s) and conversations
        {"id": "0", "images": ["coco/a.png", "coco/b.png"], "conversations": [
            {"from": "system", "value": "Answer in colours."},
            {"from": "human", "value": "<image>\nFirst this, then <image> that?"},
            {"from": "gpt", "value": "red, then blue"},
            {"from": "human", "value": "And now?"},
            {"from": "gpt", "value": "still red"},
        ]},
    ]
    splits = _load(write_rows(tmp_path / "llava.json", rows))
    assert _seen(splits) == [(
        [
            {"role": "system", "content": [{"type": "text", "text": "Answer in colours."}]},
            _user(IMAGE, "First this, then ", IMAGE, " that?"),
            _assistant("red, then blue"),
            _user("And now?"),
            _assistant("still red"),
        ],
        [RGB["red"], RGB["blue"]],
    )]
    assert splits.train[0]["id"] == "0" and "id" in splits.schema.meta_columns


def test_sharegpt_with_one_image_as_a_string_in_image(tmp_path):
    png(tmp_path / "a.png", "green")
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": "What is it?\n<image>"},
                                                  {"from": "gpt", "value": "green"}]}]
    assert _seen(_load(write_rows(tmp_path / "d.json", rows))) == [
        ([_user("What is it?\n", IMAGE), _assistant("green")], [RGB["green"]])
    ]


def test_sharegpt_placeholders_that_do_not_match_the_images_name_the_row(tmp_path):
    png(tmp_path / "a.png")
    rows = [
        {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}]},
        {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image><image>?"},
                                                 {"from": "gpt", "value": "x"}]},
    ]
    path = write_rows(tmp_path / "d.json", rows)
    with pytest.raises(DataError, match=rf"^{path}, row 1, field 'conversations': 2 image placeholder\(s\) but 1 "
                                        r"image\(s\); give each image one placeholder \(<image> in the text"):
        _load(path)


def test_messages_whose_content_is_a_plain_string(tmp_path):
    png(tmp_path / "a.png", "red")
    rows = [{"images": ["a.png"], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour?"},
        {"role": "assistant", "content": "red"},
    ]}]
    assert _seen(_load(write_rows(tmp_path / "d.jsonl", rows))) == [(
        [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, _user(IMAGE, "What colour?"),
         _assistant("red")],
        [RGB["red"]],
    )]


# ---- messages name the right thing --------------------------------------------------------------------


def test_the_models_image_token_typed_in_a_csv_prompt_names_the_prompt_and_the_text(tmp_path):
    png(tmp_path / "a.png")
    path = write_rows(tmp_path / "d.csv", [
        {"image_path": "a.png", "prompt": "What?", "response": "red"},
        {"image_path": "a.png", "prompt": "<image>\nWhat?", "response": "red"},
    ])
    with pytest.raises(DataError) as err:
        _load(path, LLAVA)
    assert str(err.value).startswith(
        f"{path}, row 1, field 'prompt': the text contains '<image>', one of the model's image placeholder tokens; "
        "remove '<image>' from it: vlmtune puts in the token for the image of field 'image_path' itself"
    )
    # `<image>` is no token of Qwen2-VL's: there it is text like any other, kept as typed.
    assert _seen(_load(path, QWEN))[1][0][0] == _user(IMAGE, "<image>\nWhat?")


def test_the_models_image_token_in_a_message_next_to_image_parts_names_the_message(tmp_path):
    png(tmp_path / "a.png")
    messages = [_user(IMAGE, "Is <|image_pad|> here?"), _assistant("red")]
    path = write_rows(tmp_path / "d.jsonl", [{"messages": messages, "images": ["a.png"]}])
    with pytest.raises(DataError, match=rf"^{path}, row 0, field 'messages', message 0: the text contains "
                                        r"'<\|image_pad\|>', one of the model's image placeholder tokens; remove"):
        _load(path)
