"""The sweep a starting worker (and `make run`) runs over the artifact directory: what killed processes left."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from worker.config import Settings
from worker.store import open_dataset_store, open_model_store
from worker.store.local import SWEEP_MAX_AGE_SECONDS

log = logging.getLogger(__name__)

#: A sweep of one part of the artifact directory, given the age past which leftovers go; the paths it removed.
Sweep = Callable[[float], list[Path]]


def sweep_artifacts(settings: Settings, max_age_seconds: float = SWEEP_MAX_AGE_SECONDS,
                    more: dict[str, Sweep] | None = None) -> dict[str, int]:
    """Sweep the artifact directory of `settings`: the model store and the dataset store, plus the parts in
    `more` (the worker adds the engine's caches: `worker.engine.caches.cache_sweeps`). Never raises: a sweep
    that fails is logged and the rest goes on. Returns the number of paths removed per part."""
    parts: dict[str, Sweep] = {
        "models": open_model_store(settings).sweep,
        "datasets": open_dataset_store(settings).sweep,
        **(more or {}),
    }
    counts = {}
    for name, sweep in parts.items():
        try:
            counts[name] = len(sweep(max_age_seconds))
        except Exception:  # a sweep is housekeeping: it never stops a worker from starting
            log.exception("sweeping the %s under %s failed", name, settings.artifact_dir)
            counts[name] = 0
    if any(counts.values()):
        log.info("artifact sweep: removed %s", ", ".join(f"{n} from the {k}" for k, n in counts.items() if n))
    return counts
