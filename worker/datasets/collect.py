"""What reading an archive produces: decoded images staged on disk, their samples, skipped files, progress.

Decoded images are appended to a scratch file in the output directory as they come (49 KB each at 128 px), so
memory holds one image at a time whatever the archive's size; the final arrays are gathered from it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from worker import imaging
from worker.datasets.errors import DatasetCancelled
from worker.datasets.layout import Split
from worker.datasets.limits import Limits
from worker.datasets.summary import MAX_SKIPPED_LISTED, SkippedFile
from worker.errors import ArtifactWriteError


@dataclass(frozen=True, slots=True)
class Sample:
    """One usable image: where it came from, its class, its given split (None: drawn) and where it is staged."""

    path: str
    label: str
    split: Split | None
    index: int
    #: Hash of the stored pixels: equal digests are exact duplicates at the stored size.
    digest: bytes


def write_error(path: Path, exc: OSError) -> ArtifactWriteError:
    return ArtifactWriteError(f"cannot write the dataset to {path}: {exc.strerror or exc}; "
                              "check free space and permissions of TL_ARTIFACT_DIR")


class ImageStaging:
    """Decoded images appended to one raw file, read back as an (n, size, size, 3) memmap."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.count = 0
        try:
            self._file: BinaryIO | None = open(path, "wb")  # closed by close()
        except OSError as exc:
            raise write_error(path, exc) from exc

    def add(self, pixels: np.ndarray) -> tuple[int, bytes]:
        """Stage one (size, size, 3) uint8 image; returns its index and digest."""
        assert self._file is not None, "add() after close()"
        data = np.ascontiguousarray(pixels).tobytes()
        try:
            self._file.write(data)
        except OSError as exc:
            raise write_error(self.path, exc) from exc
        self.count += 1
        return self.count - 1, hashlib.blake2b(data, digest_size=16).digest()

    def images(self) -> np.ndarray:
        """Everything staged, read-only (flushes the file first)."""
        self.close()
        if self.count == 0:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.count, self.size, self.size, 3))

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                raise write_error(self.path, exc) from exc
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class Skips:
    """Files left out and why: the first MAX_SKIPPED_LISTED listed, all counted."""

    def __init__(self) -> None:
        self.listed: list[SkippedFile] = []
        self.count = 0

    def add(self, path: str, reason: str) -> None:
        self.count += 1
        if len(self.listed) < MAX_SKIPPED_LISTED:
            self.listed.append({"path": path, "reason": reason})


class Reporter:
    """progress(fraction) now and then (every 1% at most), and the cancel check."""

    def __init__(self, progress: Callable[[float], None] | None, cancelled: Callable[[], bool] | None) -> None:
        self._progress = progress
        self._cancelled = cancelled
        self._last = -1.0

    def progress(self, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        if self._progress is None or fraction <= self._last:
            return
        if fraction - self._last >= 0.01 or fraction == 1.0:
            self._last = fraction
            self._progress(fraction)

    def check_cancelled(self) -> None:
        if self._cancelled is not None and self._cancelled():
            raise DatasetCancelled()


def decode_file(data: bytes, path: str, size: int, limits: Limits) -> np.ndarray:
    """An image file -> (size, size, 3) uint8 RGB via the predict path (`worker.imaging`); ImageError if unusable."""
    if limits.max_image_pixels < imaging.MAX_PIXELS:
        _check_pixels(data, path, limits.max_image_pixels)
    return imaging.decode_image(data, path, size)


def _check_pixels(data: bytes, path: str, max_pixels: int) -> None:
    try:
        with Image.open(io.BytesIO(data), formats=imaging.ALLOWED_FORMATS) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past twice imaging.MAX_PIXELS
        raise imaging.ImageTooLarge(f"{path} is too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError):
        return  # decode_image says why, in its own words
    if width * height > max_pixels:
        raise imaging.ImageTooLarge(f"{path} is too large: {width}x{height} = {width * height} pixels, "
                                    f"at most {max_pixels} are accepted")


def skip_reason(exc: imaging.ImageError, path: str) -> str:
    """The decoder's message without the path it starts with ("is too large: ...")."""
    if isinstance(exc.__cause__, UnidentifiedImageError):
        return "not an image (not PNG, JPEG, BMP, GIF or WebP)"
    return str(exc).removeprefix(f"{path} ")


def pixels_to_stored(pixels: np.ndarray, size: int) -> np.ndarray:
    """One uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (size, size, 3) RGB, as decoded files are."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    img = imaging.to_rgb(Image.fromarray(np.ascontiguousarray(pixels)))
    return np.asarray(imaging.resize(img, size), dtype=np.uint8)
