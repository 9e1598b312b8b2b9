"""The frozen-base fast path's features: computed once per image in large batches, cached on disk.

While the base is frozen, `base(preprocess(resize(x)))` never changes for an image, so the engine runs it once
and trains the head on the result.

Two ways to compute them, both float32:
- `extract_features`: the Keras extractor in a tf.function (exactly the saved model's own computation; used for
  the test split, so that the head on these features gives the saved model's probabilities, and on a GPU);
- `extract_features_litert`: the same extractor converted to TensorFlow Lite and run by LiteRT's XNNPACK
  kernels (worker.litert): faster than TensorFlow on a CPU, the values differing only by float rounding. Used
  for the training split on a CPU.

`FeatureCache` keeps them in `TL_ARTIFACT_DIR/feature-cache/`, one `.npy` file per (split, subset), keyed by
everything that determines the features (`FeatureKey`): the data's identity, the subset indices' sha256, image
size, alpha, the weights file's sha256 and the runtime that computed them. Files are written atomically
(readers never see a partial file; two workers racing write the same bytes). The total size is bounded by
`TL_FEATURE_CACHE_MAX_BYTES`: least recently used files (by mtime, refreshed on every hit) are evicted first.
The bound counts the temporary files being written too; one that nothing has touched for
`SWEEP_MAX_AGE_SECONDS` was left by a killed writer and is removed (on every store, and by `sweep`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.litert import run_batches
from worker.store import write_atomic
from worker.store.local import SWEEP_MAX_AGE_SECONDS, is_temp_file

log = logging.getLogger(__name__)

SUFFIX = ".npy"
EXTRACT_BATCH = 256
LITERT_BATCH = 64  # XNNPACK prefers small batches (bench/README.md)


@dataclass(frozen=True)
class FeatureKey:
    """Everything that determines one split's features; its digest names the cache file."""

    split: str
    data_identity: str
    indices_sha256: str
    count: int
    image_size: int
    alpha: float
    weights_sha256: str
    extractor: str  # the runtime and versions that computed the features

    def digest(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:40]

    def file_name(self) -> str:
        return f"{self.split}-{self.count}-{self.image_size}-{self.alpha}-{self.digest()}{SUFFIX}"


