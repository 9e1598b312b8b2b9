"""The feature cache: atomic files, hits, and the disk bound (least recently used evicted first)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from worker.engine.features import FeatureCache, FeatureKey


def _key(split: str, count: int = 10, indices: str = "i") -> FeatureKey:
    return FeatureKey(split=split, data_identity="d" * 64, indices_sha256=indices, count=count, image_size=96,
                      alpha=1.0, weights_sha256="w" * 64, extractor="k")


def _features(count: int = 10, size: int = 25_000) -> np.ndarray:
    return np.random.default_rng(count).standard_normal((count, size)).astype(np.float32)  # ~1 MB


def test_store_then_load_round_trips_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache", max_bytes=10 * 1024**2)
    assert cache.load(_key("train")) is None
    features = _features()
    assert cache.store(_key("train"), features)
    np.testing.assert_array_equal(cache.load(_key("train")), features)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [_key("train").file_name()]


def test_every_input_of_the_features_is_in_the_key() -> None:
    base = _key("train")
    variants = [_key("test"), _key("train", indices="j"), _key("train", count=11),
                FeatureKey(**{**base.__dict__, "image_size": 128}), FeatureKey(**{**base.__dict__, "alpha": 0.5}),
                FeatureKey(**{**base.__dict__, "weights_sha256": "x" * 64}),
                FeatureKey(**{**base.__dict__, "data_identity": "e" * 64})]
    names = {base.file_name(), *(v.file_name() for v in variants)}
    assert len(names) == 1 + len(variants)


def test_oldest_files_are_evicted_beyond_the_bound(tmp_path: Path) -> None:
    one = _features().nbytes + 128  # a .npy file's size
    cache = FeatureCache(tmp_path / "cache", max_bytes=int(2.5 * one))
    keys = [_key("train", indices=str(i)) for i in range(3)]
    now = time.time()
    for age, key in zip((300, 200, 100), keys, strict=True):
        cache.store(key, _features())
        os.utime(cache.path(key), (now - age, now - age))
    assert cache.total_bytes() <= cache.max_bytes
    assert cache.load(keys[0]) is None  # the oldest went when the third arrived
    assert cache.load(keys[1]) is not None  # a hit makes it the newest...
    cache.store(_key("train", indices="new"), _features())
    assert cache.load(keys[1]) is not None  # ...so the next eviction takes keys[2] instead
    assert cache.load(keys[2]) is None
    assert cache.total_bytes() <= cache.max_bytes


def test_a_zero_bound_disables_the_cache(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache", max_bytes=0)
    assert not cache.store(_key("train"), _features())
    assert cache.load(_key("train")) is None
    assert not (tmp_path / "cache").exists()


def test_an_unreadable_file_is_a_miss_not_an_error(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache", max_bytes=10 * 1024**2)
    (tmp_path / "cache").mkdir()
    cache.path(_key("train")).write_bytes(b"not a numpy file")
    assert cache.load(_key("train")) is None
    assert not cache.path(_key("train")).exists()
