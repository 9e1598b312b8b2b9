"""Where the MobileNetV2 ImageNet weights come from, and which file a model was built from.

Lookup for a job (alpha, image_size):
1. `TL_WEIGHTS_DIR/<official file name>` for the job's size, if Keras ships that size (96, 128, 160, 192, 224);
2. the same in `TL_WEIGHTS_DIR` for another size of the same alpha, nearest first: the convolution weights
   do not depend on the input size, only the statistics they were trained at do (recorded as the reason);
3. Keras' own cache `~/.keras/models/` (same order);
4. `keras.utils.get_file` from the official URL, only when `TL_ALLOW_DOWNLOAD` is true.
Otherwise WeightsNotFound names every path looked at and the exact file to put in TL_WEIGHTS_DIR.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from worker.config import Settings
from worker.engine.data import file_sha256
from worker.errors import WeightsNotFound

log = logging.getLogger(__name__)

KERAS_SIZES: tuple[int, ...] = (96, 128, 160, 192, 224)
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
DOWNLOAD_TIMEOUT_S = 60.0


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
            looked.append(str(path))
            if path.is_file():
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
    try:
        import keras

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # no network must mean an error, not a hang
        try:
            path = Path(keras.utils.get_file(wanted, BASE_URL + wanted, cache_subdir="models"))
        finally:
            socket.setdefaulttimeout(previous)
    except Exception as exc:  # any download failure (no network, proxy, 404) becomes one clear error
        raise WeightsNotFound(
            f"MobileNetV2 ImageNet weights for alpha {float(alpha)} not found; looked at: {', '.join(looked)}; "
            f"download of {BASE_URL}{wanted} failed ({type(exc).__name__}: {exc}). {hint}"
        ) from exc
    return _found(path, alpha, size, image_size, "download")
