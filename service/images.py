"""Image decoding for predict: bytes of any common image -> a 32x32x3 array of raw 0..255 RGB.

Runs in a worker thread (never on the event loop). Hostile input is expected: only PNG, JPEG, BMP, GIF
and WebP are opened (Pillow would otherwise also try formats such as EPS), the pixel count is checked
from the header before anything is decoded (decompression bombs), truncated or corrupt files fail
with a detail naming which image it was, and every mode ends up as RGB:
palette and alpha images are composited over white, 16-bit images are scaled (not clipped) to 8 bits,
CMYK is converted, animated images give their first frame, and the EXIF orientation is applied.
Resizing uses Lanczos (after a box `reduce` for large images, and the JPEG decoder's own DCT
scaling), so downscaled photos keep their detail without aliasing.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadImage, InvalidInput, PayloadTooLarge

SIZE = 32
INPUT_SHAPE = (SIZE, SIZE, 3)
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
#: Larger images are refused from their header, before any pixel is decoded.
MAX_PIXELS = 40_000_000

# Pillow's own guard (a warning above this, an error above twice this) as a second line behind ours.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

_WHITE = (255, 255, 255)


def decode_image(data: bytes, label: str) -> np.ndarray:
    """Decode one image file to a (32, 32, 3) uint8 RGB array; `label` names it in errors ("image 2")."""
    if not data:
        raise BadImage(f"{label} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise _too_large(label, width, height)
            if width < 1 or height < 1:
                raise BadImage(f"{label} has no pixels ({width}x{height})")
            img.seek(0)  # first frame of an animated GIF / WebP / PNG
            img.draft(None, (2 * SIZE, 2 * SIZE))  # JPEG: decode at a reduced scale, still >= 64 px
            img.load()
            oriented = ImageOps.exif_transpose(img) or img
            rgb = to_rgb(oriented)
            return np.asarray(resize(rgb), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{label} is too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImage(f"{label} is not a PNG, JPEG, BMP, GIF or WebP image") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        # Pillow's decoders signal corrupt data with any of these.
        raise BadImage(f"{label} could not be decoded (truncated or corrupt): {exc}") from exc


def _too_large(label: str, width: int, height: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{label} is too large: {width}x{height} = {width * height} pixels, "
                           f"at most {MAX_PIXELS} are accepted")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (alpha composited over white, 16/32-bit integers scaled to 8 bits)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale integer or float pixel values to 0..255: 16-bit ranges are divided by 257, never clipped."""
    array = values.astype(np.float64)
    finite = array[np.isfinite(array)]
    top = float(finite.max()) if finite.size else 0.0
    if values.dtype.kind in "ui" and (values.dtype.itemsize >= 2 and top > 255):
        array = array / 257.0
    elif values.dtype.kind == "f" and 0 < top <= 1.0:
        array = array * 255.0
    return np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)


def resize(img: Image.Image) -> Image.Image:
    """Resize to 32x32: Lanczos (with a box pre-reduction for big images) down, bicubic up."""
    if img.size == (SIZE, SIZE):
        return img
    if img.width >= SIZE and img.height >= SIZE:
        return img.resize((SIZE, SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img.resize((SIZE, SIZE), Image.Resampling.BICUBIC)


def decode_b64(value: str, label: str) -> np.ndarray:
    """A base64 image file (standard or URL-safe alphabet, padding optional) -> (32, 32, 3) uint8."""
    text = "".join(value.split())
    if "," in text and text.startswith("data:"):  # a data: URL
        text = text.split(",", 1)[1]
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImage(f"{label}: 'b64' is not valid base64") from exc
    return decode_image(data, label)


def nested_list_to_array(value: Sequence[Any], label: str, loc: list[str | int]) -> np.ndarray:
    """A 32x32x3 nested list of numbers 0..255 -> float32 array; anything else is a 422."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = None
    if array is None or array.dtype.kind not in "iuf" or array.shape != INPUT_SHAPE:
        if array is None or array.dtype.kind == "O":
            got = "a ragged or mixed list"
        elif array.dtype.kind not in "iuf":
            got = {"b": "booleans", "U": "strings", "S": "strings"}.get(array.dtype.kind, "values that are not numbers")
        else:
            got = f"shape {list(array.shape)}"
        raise _invalid(loc, f"{label} must be a 32x32x3 nested list of numbers 0..255 (got {got})")
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 255:
        raise _invalid(loc, f"{label} has values outside 0..255 (min {low:g}, max {high:g})")
    return array


def _invalid(loc: list[str | int], msg: str) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": loc, "msg": msg, "type": "value_error"}])
