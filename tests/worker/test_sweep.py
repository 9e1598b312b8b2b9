"""What killed processes leave on disk is swept, and every cache stays within its bound: staging and trash
directories, uploads nobody waits for, `write_atomic` temporaries (`.{name}.{random}.tmp`), the feature cache
(temporary files counted in its bound) and the decoded-data cache (bounded by TL_DATA_CACHE_MAX_BYTES)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from worker.config import Settings
from worker.engine.caches import cache_sweeps
from worker.engine.data import file_sha256, load_cifar10, sweep_data_cache
from worker.engine.features import FeatureCache, FeatureKey
from worker.store import METADATA_FILE, ModelStore
from worker.store.datasets import DatasetRecord, DatasetStore
from worker.store.local import SWEEP_MAX_AGE_SECONDS, is_temp_file, write_atomic
from worker.store.sweep import sweep_artifacts

OLD = time.time() - SWEEP_MAX_AGE_SECONDS - 600  # an hour and ten minutes ago


def age(path: Path, when: float = OLD) -> Path:
    """Set the mtime of `path` and of everything in it to `when`."""
    for root, dirs, files in os.walk(path) if path.is_dir() else ():
        for name in (*dirs, *files):
            os.utime(os.path.join(root, name), (when, when))
    os.utime(path, (when, when))
    return path


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def temp_of(path: Path, data: bytes = b"partial", token: str = "0123abcd") -> Path:
    """A crashed (or running) `write_atomic` of `path`: its temporary file beside it."""
    return write(path.with_name(f".{path.name}.{token}.tmp"), data)


def install_model(artifact_dir: Path, model_id: str) -> Path:
    meta = {"id": model_id, "kind": "baseline", "created_at": "2026-01-01T00:00:00.000Z", "classes": ["a", "b"],
            "spec": {"model": "baseline"},
            "metrics": {"train_accuracy": 0.6, "test_accuracy": 0.5, "test_loss": 1.2, "params_total": 10,
                        "params_trainable": 10, "params_non_trainable": 0, "train_seconds": 1.0}}
    return write(artifact_dir / "models" / model_id / METADATA_FILE, json.dumps(meta).encode()).parent


def remaining(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ----- the model store -----

def test_model_store_sweep_removes_old_leftovers_and_keeps_live_work(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    store = ModelStore(artifacts)
    model = install_model(artifacts, "m_live")
    store.set_alias("prod", "m_live")
    staging = artifacts / "models" / ".staging"
    age(write(staging / "m_a-00000001" / "model.keras").parent)               # a job killed while writing
    busy = write(staging / "m_b-00000002" / "model.keras").parent              # a job writing now
    slow = write(staging / "m_c-00000003" / "model.tflite").parent             # old directory, fresh file inside
    age(slow)
    os.utime(slow / "model.tflite")
    write(artifacts / "models" / ".trash" / "m_old-00000004" / "model.keras")  # a delete killed before rmtree
    old_temps = [age(temp_of(artifacts / "aliases.json")), age(temp_of(model / METADATA_FILE)),
                 age(temp_of(artifacts / "export-templates" / "template.bin"))]
    young_temp = temp_of(artifacts / "aliases.json", b"being written", token="fedc9876")
    unrelated = age(write(artifacts / "models" / "m_live" / "notes.tmp"))     # not a write_atomic name

    removed = store.sweep()

    assert {p.name for p in removed} == {"m_a-00000001", "m_old-00000004", *(p.name for p in old_temps)}
    assert busy.is_dir() and slow.is_dir() and young_temp.is_file() and unrelated.is_file()
    assert not (staging / "m_a-00000001").exists() and list((artifacts / "models" / ".trash").iterdir()) == []
    assert store.list_ids() == ["m_live"] and store.read_aliases() == {"prod": "m_live"}
    assert store.sweep() == []  # nothing more to do


def test_a_sweep_of_a_store_that_does_not_exist_is_empty(tmp_path: Path) -> None:
    assert ModelStore(tmp_path / "none").sweep() == []
    assert DatasetStore(tmp_path / "none").sweep() == []


# ----- the dataset store -----

def record(store: DatasetStore, dataset_id: str, status: str) -> None:
    store.put(DatasetRecord(id=dataset_id, status=status, created_at="2026-01-01T00:00:00.000Z"))


def test_dataset_store_sweep_removes_uploads_nobody_waits_for(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    store = DatasetStore(artifacts)
    record(store, "ds_queued", "processing")
    record(store, "ds_failed", "failed")
    uploads = {name: age(write(store.upload_path(name), b"archive"))
               for name in ("ds_queued", "ds_failed", "ds_orphan")}
    fresh = write(store.upload_path("ds_receiving"), b"half an archive")  # being received, no record yet
    root = artifacts / "datasets"
    age(write(root / ".staging" / "ds_x-00000001" / "images.staging").parent)
    busy = write(root / ".staging" / "ds_y-00000002" / "images.staging").parent
    write(root / ".trash" / "ds_z-00000003" / "x_train.npy")
    old_temp = age(temp_of(root / "ds_failed.json"))

    removed = {p.name for p in store.sweep()}

    assert removed == {"ds_failed.bin", "ds_orphan.bin", "ds_x-00000001", "ds_z-00000003", old_temp.name}
    assert uploads["ds_queued"].is_file() and fresh.is_file() and busy.is_dir()
    assert {r.id for r in store.list()} == {"ds_queued", "ds_failed"}  # records are never swept


# ----- the feature cache -----

def key(n: int, count: int = 100) -> FeatureKey:
    return FeatureKey(split="train", data_identity=f"d{n}", indices_sha256="0" * 64, count=count, image_size=96,
                      alpha=1.0, weights_sha256="1" * 64, extractor="test")


def features(count: int = 100) -> np.ndarray:
    return np.ones((count, 256), dtype=np.float32)  # 102,400 bytes (+128 of header)


def test_temporary_files_count_in_the_feature_cache_bound(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "fc", max_bytes=350_000)
    for n in range(3):
        assert cache.store(key(n), features())
    in_flight = temp_of(cache.directory / "train-x.npy", b"\0" * 150_000)  # another worker writing right now
    assert cache.store(key(3), features())
    assert in_flight.is_file(), "a temporary file being written is never removed"
    assert cache.total_bytes() <= cache.max_bytes, "the bound counts the temporary files on disk"
    assert cache.load(key(3)) is not None and cache.load(key(0)) is None


def test_crashed_feature_cache_temporaries_are_swept(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "fc", max_bytes=250_000)
    assert cache.store(key(0), features())
    crashed = age(temp_of(cache.directory / "train-y.npy", b"\0" * 500_000))  # more than the whole bound
    assert cache.store(key(1), features()), "a crashed writer's file does not take the space"
    assert not crashed.exists()
    assert cache.load(key(0)) is not None and cache.load(key(1)) is not None
    age(temp_of(cache.directory / "train-z.npy", b"\0" * 10))
    assert [p.name for p in cache.sweep()] == [".train-z.npy.0123abcd.tmp"]
    assert cache.total_bytes() <= cache.max_bytes


def test_feature_cache_sweep_brings_it_back_within_a_lowered_bound(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "fc", max_bytes=10**6)
    for n in range(4):
        assert cache.store(key(n), features())
        age(cache.path(key(n)), OLD + n)  # key 0 is the least recently used
    lowered = FeatureCache(cache.directory, max_bytes=250_000)
    removed = lowered.sweep()
    assert [p.name for p in removed] == [cache.path(key(0)).name, cache.path(key(1)).name]
    assert lowered.total_bytes() <= 250_000
    assert FeatureCache(cache.directory, max_bytes=0).sweep() == []  # a disabled cache keeps its files


# ----- the decoded-data cache -----

def fake_cifar(root: Path, train: int, test: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "cifar10").mkdir(parents=True)
    for name, count in (("train", train), ("test", test)):
        np.savez(root / "cifar10" / f"{name}.npz", x=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, (count, 1), dtype=np.uint8))
    return root


def cache_files(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.data_cache_dir.iterdir()) if settings.data_cache_dir.is_dir() else []


def settings_for(tmp_path: Path, data: Path, max_bytes: int) -> Settings:
    return Settings(data_dir=data, artifact_dir=tmp_path / "artifacts", allow_download=False,
                    data_cache_max_bytes=max_bytes)


def test_the_data_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    # One source: 300 + 100 images of 3,072 bytes = 1.23 MB of x (+ labels); a bound of 2 MB holds one source.
    sources = [fake_cifar(tmp_path / f"data{n}", 300, 100, seed=n) for n in range(3)]
    bound = 2 * 1024 * 1024
    first = load_cifar10(settings_for(tmp_path, sources[0], bound))
    settings = settings_for(tmp_path, sources[0], bound)
    kept = cache_files(settings)
    assert len(kept) == 4  # x and y of both splits
    again = load_cifar10(settings)
    assert isinstance(again.train.x, np.memmap), "a second job maps the cached copy"
    np.testing.assert_array_equal(np.asarray(again.train.x), first.train.x)

    train_stem = hashlib.sha256(f"npz:{file_sha256(sources[0] / 'cifar10' / 'train.npz')}".encode()).hexdigest()[:32]
    for name in kept:  # the train pair is the least recently used (mtime granularity must not decide)
        age(settings.data_cache_dir / name, OLD if name.startswith(train_stem) else time.time())
    load_cifar10(settings_for(tmp_path, sources[1], bound))
    total = sum(p.stat().st_size for p in settings.data_cache_dir.iterdir())
    assert total <= bound, f"{total} bytes in a {bound}-byte cache"
    now = cache_files(settings)
    assert not any(name.startswith(train_stem) for name in now), "the least recently used pair was evicted"
    assert len(set(now) - set(kept)) == 4, "the new source is kept whole"

    crashed = age(temp_of(settings.data_cache_dir / "abc.x.npy", b"\0" * 1000))
    load_cifar10(settings_for(tmp_path, sources[2], bound))
    assert not crashed.exists(), "a killed writer's temporary file is removed"
    assert sum(p.stat().st_size for p in settings.data_cache_dir.iterdir()) <= bound


def test_a_source_larger_than_the_data_cache_bound_is_not_kept(tmp_path: Path) -> None:
    data = fake_cifar(tmp_path / "data", 300, 100, seed=0)
    small = settings_for(tmp_path, data, 100_000)
    dataset = load_cifar10(small)
    assert len(dataset.train) == 300 and len(dataset.test) == 100
    assert cache_files(small) == []
    zero = settings_for(tmp_path, data, 0)
    load_cifar10(zero)
    assert cache_files(zero) == []


def test_data_cache_sweep_removes_crashed_writes_and_lone_halves(tmp_path: Path) -> None:
    directory = tmp_path / "data-cache"
    pair = [write(directory / f"{'a' * 32}.x.npy", b"\0" * 100), write(directory / f"{'a' * 32}.y.npy", b"\0" * 10)]
    lone = age(write(directory / f"{'b' * 32}.y.npy", b"\0" * 10))  # the writer died before x
    young_lone = write(directory / f"{'c' * 32}.y.npy", b"\0" * 10)  # x is being written now
    crashed = age(temp_of(directory / f"{'d' * 32}.x.npy"))
    removed = sweep_data_cache(directory, max_bytes=10**6)
    assert sorted(removed) == sorted([lone, crashed])
    assert all(p.is_file() for p in pair) and young_lone.is_file()
    assert sorted(p.name for p in sweep_data_cache(directory, max_bytes=50)) == sorted(p.name for p in pair)


# ----- all of it at worker start -----

def test_sweep_artifacts_sweeps_every_part_and_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    artifacts = tmp_path / "artifacts"
    settings = Settings(artifact_dir=artifacts, feature_cache_max_bytes=10**6, data_cache_max_bytes=10**6)
    age(write(artifacts / "models" / ".staging" / "m_a-00000001" / "model.keras").parent)
    age(write(DatasetStore(artifacts).upload_path("ds_orphan")))
    age(temp_of(settings.feature_cache_dir / "train-1.npy"))
    age(temp_of(settings.data_cache_dir / f"{'e' * 32}.x.npy"))
    more = cache_sweeps(settings)
    assert sweep_artifacts(settings, more=more) == {"models": 1, "datasets": 1, "feature_cache": 1, "data_cache": 1}
    assert sweep_artifacts(settings, more=more) == {"models": 0, "datasets": 0, "feature_cache": 0, "data_cache": 0}

    def broken(self: DatasetStore, max_age_seconds: float) -> list[Path]:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(DatasetStore, "sweep", broken)
    age(write(artifacts / "models" / ".staging" / "m_b-00000002" / "model.keras").parent)
    assert sweep_artifacts(settings)["models"] == 1  # one part failing does not stop the others


def test_write_atomic_names_are_what_the_sweeps_look_for(tmp_path: Path) -> None:
    seen: list[str] = []

    def spy(f: object) -> None:
        seen.extend(p.name for p in tmp_path.iterdir())
        raise KeyboardInterrupt  # killed mid-write: here the temporary file is cleaned up by write_atomic

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "features.npy", spy)
    (name,) = seen
    assert name.startswith(".features.npy.") and name.endswith(".tmp")
    assert temp_of(tmp_path / "features.npy").name.startswith(".features.npy.")
    assert is_temp_file(name)
