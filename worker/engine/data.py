"""CIFAR-10 for training: where it is found, what exactly was read, and the seeded subsets.

Sources, in order (the first that exists wins):
1. `TL_DATA_DIR/cifar10/train.npz` + `test.npz` (arrays `x` uint8 Nx32x32x3 RGB, `y` uint8);
2. the official python archive, `cifar-10-python.tar.gz`, in `TL_DATA_DIR` or `TL_DATA_DIR/cifar10`;
3. its extracted folder `cifar-10-batches-py/`, in the same places or in Keras' own cache (`~/.keras/datasets`);
4. `keras.datasets.cifar10.load_data()` (downloads), only when `TL_ALLOW_DOWNLOAD` is true.

Decoding a local source (npz decompression, the archive, the pickled batches) would be paid by every job, each
in a fresh process. So the decoded arrays of sources 1-3 are kept as plain .npy
files under `TL_ARTIFACT_DIR/data-cache/`, named after the source's sha256, and later jobs map them
(`mmap_mode="r"`) and read only their subset. `TL_DATA_CACHE=false` turns that off. The cache is bounded by
`TL_DATA_CACHE_MAX_BYTES` (temporary files being written included): the least recently used pairs (by mtime,
refreshed on every hit) are evicted first, and a temporary file left by a killed writer is removed.

No TensorFlow here, except inside the Keras download of source 4.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import socket
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from worker.config import Settings
from worker.errors import DataNotFound, InvalidSpec
from worker.imaging import INPUT_SHAPE
from worker.store import write_atomic
from worker.store.local import SWEEP_MAX_AGE_SECONDS, is_temp_file, last_activity

log = logging.getLogger(__name__)

NPZ_DIR = "cifar10"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
DOWNLOAD_TIMEOUT_S = 60.0

_sha_lock = threading.Lock()
_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process per (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _sha_lock:
        cached = _sha_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * 1024 * 1024), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _sha_lock:
        _sha_cache[key] = value
    return value


def array_sha256(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


@dataclass
class Split:
    """One split of the dataset as read: images, labels and the identity of what they were read from."""

    name: str
    x: np.ndarray  # uint8 (N, 32, 32, 3) RGB
    y: np.ndarray  # int64 (N,)
    identity: str  # sha256 of the source file (or of the arrays), used in feature-cache keys

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Dataset:
    train: Split
    test: Split
    source: dict[str, Any] = field(default_factory=dict)  # recorded in metadata.json


@dataclass(frozen=True)
class Subset:
    """A seeded random subset of one split (indices into the split, in drawing order sorted ascending)."""

    split: str
    indices: np.ndarray

    @property
    def indices_sha256(self) -> str:
        return hashlib.sha256(self.indices.astype("<i8").tobytes()).hexdigest()


def subset_indices(split_size: int, count: int, seed: int, stream: int) -> np.ndarray:
    """`count` distinct indices of `range(split_size)`, a pure function of (split_size, count, seed, stream)."""
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(split_size, size=count, replace=False)).astype(np.int64)


TRAIN_STREAM, TEST_STREAM = 0, 1


def draw_subsets(dataset: Dataset, train_samples: int, test_samples: int, seed: int) -> tuple[Subset, Subset]:
    """The job's train and test subsets; asking for more images than a split holds is an InvalidSpec."""
    for split, wanted, field_name in ((dataset.train, train_samples, "train_samples"),
                                      (dataset.test, test_samples, "test_samples")):
        if wanted > len(split):
            where = dataset.source.get(split.name, {}).get("path", dataset.source.get("kind", "the dataset"))
            raise InvalidSpec(
                f"{field_name}={wanted} but the CIFAR-10 {split.name} split found at {where} holds only "
                f"{len(split)} images; ask for at most {len(split)} (subsets are drawn without replacement)"
            )
    return (Subset("train", subset_indices(len(dataset.train), train_samples, seed, TRAIN_STREAM)),
            Subset("test", subset_indices(len(dataset.test), test_samples, seed, TEST_STREAM)))


# ----- sources -----

