"""Turn whatever a dataset holds for an image into an RGB `PIL.Image`.

Accepted: a local path (absolute, relative to the data file's folder or to `--image_root`, or a
``file://`` URL), an http(s) URL, a base64 string or data URI, raw bytes, a `datasets` Image feature
value (``{"bytes": ..., "path": ...}``) and a PIL image.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import DataError

URL_TIMEOUT_S = 10
URL_MAX_BYTES = 50 * 1024 * 1024


class ImageError(DataError):
    """An image reference that cannot be turned into a picture; the message says why."""


def _open_bytes(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for bad data
        raise ImageError(f"cannot decode image {what}: {err}") from err
    return image


def _fetch_url(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as resp:  # noqa: S310 - user data
            data = resp.read(URL_MAX_BYTES + 1)
    except Exception as err:
        raise ImageError(f"cannot download image {url!r} (timeout {URL_TIMEOUT_S}s): {err}") from err
    if len(data) > URL_MAX_BYTES:
        raise ImageError(f"image {url!r} is larger than {URL_MAX_BYTES // 2**20} MiB")
    return data


def _resolve_path(ref: str, base_dirs: tuple[Path, ...]) -> Path:
    path = Path(ref.removeprefix("file://")).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [base / path for base in base_dirs] + [path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ImageError(f"image file not found: {ref!r} (looked in: {tried})")


_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]{64,}")


def _looks_base64(ref: str) -> bool:
    """A long run of base64 characters with no dot or separator a file path would have."""
    return _BASE64.fullmatch(ref) is not None


def load_image(ref: Any, base_dirs: tuple[Path, ...] = ()) -> Image.Image:
    """Load `ref` as an RGB image; raise `ImageError` naming the reference when that fails."""
    if isinstance(ref, Image.Image):
        image = ref
    elif isinstance(ref, (bytes, bytearray)):
        image = _open_bytes(bytes(ref), "from raw bytes")
    elif isinstance(ref, dict) and (ref.get("bytes") or ref.get("path")):
        image = (
            _open_bytes(ref["bytes"], "from a datasets Image value")
            if ref.get("bytes")
            else load_image(ref["path"], base_dirs)
        )
    elif isinstance(ref, str) and ref.strip():
        ref = ref.strip()
        if ref.startswith(("http://", "https://")):
            image = _open_bytes(_fetch_url(ref), f"from {ref!r}")
        elif ref.startswith("data:") or _looks_base64(ref):
            payload = ref.split(",", 1)[1] if ref.startswith("data:") else ref
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as err:
                raise ImageError(f"invalid base64 image data: {err}") from err
            image = _open_bytes(data, "from base64 data")
        else:
            path = _resolve_path(ref, base_dirs)
            image = _open_bytes(path.read_bytes(), f"file {str(path)!r}")
    else:
        raise ImageError(f"no usable image reference (got {type(ref).__name__}: {str(ref)[:60]!r})")
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_pixels(image: Image.Image, max_pixels: int | None = None, min_pixels: int | None = None) -> Image.Image:
    """Resize keeping the aspect ratio so width*height lies within [min_pixels, max_pixels].

    This runs before the processor, so users bound memory (and image token count) themselves.
    """
    w, h = image.size
    area = w * h
    scale = 1.0
    if max_pixels and area > max_pixels:
        scale = math.sqrt(max_pixels / area)
    elif min_pixels and area < min_pixels:
        scale = math.sqrt(min_pixels / area)
    if scale == 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def image_size(ref: Any, base_dirs: tuple[Path, ...] = ()) -> tuple[int, int]:
    """(width, height) of `ref` as `load_image` would return it, reading only the file's header.

    PIL opens lazily: the size (and the EXIF orientation, which swaps width and height for rotated
    photos) come from the header without decoding pixels, so checking every row before training does
    not decode every image. References that are not files (URLs, base64, bytes) are loaded in full.
    """
    if not (isinstance(ref, str) and ref.strip()) or ref.strip().startswith(("http://", "https://", "data:")):
        return load_image(ref, base_dirs).size
    ref = ref.strip()
    if _looks_base64(ref):
        return load_image(ref, base_dirs).size
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
    w, h = size
    area = w * h
    scale = 1.0
    if max_pixels and area > max_pixels:
        scale = math.sqrt(max_pixels / area)
    elif min_pixels and area < min_pixels:
        scale = math.sqrt(min_pixels / area)
    return size if scale == 1.0 else (max(1, round(w * scale)), max(1, round(h * scale)))


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
