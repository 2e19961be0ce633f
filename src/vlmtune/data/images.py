"""Turn whatever a dataset holds for an image into an RGB `PIL.Image`.

Accepted: a local path (absolute, relative to the data file's folder or to `--image_root`, with ``/``
or Windows' ``\\`` between folders, or a percent-encoded ``file:`` URL), an http(s) URL, a base64 string or
data URI (also wrapped in lines), raw bytes, a `datasets` Image feature value (``{"bytes": ..., "path":
...}``, its bytes raw or, from JSON, base64 text) and a PIL image.

Conversion keeps what the picture shows: EXIF orientation is applied, 16-bit and float pixels are scaled
(not clipped) to 8 bits, transparency is composited onto white, CMYK and palettes become RGB. Before the
processor, images too small or too elongated for some processors are padded (never cropped or stretched).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..compat import offline_reason, offline_variables
from ..errors import DataError

URL_TIMEOUT_S = 10
URL_MAX_BYTES = 50 * 1024 * 1024
URL_SCHEMES = ("http", "https")
# What every supported processor accepts: Qwen-VL's resizing needs sides of at least one 28-pixel
# patch group and an aspect ratio under 200; sides of 1 or 3 pixels are also mistaken for the channel
# axis by transformers' layout guess. Padding to these bounds keeps all content, unscaled.
MIN_IMAGE_SIDE = 28
MAX_IMAGE_ASPECT = 100.0
PAD_COLOUR = (255, 255, 255)
EXIF_ORIENTATION = 0x0112


class ImageError(DataError):
    """An image reference that cannot be turned into a picture; the message says why."""


def _open_bytes(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for bad data
        raise ImageError(f"cannot decode image {what}: {err}") from err
    return image


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s): a server must not turn an image URL into a local file read."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in URL_SCHEMES:
            raise ImageError(f"image {req.full_url!r} redirects to a {scheme}: URL; only http(s) is followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


_LOCAL_COPY = (
    "download the images where there is a network and write their local paths in the data instead (relative "
    "to the data file's folder or to --image_root)"
)


def _fetch_url(url: str) -> bytes:
    """The image at `url`; in offline mode (as `datasets` does for any URL) none is fetched: the message
    says which variable stops it."""
    if variables := offline_variables(for_datasets=True):
        raise ImageError(
            f"image URL {url!r} cannot be downloaded: {offline_reason(for_datasets=True)}. Either {_LOCAL_COPY}, "
            f"or unset {' and '.join(variables)} if this machine has a network"
        )
    try:
        with _OPENER.open(url, timeout=URL_TIMEOUT_S) as resp:
            data = resp.read(URL_MAX_BYTES + 1)
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(
            f"cannot download image {url!r} (timeout {URL_TIMEOUT_S}s): {err}. Check the URL and the network; "
            f"on a machine without one, {_LOCAL_COPY}"
        ) from err
    if len(data) > URL_MAX_BYTES:
        raise ImageError(f"image {url!r} is larger than {URL_MAX_BYTES // 2**20} MiB")
    return data


def _path_text(ref: str) -> str:
    """The local path `ref` names: a ``file:`` URL's percent-decoded path (``my%20image.png`` is
    ``my image.png``), else `ref` as written. ``file://images/a.png`` is read as the relative path it means."""
    if ref[:5].lower() != "file:":
        return ref
    parts = urllib.parse.urlsplit(ref)
    host = "" if parts.netloc.lower() in ("", "localhost") else parts.netloc
    return urllib.parse.unquote(host + parts.path)


_WINDOWS_DRIVE = re.compile(r"/?([A-Za-z]):[\\/]")


def _resolve_path(ref: str, base_dirs: tuple[Path, ...]) -> Path:
    """The file `ref` names, tried against each of `base_dirs` when relative. A path written with
    Windows separators (``images\\train\\a.png``) is tried as written, then with ``/``."""
    text = _path_text(ref)
    readings = [text] + ([text.replace("\\", "/")] if "\\" in text else [])
    for reading in readings:
        path = Path(reading).expanduser()
        candidates = [path] if path.is_absolute() else [base / path for base in base_dirs] + [path]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    read = f"read as {readings[-1]!r}; " if readings[-1] != ref else ""
    tried = ", ".join(str(c) for c in candidates)
    drive = _WINDOWS_DRIVE.match(text)
    hint = (
        f"; {drive.group(1)}: is a Windows drive, which this machine does not have: write image paths relative "
        "to the data file's folder or to --image_root"
        if drive
        else ""
    )
    raise ImageError(f"image file not found: {ref!r} ({read}looked in: {tried}){hint}")


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://")