Arrays = tuple[np.ndarray, np.ndarray]


X_SUFFIX, Y_SUFFIX = ".x.npy", ".y.npy"


@dataclass(frozen=True)
class DataCache:
    """Where decoded splits are kept, and the bound of everything in that directory."""

    directory: Path
    max_bytes: int


def _decoded(cache: DataCache | None, identity: str, decode: Callable[[], Arrays]) -> Arrays:
    """(x, y) of the source split with this identity: mapped from the cache when stored, else decoded (and
    stored when the pair fits in the cache's bound, evicting the least recently used pairs first). A damaged
    entry is decoded again; a failed store only costs the next job time."""
    if cache is None or cache.max_bytes <= 0:
        return decode()
    cache_dir, max_bytes = cache.directory, cache.max_bytes
    stem = hashlib.sha256(identity.encode()).hexdigest()[:32]
    x_path, y_path = cache_dir / f"{stem}{X_SUFFIX}", cache_dir / f"{stem}{Y_SUFFIX}"
    if x_path.is_file() and y_path.is_file():
        try:
            x, y = np.load(x_path, mmap_mode="r", allow_pickle=False), np.load(y_path, allow_pickle=False)
            _check_arrays(x_path, x, y)
            for path in (x_path, y_path):  # recently used: eviction goes by mtime
                with contextlib.suppress(OSError):
                    os.utime(path)
            return x, y
        except (OSError, ValueError, DataNotFound) as exc:
            log.warning("decoding CIFAR-10 again: cached copy %s unusable (%s)", x_path, exc)
    x, y = decode()
    needed = int(x.nbytes) + int(y.nbytes) + 256  # + the two .npy headers
    if needed > max_bytes:
        log.info("not keeping decoded CIFAR-10 under %s: %d bytes exceed TL_DATA_CACHE_MAX_BYTES=%d",
                 cache_dir, needed, max_bytes)
        return x, y
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        evict_data_cache(cache_dir, max_bytes - needed, keep={stem})  # room first: the bound holds while writing
        for path, array in ((y_path, y), (x_path, x)):  # x last: a reader needs both, so x means y is there
            write_atomic(path, functools.partial(_save_array, array=array))
    except OSError as exc:
        log.warning("could not keep decoded CIFAR-10 under %s: %s", cache_dir, exc)
    return x, y


def _data_cache_scan(cache_dir: Path) -> tuple[dict[str, list[tuple[float, int, Path]]], list[tuple[float, int, Path]]]:
    """The cache's pairs by stem ((mtime, size, path) of each of its files) and its temporary files."""
    pairs: dict[str, list[tuple[float, int, Path]]] = {}
    temps: list[tuple[float, int, Path]] = []
    try:
        scanned = list(os.scandir(cache_dir))
    except FileNotFoundError:
        return {}, []
    for entry in scanned:
        name = entry.name
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            stat = entry.stat()
        except FileNotFoundError:
            continue
        item = (stat.st_mtime, stat.st_size, Path(entry.path))
        if is_temp_file(name):
            temps.append(item)
        elif not name.startswith(".") and name.endswith((X_SUFFIX, Y_SUFFIX)):
            pairs.setdefault(name[:-len(X_SUFFIX)], []).append(item)
    return pairs, temps


def evict_data_cache(cache_dir: Path, max_bytes: int, keep: frozenset[str] | set[str] = frozenset(),
                     max_age_seconds: float = SWEEP_MAX_AGE_SECONDS) -> list[Path]:
    """Remove temporary files untouched for `max_age_seconds` (a killed writer), a lone half of a pair as
    old, then the least recently used pairs (never a stem in `keep`) until everything fits in `max_bytes`."""
    now = time.time()
    removed: list[Path] = []
    pairs, temps = _data_cache_scan(cache_dir)
    for mtime, _, path in temps:
        if now - mtime >= max_age_seconds:
            path.unlink(missing_ok=True)
            removed.append(path)
    for stem, files in list(pairs.items()):
        if len(files) == 1 and stem not in keep and now - last_activity(files[0][2]) >= max_age_seconds:
            files[0][2].unlink(missing_ok=True)  # its partner was never written (or was removed by hand)
            removed.append(files[0][2])
            del pairs[stem]
    total = sum(size for files in pairs.values() for _, size, _ in files)
    total += sum(size for mtime, size, _ in temps if now - mtime < max_age_seconds)
    for stem, files in sorted(pairs.items(), key=lambda item: max(mtime for mtime, _, _ in item[1])):
        if total <= max_bytes:
            break
        if stem in keep:
            continue
        for _, size, path in files:
            path.unlink(missing_ok=True)  # a job mapping it keeps reading: an unlinked file lives on while open
            total -= size
            removed.append(path)
        log.info("data cache: evicted %s (%d bytes)", stem, sum(size for _, size, _ in files))
    return removed


