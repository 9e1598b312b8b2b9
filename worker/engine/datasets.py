"""Uploaded datasets as the engine trains on them: mapped from the store, subsets stratified, images resized.

A processed dataset (`worker.datasets.process_archive`) holds uint8 images at a fixed stored size; a job
resizes them to its model's input size with the same function that resizes predict inputs
(`worker.imaging.resize`), so training and serving see images the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from worker.config import Settings
from worker.engine.data import TEST_STREAM, TRAIN_STREAM, Dataset, Split, Subset
from worker.errors import DataNotFound, InvalidSpec
from worker.imaging import resize
from worker.store import open_dataset_store
from worker.store.datasets import read_summary


def load_uploaded(settings: Settings, dataset_id: str) -> tuple[Dataset, list[str]]:
    """The ready dataset `dataset_id` (arrays memory-mapped) and its class names."""
    from worker.datasets import load_arrays

    store = open_dataset_store(settings)
    data_dir = store.data_dir(dataset_id)
    record = store.get(dataset_id)
    if data_dir is None or record is None or record.status != "ready":
        state = "deleted" if record is None else record.status
        raise DataNotFound(f"dataset {dataset_id!r} is not ready ({state}) under {store.root}; "
                           "upload it again (POST /v1/datasets) or train on another dataset")
    x_train, y_train, x_test, y_test, classes = load_arrays(data_dir, mmap=True)
    summary = read_summary(data_dir)
    sha = str(summary.get("sha256") or record.sha256)
    source: dict[str, Any] = {"kind": "uploaded", "id": dataset_id, "name": record.name, "sha256": sha,
                              "path": str(data_dir)}
    dataset = Dataset(Split("train", x_train, np.asarray(y_train, dtype=np.int64), f"{sha}:train"),
                      Split("test", x_test, np.asarray(y_test, dtype=np.int64), f"{sha}:test"), source)
    return dataset, list(classes)


def stratified_indices(labels: np.ndarray, count: int | None, seed: int, stream: int) -> np.ndarray:
    """`count` indices drawn per class in proportion to the class sizes (every class keeps at least one image
    when `count` allows), seeded; `None` takes every index. Sorted ascending."""
    n = int(labels.shape[0])
    if count is None or count >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, stream])
    classes, sizes = np.unique(labels, return_counts=True)
    quota = np.floor(sizes * count / n).astype(np.int64)
    if count >= len(classes):
        quota = np.maximum(quota, 1)
    while quota.sum() > count:  # the floor of 1 overshot: take from the largest quotas
        quota[np.argmax(quota)] -= 1
    remainders = sizes * count / n - np.floor(sizes * count / n)
    for index in np.argsort(-remainders, kind="stable"):
        if quota.sum() >= count:
            break
        if quota[index] < sizes[index]:
            quota[index] += 1
    chosen = [rng.choice(np.flatnonzero(labels == cls), size=int(q), replace=False)
              for cls, q in zip(classes, quota, strict=True) if q > 0]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def draw_uploaded_subsets(dataset: Dataset, train_samples: int | None, test_samples: int | None,
                          seed: int) -> tuple[Subset, Subset]:
    """The job's subsets of an uploaded dataset: all of each split, or a seeded stratified subset."""
    for split, wanted, name in ((dataset.train, train_samples, "train_samples"),
                                (dataset.test, test_samples, "test_samples")):
        if wanted is not None and wanted > len(split):
            raise InvalidSpec(f"{name}={wanted} but dataset {dataset.source.get('id')!r} holds only {len(split)} "
                              f"{split.name} images; ask for at most {len(split)}")
    return (Subset("train", stratified_indices(dataset.train.y, train_samples, seed, TRAIN_STREAM)),
            Subset("test", stratified_indices(dataset.test.y, test_samples, seed, TEST_STREAM)))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, s, s, 3) -> uint8 (N, size, size, 3) with the serving path's resampling."""
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    out = np.empty((images.shape[0], size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(resize(Image.fromarray(np.asarray(image)), size), dtype=np.uint8)
    return out


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """`balanced` weights: n_samples / (n_classes * n_class) per class (0 for a class with no sample)."""
    counts = np.bincount(labels.astype(np.int64), minlength=n_classes).astype(np.float64)
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, labels.shape[0] / (n_classes * counts), 0.0)
    return weights.astype(np.float32)

