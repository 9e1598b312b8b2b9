"""CIFAR-10 sources and the seeded subsets."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from worker.config import Settings
from worker.engine.data import (
    BATCHES_DIR,
    TEST_BATCH,
    TRAIN_BATCHES,
    draw_subsets,
    file_sha256,
    load_cifar10,
    subset_indices,
    take,
)
from worker.errors import DataNotFound, InvalidSpec


def test_subset_is_a_pure_function_of_size_count_seed_and_stream() -> None:
    first = subset_indices(20000, 5000, seed=42, stream=0)
    np.random.default_rng(7).random(1000)  # other random activity in between changes nothing
    np.random.seed(3)
    again = subset_indices(20000, 5000, seed=42, stream=0)
    assert np.array_equal(first, again)
    assert len(np.unique(first)) == 5000 and first.min() >= 0 and first.max() < 20000
    assert not np.array_equal(first, subset_indices(20000, 5000, seed=43, stream=0))
    assert not np.array_equal(first[:1000], subset_indices(20000, 1000, seed=42, stream=1))


@pytest.mark.realdata
def test_real_subsets_are_deterministic_and_labels_match(shared_settings: Settings) -> None:
    dataset = load_cifar10(shared_settings)
    assert (len(dataset.train), len(dataset.test)) == (20000, 5000)
    train_a, test_a = draw_subsets(dataset, 5000, 1000, seed=42)
    train_b, test_b = draw_subsets(dataset, 5000, 1000, seed=42)
    assert np.array_equal(train_a.indices, train_b.indices) and np.array_equal(test_a.indices, test_b.indices)
    assert train_a.indices_sha256 == train_b.indices_sha256
    x, y = take(dataset.test, test_a)
    assert x.shape == (1000, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (1000,)
    assert np.array_equal(y, dataset.test.y[test_a.indices])
    assert dataset.source["kind"] == "npz"
    assert dataset.source["train"]["sha256"] == file_sha256(Path(dataset.source["train"]["path"]))


@pytest.mark.realdata
def test_asking_for_more_images_than_the_split_holds_is_an_error(shared_settings: Settings) -> None:
    dataset = load_cifar10(shared_settings)
    with pytest.raises(InvalidSpec, match=r"train_samples=30000 .* holds only 20000 images; ask for at most 20000"):
        draw_subsets(dataset, 30000, 1000, seed=1)
    with pytest.raises(InvalidSpec, match=r"test_samples=6000 .* holds only 5000"):
        draw_subsets(dataset, 100, 6000, seed=1)


def test_missing_data_names_every_place_looked(tmp_path: Path, isolated_home: Path) -> None:
    settings = Settings(data_dir=tmp_path / "empty", allow_download=False)
    with pytest.raises(DataNotFound) as info:
        load_cifar10(settings)
    message = str(info.value)
    for place in (tmp_path / "empty" / "cifar10" / "train.npz", tmp_path / "empty" / "cifar-10-python.tar.gz",
                  tmp_path / "empty" / "cifar-10-batches-py", isolated_home / ".keras" / "datasets"):
        assert str(place) in message
    assert "TL_ALLOW_DOWNLOAD is false" in message
    assert "put train.npz and test.npz" in message


def _official_batches(folder: Path, per_batch: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a small dataset in the official python pickle layout (channels-first rows, 'labels' lists)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        images = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        rows = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": labels}, f)
        written[name] = (images, np.asarray(labels))
    return written


def test_reads_the_official_python_batches_folder(tmp_path: Path, isolated_home: Path) -> None:
    written = _official_batches(tmp_path / "data" / BATCHES_DIR)
    dataset = load_cifar10(Settings(data_dir=tmp_path / "data", artifact_dir=tmp_path / "artifacts",
                                   allow_download=False))
    assert dataset.source["kind"] == "cifar-10-batches-py"
    assert len(dataset.train) == 5 * 20 and len(dataset.test) == 20
    assert np.array_equal(dataset.train.x[:20], written["data_batch_1"][0])
    assert np.array_equal(dataset.test.y, written[TEST_BATCH][1])


def test_reads_the_official_archive(tmp_path: Path, isolated_home: Path) -> None:
    written = _official_batches(tmp_path / "src" / BATCHES_DIR)
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / BATCHES_DIR, arcname=BATCHES_DIR)
    dataset = load_cifar10(Settings(data_dir=tmp_path / "data", artifact_dir=tmp_path / "artifacts",
                                   allow_download=False))
    assert dataset.source["kind"] == "cifar-10-python.tar.gz"
    assert np.array_equal(dataset.train.x[-20:], written["data_batch_5"][0])
    assert np.array_equal(dataset.test.x, written[TEST_BATCH][0])
    with pytest.raises(InvalidSpec, match="holds only 20 images"):
        draw_subsets(dataset, 100, 100, seed=0)


@pytest.mark.parametrize("source", ["npz", "archive"])
def test_decoded_arrays_are_kept_and_mapped_by_later_loads(tmp_path: Path, isolated_home: Path, source: str) -> None:
    """The first load stores the decoded arrays under data-cache/; the next maps them and gives the same data."""
    data = tmp_path / "data"
    written = _official_batches(tmp_path / "src" / BATCHES_DIR)
    if source == "npz":
        (data / "cifar10").mkdir(parents=True)
        for name, batches in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
            np.savez_compressed(data / "cifar10" / f"{name}.npz",
                                x=np.concatenate([written[b][0] for b in batches]),
                                y=np.concatenate([written[b][1] for b in batches]).astype(np.uint8))
    else:
        data.mkdir()
        with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "src" / BATCHES_DIR, arcname=BATCHES_DIR)
    settings = Settings(data_dir=data, artifact_dir=tmp_path / "artifacts", allow_download=False)

    first = load_cifar10(settings)
    stored = sorted(p.name for p in settings.data_cache_dir.iterdir())
    assert len(stored) == 4 and all(name.endswith((".x.npy", ".y.npy")) for name in stored)
    second = load_cifar10(settings)
    assert isinstance(second.train.x, np.memmap) and not isinstance(first.train.x, np.memmap)
    for a, b in ((first.train, second.train), (first.test, second.test)):
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and a.identity == b.identity
        assert b.y.dtype == np.int64

    # A damaged entry is decoded again (and replaced); turning the cache off never touches it.
    damaged = next(settings.data_cache_dir.glob("*.x.npy"))
    damaged.write_bytes(b"not an array")
    third = load_cifar10(settings)
    assert np.array_equal(third.train.x, first.train.x) and np.array_equal(third.test.x, first.test.x)
    assert np.load(damaged).shape[1:] == (32, 32, 3)
    off = load_cifar10(settings.model_copy(update={"data_cache": False}))
    assert not isinstance(off.train.x, np.memmap)