def _refuse_other_schemes(ref: str) -> None:
    """`s3://`, `ftp://`, `gs://` ... would otherwise be looked up as a relative path and reported missing."""
    match = _SCHEME.match(ref)
    if match and match.group(1).lower() not in (*URL_SCHEMES, "file"):
        raise ImageError(
            f"unsupported URL scheme {match.group(1)!r} in {ref!r}: images are read from http(s) URLs, "
            "local paths or file:// URLs; download the files and use their paths"
        )


_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]{64,}")


def _looks_base64(ref: str) -> bool:
    """A long run of base64 characters with no dot or separator a file path would have."""
    return _BASE64.fullmatch(ref) is not None


def _from_base64(text: str, what: str) -> bytes:
    """Decode base64 text, also when wrapped in lines (76 columns by MIME and `base64 -w 76`)."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"{what}: {err}") from err


def _struct_bytes(data: Any) -> bytes:
    """The `bytes` of a `datasets` Image value: raw in Parquet and Arrow, base64 text once written as JSON."""
    if isinstance(data, str):
        return _from_base64(data, "the 'bytes' of this image value are text but not base64")
    return data


def load_image(ref: Any, base_dirs: tuple[Path, ...] = ()) -> Image.Image:
    """Load `ref` as an RGB image; raise `ImageError` naming the reference when that fails."""
    if isinstance(ref, Image.Image):
        image = ref
    elif isinstance(ref, (bytes, bytearray)):
        image = _open_bytes(bytes(ref), "from raw bytes")
    elif isinstance(ref, dict) and (ref.get("bytes") or ref.get("path")):
        image = (
            _open_bytes(_struct_bytes(ref["bytes"]), "from a datasets Image value")
            if ref.get("bytes")
            else load_image(ref["path"], base_dirs)
        )
    elif isinstance(ref, str) and ref.strip():
        ref = ref.strip()
        _refuse_other_schemes(ref)
        if ref.lower().startswith(("http://", "https://")):
            image = _open_bytes(_fetch_url(ref), f"from {ref!r}")
        elif ref.startswith("data:") or _looks_base64(ref):
            payload = ref.split(",", 1)[1] if ref.startswith("data:") else ref
            image = _open_bytes(_from_base64(payload, "invalid base64 image data"), "from base64 data")
        else:
            path = _resolve_path(ref, base_dirs)
            image = _open_bytes(path.read_bytes(), f"file {str(path)!r}")
    else:
        raise ImageError(f"no usable image reference (got {type(ref).__name__}: {str(ref)[:60]!r})")
    return to_rgb(image)


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale as 8-bit "L", scaled by the range the mode can hold.

    Pillow's own conversion clips these values at 255, which turns almost every 16-bit picture white.
    """
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F" and pixels.size and 0.0 <= pixels.min() and pixels.max() <= 1.0:
        top = 1.0  # float images in [0, 1]
    else:  # "I" (16-bit PNGs open as this too) and other floats: the smallest usual range that fits
        peak = float(pixels.max()) if pixels.size else 0.0
        top = next((t for t in (255.0, 65535.0) if peak <= t), peak)
        pixels = pixels - min(0.0, float(pixels.min()))
    return Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white (dropping alpha leaves hidden colour, often black)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, PAD_COLOUR + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` upright and in 8-bit RGB, as it looks in an image viewer."""
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # most images: no copy made
            image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I") or image.mode == "F":
            image = _scaled_to_8bit(image)
        if _has_alpha(image):
            return _on_white(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # Pillow raises many types for unusual modes and broken EXIF
        raise ImageError(f"cannot convert a {image.mode} image to RGB: {err}") from err


def pad_to_processable(image: Image.Image) -> Image.Image:
    """Pad (centred, white) so both sides are at least `MIN_IMAGE_SIDE` and the aspect ratio at most
    `MAX_IMAGE_ASPECT`: such images crash or confuse some processors, and padding loses nothing."""
    w, h = image.size
    width, height = _padded_size(image.size)
    if (width, height) == (w, h):
        return image
    canvas = Image.new("RGB", (width, height), PAD_COLOUR)
    canvas.paste(image, ((width - w) // 2, (height - h) // 2))
    return canvas


def _padded_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size `pad_to_processable` gives an image of `size`."""
    w, h = size
    width = max(w, MIN_IMAGE_SIDE, math.ceil(h / MAX_IMAGE_ASPECT))
    return width, max(h, MIN_IMAGE_SIDE, math.ceil(w / MAX_IMAGE_ASPECT))


def _scaled_size(size: tuple[int, int], max_pixels: int | None, min_pixels: int | None) -> tuple[int, int]:
    """`size` scaled (aspect kept) so that width*height lies within [min_pixels, max_pixels]."""
    w, h = size
    area = w * h
    scale = 1.0
    if max_pixels and area > max_pixels:
        scale = math.sqrt(max_pixels / area)
    elif min_pixels and area < min_pixels:
        scale = math.sqrt(min_pixels / area)
    return size if scale == 1.0 else (max(1, round(w * scale)), max(1, round(h * scale)))


def fit_pixels(image: Image.Image, max_pixels: int | None = None, min_pixels: int | None = None) -> Image.Image:
    """Resize keeping the aspect ratio so width*height lies within [min_pixels, max_pixels], then pad
    what no processor would take (`pad_to_processable`).

    This runs before the processor, so users bound memory (and image token count) themselves.
    """
    size = _scaled_size(image.size, max_pixels, min_pixels)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return pad_to_processable(image)


def image_size(ref: Any, base_dirs: tuple[Path, ...] = ()) -> tuple[int, int]:
    """(width, height) of `ref` as `load_image` would return it, reading only the file's header.

    PIL opens lazily: the size (and the EXIF orientation, which swaps width and height for rotated
    photos) come from the header without decoding pixels, so checking every row before training does
    not decode every image. References that are not files (URLs, base64, bytes) are loaded in full.
    """
    if not (isinstance(ref, str) and ref.strip()) or ref.strip().lower().startswith(("http://", "https://", "data:")):
        return load_image(ref, base_dirs).size
    ref = ref.strip()
    if _looks_base64(ref):
        return load_image(ref, base_dirs).size
    _refuse_other_schemes(ref)
    path = _resolve_path(ref, base_dirs)
    try:
        with Image.open(path) as image:
            width, height = image.size
            rotated = image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception as err:  # PIL raises many types for bad data
        raise ImageError(f"cannot decode image file {str(path)!r}: {err}") from err
    return (height, width) if rotated else (width, height)


_EXIF_ORIENTATION = 0x0112


def fitted_size(size: tuple[int, int], max_pixels: int | None, min_pixels: int | None) -> tuple[int, int]:
    """The size `fit_pixels` gives an image of `size`, without the image."""
    return _padded_size(_scaled_size(size, max_pixels, min_pixels))


@dataclass
class ImageOptions:
    """Where relative image paths are looked up and the pixel budget applied before the processor.

    `base_dirs` (``--image_root``) are tried for every row, then the folder of the row's own data file
    (`folders`, keyed by the row's `__source__`), so eval data in another folder finds its images.
    """

    base_dirs: tuple[Path, ...] = ()
    max_pixels: int | None = None
    min_pixels: int | None = None
    folders: dict[str, Path] = field(default_factory=dict)

    def _dirs(self, source: str | None) -> tuple[Path, ...]:
        return self.base_dirs + ((self.folders[source],) if source in self.folders else ())

    def open(self, refs: list, where: str, source: str | None = None) -> list[Image.Image]:
        """Load each image as RGB, unresized; errors name `where` (file, row, field) and the image's position."""
        loaded = []
        for i, ref in enumerate(refs):
            try:
                loaded.append(load_image(ref, self._dirs(source)))
            except ValueError as err:
                raise DataError(f"{where}, image {i}: {err}") from err
        return loaded

    def fit(self, image: Image.Image) -> Image.Image:
        return fit_pixels(image, self.max_pixels, self.min_pixels)

    def load(self, refs: list, where: str, source: str | None = None) -> list[Image.Image]:
        """Load and fit each image (what the processor receives)."""
        return [self.fit(image) for image in self.open(refs, where, source)]

    def sizes(self, refs: list, where: str, source: str | None = None) -> list[tuple[int, int]]:
        """(width, height) of each image as the processor will receive it, from file headers only."""
        sizes = []
        for i, ref in enumerate(refs):
            try:
                size = image_size(ref, self._dirs(source))
            except ValueError as err:
                raise DataError(f"{where}, image {i}: {err}") from err
            sizes.append(fitted_size(size, self.max_pixels, self.min_pixels))
        return sizes