class FeatureCache:
    """A bounded directory of feature arrays; `max_bytes == 0` disables it."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def path(self, key: FeatureKey) -> Path:
        return self.directory / key.file_name()

    def load(self, key: FeatureKey) -> np.ndarray | None:
        """The cached features, or None (absent, unreadable or of the wrong length)."""
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            features = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # truncated by a crash of an older version, disk error: recompute
            log.warning("ignoring unreadable feature cache file %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return None
        if features.shape[0] != key.count:
            log.warning("ignoring feature cache file %s: %d rows, expected %d", path, features.shape[0], key.count)
            return None
        try:
            os.utime(path)  # mark as recently used: eviction goes by mtime
        except OSError:
            pass
        return features

    def store(self, key: FeatureKey, features: np.ndarray) -> bool:
        """Write atomically, then evict the oldest files beyond the bound; False when not kept."""
        if not self.enabled or features.nbytes > self.max_bytes:
            return False
        path = self.path(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda f: np.save(f, features, allow_pickle=False))
        except OSError as exc:  # the cache is an optimisation: a full disk must not fail the job
            log.warning("could not write feature cache file %s: %s", path, exc)
            return False
        self.evict(keep=path)
        return path.exists()

    def _scan(self) -> tuple[list[tuple[float, int, Path]], list[tuple[float, int, Path]]]:
        """(mtime, size, path) of the cache files and of the temporary files being written, oldest first."""
        files: list[tuple[float, int, Path]] = []
        temps: list[tuple[float, int, Path]] = []
        try:
            scanned = list(os.scandir(self.directory))
        except FileNotFoundError:
            return [], []
        for entry in scanned:
            is_cache = entry.name.endswith(SUFFIX) and not entry.name.startswith(".")
            if not (is_cache or is_temp_file(entry.name)) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            (files if is_cache else temps).append((stat.st_mtime, stat.st_size, Path(entry.path)))
        files.sort()
        temps.sort()
        return files, temps

    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every cache file, oldest first."""
        return self._scan()[0]

    def total_bytes(self) -> int:
        """Bytes on disk: the cache files and the temporary files beside them."""
        files, temps = self._scan()
        return sum(size for _, size, _ in files + temps)

    def sweep_temp_files(self, max_age_seconds: float = SWEEP_MAX_AGE_SECONDS) -> list[Path]:
        """Remove temporary files untouched for `max_age_seconds` (their writer was killed)."""
        now = time.time()
        removed = []
        for mtime, size, path in self._scan()[1]:
            if now - mtime >= max_age_seconds:
                path.unlink(missing_ok=True)
                removed.append(path)
                log.info("feature cache: removed %s (%d bytes), left by a killed writer", path.name, size)
        return removed

    def evict(self, keep: Path | None = None, max_age_seconds: float = SWEEP_MAX_AGE_SECONDS) -> list[Path]:
        """Remove crashed temporary files, then the oldest cache files until everything on disk (the
        temporary files being written included) fits in `max_bytes` (never `keep`)."""
        removed = self.sweep_temp_files(max_age_seconds)
        entries, temps = self._scan()
        total = sum(size for _, size, _ in entries + temps)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path)
            log.info("feature cache: evicted %s (%d bytes)", path.name, size)
        return removed

    def sweep(self, max_age_seconds: float = SWEEP_MAX_AGE_SECONDS) -> list[Path]:
        """Crashed temporary files out, and the cache back within its bound (start-up housekeeping). A
        disabled cache (`max_bytes == 0`) keeps its files: only temporary files go."""
        if not self.enabled:
            return self.sweep_temp_files(max_age_seconds)
        return self.evict(max_age_seconds=max_age_seconds)


_compiled_extractors: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _compiled(extractor: Any) -> Any:
    """One tf.function per extractor model (a new one per call would retrace, and TensorFlow warns)."""
    import tensorflow as tf

    run = _compiled_extractors.get(extractor)
    if run is None:
        model = weakref.ref(extractor)  # the cache must not keep its own key alive

        @tf.function(reduce_retracing=True)
        def run(batch: tf.Tensor) -> tf.Tensor:
            target = model()
            assert target is not None, "the extractor was garbage-collected while in use"
            return target(tf.cast(batch, tf.float32), training=False)

        _compiled_extractors[extractor] = run
    return run


def extract_features(
    extractor: object,
    images: np.ndarray,
    *,
    batch_size: int = EXTRACT_BATCH,
    on_batch: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Run `extractor` (a Keras model: raw images -> base features) over uint8 images in large batches.

    `on_batch(done, total)` is called after every batch (progress and the cancel check; it may raise).
    """
    run = _compiled(extractor)
    total = int(images.shape[0])
    out: np.ndarray | None = None
    for start in range(0, total, batch_size):
        chunk = run(images[start:start + batch_size]).numpy()
        if out is None:
            out = np.empty((total, *chunk.shape[1:]), dtype=np.float32)
        out[start:start + chunk.shape[0]] = chunk
        if on_batch is not None:
            on_batch(min(start + batch_size, total), total)
    assert out is not None, "no images to extract features from"
    return out


def litert_version() -> str:
    """The LiteRT runtime that computes features, as recorded in cache keys and metadata."""
    from importlib.metadata import version

    return f"litert {version('ai-edge-litert')} xnnpack"


def extract_features_litert(
    extractor: object,
    images: np.ndarray,
    *,
    batch_size: int = LITERT_BATCH,
    on_batch: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Like `extract_features`, through a float32 TensorFlow Lite conversion of `extractor` run by LiteRT."""
    from worker.engine.export import convert_tflite

    content, _ = convert_tflite(extractor)
    return run_batches(content, images, batch_size=batch_size, on_batch=on_batch)
