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
