"""Every way a dataset can hold an image becomes an RGB picture, or an error that says which and why."""

from __future__ import annotations

import base64
import time

import pytest
from PIL import Image

from tests.data_files import data_uri, png, png_bytes
from vlmtune.data.images import ImageError, ImageOptions, fit_pixels, load_image
from vlmtune.data.schema import DataError


def test_every_reference_kind_loads_as_rgb(tmp_path):
    path = png(tmp_path / "sub" / "a.png", "red", mode="RGBA")
    raw = png_bytes("blue", mode="L")
    refs = {
        "absolute path": str(path),
        "relative path": "sub/a.png",
        "file URL": f"file://{path}",
        "data URI": data_uri("blue"),
        "bare base64": base64.b64encode(raw).decode(),
        "bytes": raw,
        "datasets Image value": {"bytes": raw, "path": None},
        "datasets Image path": {"bytes": None, "path": "sub/a.png"},
        "PIL": Image.new("P", (8, 8)),
    }
    for kind, ref in refs.items():
        image = load_image(ref, (tmp_path,))
        assert image.mode == "RGB", kind
    assert load_image("sub/a.png", (tmp_path,)).getpixel((0, 0)) == (255, 0, 0)


def test_unreachable_url_fails_fast_naming_the_url(online):
    start = time.time()
    with pytest.raises(ImageError, match=r"cannot download image 'http://127\.0\.0\.1:9/x\.png' \(timeout \d+s\)"):
        load_image("http://127.0.0.1:9/x.png")
    assert time.time() - start < 5
    with pytest.raises(ImageError, match="on a machine without one, download the images where there is a network"):
        load_image("http://127.0.0.1:9/x.png")


@pytest.mark.parametrize(
    "ref, message",
    [
        ("missing.png", r"image file not found: 'missing.png' \(looked in: "),
        (b"not an image", "cannot decode image from raw bytes"),
        ("data:image/png;base64,@@@", "invalid base64 image data"),
        (17, r"no usable image reference \(got int: '17'\)"),
    ],
)
def test_bad_references_say_why(tmp_path, ref, message):
    with pytest.raises(ImageError, match=message):
        load_image(ref, (tmp_path,))


def test_image_options_name_file_row_field_and_position(tmp_path):
    png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    options = ImageOptions(folders={"d.csv": tmp_path})
    with pytest.raises(
        DataError, match=r"^d.csv, row 4, field 'images', image 1: cannot decode image file '.*broken.png'"
    ):
        options.load(["ok.png", "broken.png"], "d.csv, row 4, field 'images'", "d.csv")


def test_pixel_budget_keeps_the_aspect_ratio():
    wide = Image.new("RGB", (400, 100))
    small = fit_pixels(wide, max_pixels=10_000)
    assert small.size == (200, 50)
    assert fit_pixels(Image.new("RGB", (60, 30)), min_pixels=7200).size == (120, 60)
    assert fit_pixels(wide, max_pixels=10**6, min_pixels=10) is wide
    options = ImageOptions(max_pixels=10_000)
    assert options.load([wide], "x")[0].size == (200, 50) and options.open([wide], "x")[0].size == (400, 100)