def sweep_data_cache(cache_dir: Path, max_bytes: int, max_age_seconds: float = SWEEP_MAX_AGE_SECONDS) -> list[Path]:
    """Start-up housekeeping of the data cache: crashed temporary files out, back within `max_bytes`."""
    return evict_data_cache(Path(cache_dir), max_bytes, max_age_seconds=max_age_seconds)


def _save_array(f: BinaryIO, array: np.ndarray) -> None:
    np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _npz_split(name: str, path: Path, cache: DataCache | None) -> Split:
    def decode() -> Arrays:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise DataNotFound(f"{path} has no arrays 'x' and 'y'; expected x uint8 Nx32x32x3 and y uint8 (N,)")
            x, y = data["x"], data["y"]
        _check_arrays(path, x, y)
        return x, y.astype(np.int64).reshape(-1)

    identity = file_sha256(path)
    x, y = _decoded(cache, f"npz:{identity}", decode)
    return Split(name, x, y, identity)


def _check_arrays(where: Path | str, x: np.ndarray, y: np.ndarray) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != INPUT_SHAPE or len(y) != len(x):
        raise DataNotFound(
            f"{where}: expected x uint8 (N, 32, 32, 3) and y of length N, found x {x.dtype} {x.shape} "
            f"and y {y.shape}"
        )


def _unpickle_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    batch = pickle.loads(raw, encoding="bytes")  # the official CIFAR-10 python format is a pickle
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    _check_arrays(where, x, labels)
    return np.ascontiguousarray(x), labels


def _batches_dataset(folder: Path, cache: DataCache | None) -> Dataset:
    splits = {}
    for name, batch_names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
        paths = [folder / batch_name for batch_name in batch_names]
        digest = hashlib.sha256()
        for path in paths:
            digest.update(file_sha256(path).encode())

        def decode(paths: list[Path] = paths) -> Arrays:
            batches = [_unpickle_batch(path.read_bytes(), str(path)) for path in paths]
            return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])

        identity = digest.hexdigest()
        splits[name] = Split(name, *_decoded(cache, f"batches:{identity}", decode), identity)
    source = {"kind": "cifar-10-batches-py", "path": str(folder),
              "train": {"path": str(folder), "sha256": splits["train"].identity},
              "test": {"path": str(folder / TEST_BATCH), "sha256": splits["test"].identity}}
    return Dataset(splits["train"], splits["test"], source)


def _read_archive(archive: Path) -> dict[str, Arrays]:
    wanted = {f"{BATCHES_DIR}/{name}": name for name in (*TRAIN_BATCHES, TEST_BATCH)}
    found: dict[str, Arrays] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = wanted.get(member.name)
            if name is None or not member.isfile():
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                found[name] = _unpickle_batch(handle.read(), f"{archive}:{member.name}")
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise DataNotFound(f"{archive} lacks {', '.join(missing)}; it is not the official cifar-10-python.tar.gz")
    return {"train": (np.concatenate([found[n][0] for n in TRAIN_BATCHES]),
                      np.concatenate([found[n][1] for n in TRAIN_BATCHES])),
            "test": found[TEST_BATCH]}


