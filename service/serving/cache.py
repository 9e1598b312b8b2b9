"""Models ready to serve: loaded lazily (once, however many requests ask), warmed up, kept in an LRU."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.errors import ModelNotFound, ModelUnavailable
from service.serving.batching import MicroBatcher
from service.serving.runners import load_runner
from worker.spec import CLASS_NAMES
from worker.store import TFLITE_FILE, ModelStore

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to predict: its classes, the input its runner takes, and its batcher."""

    model_id: str
    classes: list[str]
    backend: str
    batcher: MicroBatcher

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.batcher.runner.input_shape


class ModelCache:
    """Models ready to predict, least recently used evicted beyond `size`; loads are shared, never repeated."""

    def __init__(self, store: ModelStore, executor: Executor, *, size: int, threads: int, max_batch: int,
                 window_ms: float, on_batch: Callable[[int], None] | None = None,
                 on_load: Callable[[str, float], None] | None = None, alone: Callable[[], bool] | None = None) -> None:
        self._store = store
        self._executor = executor
        self._size = size
        self._threads = threads
        self._max_batch = max_batch
        self._window_s = window_ms / 1000.0
        self._on_batch = on_batch
        self._on_load = on_load
        self._alone = alone
        self._entries: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def loaded_ids(self) -> list[str]:
        """Ids in the cache, least recently used first."""
        return list(self._entries)

    async def get(self, model_id: str) -> LoadedModel:
        """The loaded model, loading (and warming up) it on first use."""
        entry = self._entries.get(model_id)
        if entry is not None:
            self._entries.move_to_end(model_id)
            return entry
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.create_task(self._load(model_id))
            self._loading[model_id] = task
            task.add_done_callback(lambda done: self._forget_load(model_id, done))
        return await asyncio.shield(task)

    def _forget_load(self, model_id: str, task: asyncio.Task[LoadedModel]) -> None:
        if self._loading.get(model_id) is task:
            del self._loading[model_id]
        if not task.cancelled():
            task.exception()  # retrieved here, so a load nobody awaits any more is not reported as lost

    async def predict(self, model_id: str, images: np.ndarray) -> tuple[LoadedModel, np.ndarray]:
        entry = await self.get(model_id)
        return entry, await entry.batcher.predict(images)

    def evict(self, model_id: str) -> bool:
        """Forget a model (after it was deleted); requests already running on it still finish."""
        task = self._loading.pop(model_id, None)
        if task is not None:
            task.add_done_callback(lambda _: self._entries.pop(model_id, None))
        return self._entries.pop(model_id, None) is not None or task is not None

    def clear(self) -> None:
        self._entries.clear()

    async def _load(self, model_id: str) -> LoadedModel:
        model_dir = self._store.model_dir(model_id)
        if model_dir is None:
            raise ModelNotFound(model_id)
        meta = self._store.metadata(model_id) or {}
        started = time.perf_counter()
        try:
            runner = await asyncio.to_thread(load_runner, model_dir, self._threads)
        except ImportError as exc:
            raise ModelUnavailable(f"model {model_id!r} has no {TFLITE_FILE} and TensorFlow is not installed in "
                                   "the API, so its Keras model cannot be served") from exc
        except Exception as exc:
            log.exception("loading model %s failed", model_id)
            raise ModelUnavailable(f"model {model_id!r} could not be loaded: {exc}") from exc
        seconds = time.perf_counter() - started
        if self._on_load is not None:
            self._on_load(runner.backend, seconds)
        log.info("loaded model %s (%s) in %.2f s", model_id, runner.backend, seconds)
        classes = [str(c) for c in meta.get("classes") or CLASS_NAMES]
        entry = LoadedModel(model_id, classes, runner.backend,
                            MicroBatcher(runner, self._executor, self._max_batch, self._window_s, self._on_batch,
                                         self._alone))
        if self._store.model_dir(model_id) is None:  # deleted while it loaded
            raise ModelNotFound(model_id)
        self._entries[model_id] = entry
        while len(self._entries) > self._size:
            evicted, _ = self._entries.popitem(last=False)
            log.info("evicted model %s from the predict cache", evicted)
        return entry
