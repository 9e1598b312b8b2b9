"""The stored dataset: four .npy arrays and classes.json, and their content hash.

dataset_dir/x_train.npy  (N, size, size, 3) uint8 RGB      y_train.npy  (N,) int32, indices into classes
dataset_dir/x_test.npy   (M, size, size, 3) uint8 RGB      y_test.npy   (M,) int32
dataset_dir/classes.json ["daisy", "roses", ...] sorted
Plain .npy files (the format np.save writes), so training can `np.load(..., mmap_mode="r")` them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from worker.datasets.collect import write_error
from worker.datasets.errors import DatasetError

ARRAY_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")
CLASSES_FILE = "classes.json"
_CHUNK_IMAGES = 256


def write_arrays(out_dir: Path, staged: np.ndarray, classes: Sequence[str], train: tuple[list[int], list[int]],
                 test: tuple[list[int], list[int]], on_chunk: Callable[[float], None]) -> tuple[int, str]:
    """Gather the staged images of each split into its .npy files; returns (bytes of the arrays, sha256).

    `train` and `test` are (staged indices, labels) in stored order. `on_chunk(fraction done)` runs between chunks.
    """
    names = json.dumps(list(classes), ensure_ascii=False)
    digest = hashlib.sha256(b"classes\0" + names.encode() + b"\0")
    total = max(len(train[0]) + len(test[0]), 1)
    done = 0
    stored = 0
    try:
        (out_dir / CLASSES_FILE).write_text(names + "\n", encoding="utf-8")
        for split, (indices, labels) in (("train", train), ("test", test)):
            shape = (len(indices), *staged.shape[1:])
            x_path = out_dir / f"x_{split}.npy"
            digest.update(_array_header(f"x_{split}", shape, np.uint8))
            if not indices:  # a zero-length file cannot be memory-mapped
                np.save(x_path, np.zeros(shape, np.uint8))
            else:
                x = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.uint8, shape=shape)
                order = np.asarray(indices, dtype=np.int64)
                for start in range(0, len(order), _CHUNK_IMAGES):
                    chunk = staged[order[start:start + _CHUNK_IMAGES]]
                    x[start:start + len(chunk)] = chunk
                    digest.update(chunk.tobytes())
                    done += len(chunk)
                    on_chunk(done / total)
                x.flush()
                del x
            stored += int(np.prod(shape))
            y = np.asarray(labels, dtype=np.int32)
            digest.update(_array_header(f"y_{split}", y.shape, np.int32))
            digest.update(y.astype("<i4").tobytes())
            np.save(out_dir / f"y_{split}.npy", y)
            stored += y.nbytes
    except OSError as exc:
        raise write_error(out_dir, exc) from exc
    return stored, digest.hexdigest()


def _array_header(name: str, shape: tuple[int, ...], dtype: type) -> bytes:
    return f"{name}:{np.dtype(dtype).str}:{','.join(map(str, shape))}\0".encode()


def load_arrays(dataset_dir: Path, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                               list[str]]:
    """(x_train, y_train, x_test, y_test, classes) of a processed dataset; memory-mapped read-only by default."""
    mode: Literal["r"] | None = "r" if mmap else None
    x_train, y_train, x_test, y_test = (np.load(dataset_dir / name, mmap_mode=mode, allow_pickle=False)
                                        for name in ARRAY_FILES)
    classes = json.loads((dataset_dir / CLASSES_FILE).read_text(encoding="utf-8"))
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise DatasetError(f"{dataset_dir / CLASSES_FILE} is not a list of class names")
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.ndim != 4 or x.dtype != np.uint8 or len(x) != len(y) or (y.size and int(y.max()) >= len(classes)):
            raise DatasetError(f"the {split} arrays in {dataset_dir} do not match (images {x.shape} {x.dtype}, "
                               f"labels {y.shape}, {len(classes)} classes): process the dataset again")
    return x_train, y_train, x_test, y_test, classes