def _archive_dataset(archive: Path, cache: DataCache | None) -> Dataset:
    sha = file_sha256(archive)
    read: dict[str, dict[str, Arrays]] = {}  # the archive is read at most once, for both splits

    def split(name: str) -> Split:
        def decode() -> Arrays:
            if not read:
                read["splits"] = _read_archive(archive)
            return read["splits"][name]

        identity = f"{sha}:{name}"
        return Split(name, *_decoded(cache, f"archive:{identity}", decode), identity)

    train, test = split("train"), split("test")
    entry = {"path": str(archive), "sha256": sha}
    return Dataset(train, test, {"kind": "cifar-10-python.tar.gz", "path": str(archive), "train": entry,
                                 "test": entry})


def _keras_cache_dirs() -> list[Path]:
    # keras.datasets keeps its downloads under ~/.keras/datasets; Keras 3 extracts archives into "<name>_extracted/".
    datasets = Path.home() / ".keras" / "datasets"
    return [datasets / BATCHES_DIR, datasets / f"{BATCHES_DIR}_extracted" / BATCHES_DIR]


def _keras_download() -> Dataset:
    from keras.datasets import cifar10

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # no network must mean an error, not a hang
    try:
        (x_train, y_train), (x_test, y_test) = cifar10.load_data()
    finally:
        socket.setdefaulttimeout(previous)
    train = Split("train", x_train, y_train.astype(np.int64).reshape(-1), array_sha256(x_train, y_train))
    test = Split("test", x_test, y_test.astype(np.int64).reshape(-1), array_sha256(x_test, y_test))
    return Dataset(train, test, {"kind": "keras.datasets", "train": {"sha256": train.identity},
                                 "test": {"sha256": test.identity}})


def load_cifar10(settings: Settings) -> Dataset:
    """The whole CIFAR-10 dataset from the first source that exists; DataNotFound names every place looked."""
    data_dir = Path(settings.data_dir).expanduser()
    cache = DataCache(settings.data_cache_dir, settings.data_cache_max_bytes) if settings.data_cache else None
    looked: list[str] = []

    npz_dir = data_dir / NPZ_DIR
    train_npz, test_npz = npz_dir / "train.npz", npz_dir / "test.npz"
    looked.append(f"{train_npz} + {test_npz}")
    if train_npz.is_file() and test_npz.is_file():
        train, test = _npz_split("train", train_npz, cache), _npz_split("test", test_npz, cache)
        source = {"kind": "npz", "train": {"path": str(train_npz), "sha256": train.identity},
                  "test": {"path": str(test_npz), "sha256": test.identity}}
        return Dataset(train, test, source)

    for folder in (data_dir, npz_dir):
        archive = folder / ARCHIVE_NAME
        looked.append(str(archive))
        if archive.is_file():
            return _archive_dataset(archive, cache)
    for folder in (data_dir / BATCHES_DIR, npz_dir / BATCHES_DIR, *_keras_cache_dirs()):
        looked.append(f"{folder}/")
        if (folder / TEST_BATCH).is_file():
            return _batches_dataset(folder, cache)

    hint = (f"put train.npz and test.npz (arrays x uint8 Nx32x32x3 RGB, y uint8) in {npz_dir}/, or the official "
            f"{ARCHIVE_NAME} in {data_dir}/ (TL_DATA_DIR)")
    if not settings.allow_download:
        looked.append("keras.datasets.cifar10 download: skipped, TL_ALLOW_DOWNLOAD is false")
        raise DataNotFound(f"CIFAR-10 not found; looked in: {'; '.join(looked)}. {hint}")
    try:
        log.info("CIFAR-10 not found locally; downloading it through keras.datasets.cifar10")
        return _keras_download()
    except Exception as exc:  # any download failure (no network, proxy, bad archive) becomes one clear error
        looked.append(f"keras.datasets.cifar10 download: failed ({type(exc).__name__}: {exc})")
        raise DataNotFound(f"CIFAR-10 not found; looked in: {'; '.join(looked)}. {hint}") from exc


def take(split: Split, subset: Subset) -> tuple[np.ndarray, np.ndarray]:
    """The subset's images (uint8) and labels (int64)."""
    return split.x[subset.indices], split.y[subset.indices]
