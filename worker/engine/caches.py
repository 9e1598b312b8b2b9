"""The engine's caches as parts of the artifact sweep a starting worker runs (`worker.store.sweep_artifacts`)."""

from __future__ import annotations

from worker.config import Settings
from worker.engine.data import sweep_data_cache
from worker.engine.features import FeatureCache
from worker.store.sweep import Sweep


def cache_sweeps(settings: Settings) -> dict[str, Sweep]:
    """Sweeps of the feature cache and the decoded-data cache: crashed temporaries, and each within its bound."""
    features = FeatureCache(settings.feature_cache_dir, settings.feature_cache_max_bytes)
    return {
        "feature_cache": features.sweep,
        "data_cache": lambda age: sweep_data_cache(settings.data_cache_dir, settings.data_cache_max_bytes, age),
    }
