"""Where the MobileNetV2 ImageNet weights come from, and which file a model was built from.

Lookup for a job (alpha, image_size):
1. `TL_WEIGHTS_DIR/<official file name>` for the job's size, if Keras ships that size (96, 128, 160, 192, 224);
2. the same in `TL_WEIGHTS_DIR` for another size of the same alpha, nearest first: the convolution weights
   do not depend on the input size, only the statistics they were trained at do (recorded as the reason);
3. Keras' own cache `~/.keras/models/` (same order);
4. a download from the official URL into Keras' cache, only when `TL_ALLOW_DOWNLOAD` is true: written to a
   temporary name beside it, checked (every byte the server announced, and the HDF5 file opens), then renamed,
   so a download killed midway never leaves a truncated file under the real name.
Every file found is checked the same way before it is used: a truncated or damaged .h5 (an older version's
interrupted download, a partial copy) is skipped with a warning that names it, and the next candidate is used.
Otherwise WeightsNotFound names every path looked at (and why an existing file was refused) and the exact file
to put in TL_WEIGHTS_DIR.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from worker.config import Settings
from worker.engine.data import file_sha256
from worker.errors import WeightsNotFound
from worker.store.local import sweep_temp_files

log = logging.getLogger(__name__)

KERAS_SIZES: tuple[int, ...] = (96, 128, 160, 192, 224)
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
DOWNLOAD_TIMEOUT_S = 60.0
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: The smallest official no-top file (alpha 0.35) is about 1.7 MB; anything under this is not one.
MIN_WEIGHTS_BYTES = 256 * 1024
#: A temporary download untouched this long was left by a killed worker.
STALE_DOWNLOAD_SECONDS = 3600.0


@dataclass(frozen=True)
class WeightsFile:
    """The weights a model was built from (recorded in metadata.json)."""

    path: str
    file_name: str
    sha256: str
    alpha: float
    size: int  # the input size the file was trained at
    image_size: int  # the job's input size
    source: str  # "weights_dir" | "keras_cache" | "download"
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def weights_file_name(alpha: float, size: int) -> str:
    """The official Keras file name, e.g. mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5."""
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{size}_no_top.h5"


def size_preference(image_size: int) -> list[int]:
    """Keras' sizes, the job's own first, then nearest first (ties: the larger size)."""
    return sorted(KERAS_SIZES, key=lambda s: (s != image_size, abs(s - image_size), -s))


def _keras_models_dir() -> Path:
    return Path.home() / ".keras" / "models"


def weights_file_problem(path: Path) -> str | None:
    """Why `path` cannot be a Keras weights file (None when it is fine): too small, not HDF5, or truncated or
    damaged (HDF5 records the file's length; h5py refuses a shorter file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if head != HDF5_SIGNATURE:
        return "not an HDF5 file"
    if size < MIN_WEIGHTS_BYTES:
        return f"only {size} bytes (truncated)"
    try:
        import h5py
    except ImportError:  # the training extra always has it (Keras needs it to read .h5)
        return None
    try:
        with h5py.File(path, "r") as f:
            if not list(f.keys()):
                return "an HDF5 file without weights"
    except Exception as exc:  # h5py raises OSError for truncation, others for damage
        return f"truncated or damaged ({exc})"
    return None


def _refused(path: Path, problem: str) -> str:
    log.warning("MobileNetV2 weights: ignoring %s: %s; delete or replace it", path, problem)
    return f"{path} (unusable: {problem})"


def download_weights(url: str, target: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download `url` to `target` through a temporary file beside it: every announced byte received and the
    HDF5 file checked before the rename, so `target` is a complete file or untouched. Raises on any failure
    (the temporary file is removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(target.parent, STALE_DOWNLOAD_SECONDS)  # what a download killed earlier left
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            announced = response.headers.get("Content-Length")
            shutil.copyfileobj(response, out, 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        received = tmp.stat().st_size
        if announced is not None and announced.isdigit() and received != int(announced):
            raise OSError(f"the download stopped after {received} of {int(announced)} bytes")
        problem = weights_file_problem(tmp)
        if problem is not None:
            raise OSError(f"the downloaded file is {problem}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return target


def _found(path: Path, alpha: float, size: int, image_size: int, source: str) -> WeightsFile:
    if size == image_size:
        reason = f"the {size}px file matches the job's image_size"
    else:
        own = f"no {image_size}px file" if image_size in KERAS_SIZES else f"Keras ships no {image_size}px file"
        reason = (f"used the {size}px file for a {image_size}px job ({own}; the nearest available size; "
                  "the convolution weights fit any input size)")
    log.info("MobileNetV2 weights: %s (%s)", path, reason)
    return WeightsFile(str(path), path.name, file_sha256(path), float(alpha), size, image_size, source, reason)


def resolve_weights(settings: Settings, alpha: float, image_size: int) -> WeightsFile:
    """The weights file for a transfer job; raises WeightsNotFound with every path looked at."""
    sizes = size_preference(image_size)
    looked: list[str] = []
    places: list[tuple[Path, str]] = []
    if settings.weights_dir is not None:
        places.append((Path(settings.weights_dir).expanduser(), "weights_dir"))
    else:
        looked.append("TL_WEIGHTS_DIR (unset)")
    places.append((_keras_models_dir(), "keras_cache"))
    for folder, source in places:
        for size in sizes:
            path = folder / weights_file_name(alpha, size)
            if not path.is_file():
                looked.append(str(path))
                continue
            problem = weights_file_problem(path)
            if problem is not None:
                looked.append(_refused(path, problem))
                continue
            return _found(path, alpha, size, image_size, source)

    wanted = weights_file_name(alpha, sizes[0])
    where = settings.weights_dir if settings.weights_dir is not None else "a folder named by TL_WEIGHTS_DIR"
    hint = (f"put {wanted} (from {BASE_URL}{wanted}, or any other size of alpha {float(alpha)}) in {where}")
    if not settings.allow_download:
        raise WeightsNotFound(
            f"MobileNetV2 ImageNet weights for alpha {float(alpha)} not found; looked at: {', '.join(looked)}; "
            f"download skipped (TL_ALLOW_DOWNLOAD is false). {hint}"
        )
    size = sizes[0]
    target = _keras_models_dir() / wanted
    try:
        log.info("MobileNetV2 weights: downloading %s to %s", BASE_URL + wanted, target)
        path = download_weights(BASE_URL + wanted, target)
    except Exception as exc:  # any download failure (no network, proxy, 404, cut short) becomes one clear error
        raise WeightsNotFound(
            f"MobileNetV2 ImageNet weights for alpha {float(alpha)} not found; looked at: {', '.join(looked)}; "
            f"download of {BASE_URL}{wanted} failed ({type(exc).__name__}: {exc}). {hint}"
        ) from exc
    return _found(path, alpha, size, image_size, "download")
