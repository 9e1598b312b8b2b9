"""Image decoding shared by predict and dataset processing: bytes of any common image -> raw 0..255 RGB.

No TensorFlow here. Hostile input is expected: only PNG, JPEG, BMP, GIF and WebP are opened (Pillow would
otherwise also try formats such as EPS), the pixel count is checked from the header before anything is
decoded (decompression bombs), truncated or corrupt files fail with a message naming which image it was,
and every mode ends up as RGB: palette and alpha images are composited over white, 16-bit images are
scaled (not clipped) to 8 bits, CMYK is converted, animated images give their first frame, and the EXIF
orientation is applied. Resizing uses Lanczos (after a box `reduce` for large images, and the JPEG
decoder's own DCT scaling), so downscaled photos keep their detail without aliasing.

Memory stays close to the decoded image itself: a large image is box-reduced in the mode it was decoded in
(1-bit, grey, 16-bit, RGBA ...) before any conversion, so alpha compositing, 16-bit scaling and the EXIF
rotation work on a copy a few times the output size, never on full-size RGBA or float64 copies.
`declared_pixels` reads the pixel count from the header alone, for callers that bound a whole request.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

#: CIFAR-10's side: the input of every model trained on it, and of the baseline CNN on every dataset.
INPUT_SIZE = 32
INPUT_SHAPE: tuple[int, int, int] = (INPUT_SIZE, INPUT_SIZE, 3)


class ImageError(ValueError):
    """An image that cannot be decoded; the message names it and says why."""


class ImageTooLarge(ImageError):
    """An image with more pixels than `MAX_PIXELS` (refused from its header)."""


ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
#: Larger images are refused from their header, before any pixel is decoded.
MAX_PIXELS = 40_000_000

# Pillow's own guard (a warning above this, an error above twice this) as a second line behind ours.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

_WHITE = (255, 255, 255)
#: As `Image.resize(reducing_gap=...)`: box-reduce while the image stays this many times the target size.
REDUCING_GAP = 3.0
#: EXIF orientation -> the transpose that displays the image upright (as `ImageOps.exif_transpose`).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
#: Modes Pillow's `reduce` averages correctly as they are (palette indices cannot be averaged).
_REDUCIBLE = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F"})


def declared_pixels(data: bytes) -> int | None:
    """Width x height as the file's header declares it, without decoding a pixel; None when the file is not
    an image of the allowed formats (`decode_image` then says why). Over Pillow's own bomb guard: a number
    above `2 * MAX_PIXELS`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        return 2 * MAX_PIXELS + 1
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error):
        return None
    return width * height


def decode_image(data: bytes, label: str, size: int = INPUT_SIZE, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image file to a (size, size, 3) uint8 RGB array; `label` names it in errors ("image 2").
    An image of more than `max_pixels` (at most `MAX_PIXELS` count) is refused from its header."""
    if not data:
        raise ImageError(f"{label} is empty (0 bytes)")
    max_pixels = min(max_pixels, MAX_PIXELS)
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise _too_large(label, width, height, max_pixels)
            if width < 1 or height < 1:
                raise ImageError(f"{label} has no pixels ({width}x{height})")
            img.seek(0)  # first frame of an animated GIF / WebP / PNG
            img.draft(None, (2 * size, 2 * size))  # JPEG: decode at a reduced scale, still >= 64 px
            img.load()
            orientation = _ORIENTATION.get(img.getexif().get(0x0112, 1))
            rgb = to_rgb(shrink(img, size))
            if orientation is not None:
                rgb = rgb.transpose(orientation)
            return np.asarray(resize(rgb, size), dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{label} is too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label} is not a PNG, JPEG, BMP, GIF or WebP image") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        # Pillow's decoders signal corrupt data with any of these.
        raise ImageError(f"{label} could not be decoded (truncated or corrupt): {exc}") from exc


def _too_large(label: str, width: int, height: int, max_pixels: int = MAX_PIXELS) -> ImageTooLarge:
    return ImageTooLarge(f"{label} is too large: {width}x{height} = {width * height} pixels, "
                         f"at most {max_pixels} are accepted")


def shrink(img: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """A large image box-reduced (by whole factors, to at least `REDUCING_GAP` x `size` a side) in the mode it
    was decoded in, before any mode conversion multiplies its memory; integer and float images come back as
    8-bit grey ("L"), scaled by the full image's range as `to_rgb` scales them."""
    factor = (max(1, int(img.width / size / REDUCING_GAP)), max(1, int(img.height / size / REDUCING_GAP)))
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        low_high = img.getextrema()
        top = float(low_high[1]) if isinstance(low_high[1], (int, float)) else None
        work = img if mode in ("I", "F") else img.convert("I")
        if factor != (1, 1):
            work = work.reduce(factor)
        return Image.fromarray(_to_uint8(np.asarray(work), top=top, wide=mode != "F"), mode="L")
    if factor == (1, 1):
        return img
    if mode == "1":
        img = img.convert("L")
    elif mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode not in _REDUCIBLE:
        img = to_rgb(img)
    return img.reduce(factor)  # RGBA / LA: Pillow averages them premultiplied, as compositing needs


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


def _to_uint8(values: np.ndarray, *, top: float | None = None, wide: bool | None = None) -> np.ndarray:
    """Scale integer or float pixel values to 0..255: 16-bit ranges are divided by 257, never clipped.
    `top` (the largest value) and `wide` (integers of 16 bits or more) default to what `values` show."""
    array = values.astype(np.float64)
    if top is None:
        finite = array[np.isfinite(array)]
        top = float(finite.max()) if finite.size else 0.0
    if wide is None:
        wide = values.dtype.kind in "ui" and values.dtype.itemsize >= 2
    if values.dtype.kind in "ui" and wide and top > 255:
        array = array / 257.0
    elif values.dtype.kind == "f" and 0 < top <= 1.0:
        array = array * 255.0
    return np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)


def resize(img: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """Resize to size x size: Lanczos (with a box pre-reduction for big images) down, bicubic up."""
    if img.size == (size, size):
        return img
    if img.width >= size and img.height >= size:
        return img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img.resize((size, size), Image.Resampling.BICUBIC)
