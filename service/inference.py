"""Serving models: load lazily, warm up once, keep a few in an LRU, and micro-batch concurrent requests.

- `model.tflite` is served with LiteRT (`ai_edge_litert`); only a model without one falls back to Keras,
  and only then is TensorFlow imported (the API process otherwise never loads it). The Keras model is
  called through one `tf.function` with a dynamic batch dimension, so nothing retraces per request.
- Each interpreter is resized only when the batch size changes. Measured on 2 CPU cores
  (MobileNetV2 at 96 px): resize + allocate costs 0.8 ms (8 images) to 5 ms (64), 6-8% of running that
  batch and with no extra cost on the first run after it; padding to power-of-two buckets instead would
  waste up to half of each batch's compute, and one interpreter per bucket multiplies memory.
- Batches under `MULTI_THREAD_MIN_BATCH` images run on a single-threaded interpreter; only larger ones use
  `TL_SERVING_THREADS` (a second interpreter, made on the first such batch: about 30 MB more). Measured on
  2 shared cores: one image costs 3.35 ms of CPU on one thread against 4.59 ms on two, and is not faster
  on two either (a second thread only pays when a core is idle; under concurrent requests the clients and
  the API's own threads keep both busy); from 32 images up, two threads finish a batch about 15% sooner
  (for 0-20% more CPU). Over HTTP, one thread for single images cut the API's CPU per request by 8-16%
  (1 to 16 clients).
- `MicroBatcher`: concurrent requests for the same model are merged into one batch of at most
  `TL_MAX_BATCH` images, waiting at most `TL_BATCH_WINDOW_MS` for requests already on their way (like
  TF Serving's batch_timeout, but a lone request does not wait); while a batch runs, the next one
  gathers by itself. Each model runs one batch at a time, in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.errors import ModelNotFound, ModelUnavailable
from worker.spec import CLASS_NAMES
from worker.store import KERAS_FILE, TFLITE_FILE, ModelStore

log = logging.getLogger(__name__)

INPUT_SHAPE = (32, 32, 3)


class Runner(Protocol):
    """Runs a float32 (N, 32, 32, 3) batch of raw 0..255 RGB and returns (N, classes) probabilities."""

    backend: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


#: Smaller batches run on one thread, larger ones on `TL_SERVING_THREADS` (see the module docstring).
MULTI_THREAD_MIN_BATCH = 32


class LiteRTInterpreter:
    """One LiteRT interpreter over `model.tflite` with a fixed thread count, resized to each batch size."""

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.threads = threads
        self.batch = -1  # the batch size the tensors are allocated for
        self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        shape = tuple(int(d) for d in self._input["shape_signature"][1:])
        if shape != INPUT_SHAPE:
            raise ValueError(f"model.tflite takes input {shape}, expected {INPUT_SHAPE}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a float32 (N, 32, 32, 3) batch; not thread-safe."""
        n = int(batch.shape[0])
        if n != self.batch:  # resize only when the batch size changes (see the module docstring)
            self._interpreter.resize_tensor_input(self._input["index"], [n, *INPUT_SHAPE])
            self._interpreter.allocate_tensors()
            self.batch = n
        self._interpreter.set_tensor(self._input["index"], np.ascontiguousarray(batch, dtype=np.float32))
        self._interpreter.invoke()
        return np.array(self._interpreter.get_tensor(self._output["index"]), dtype=np.float32)


class TFLiteRunner:
    """LiteRT over `model.tflite`: batches under `MULTI_THREAD_MIN_BATCH` images on one thread, larger ones on
    `threads`; not thread-safe, so one batch at a time (the batcher's job)."""

    backend = "tflite"

    def __init__(self, path: Path, threads: int) -> None:
        self._path = path
        self._threads = threads
        self._single = LiteRTInterpreter(path, threads=1)
        self._multi: LiteRTInterpreter | None = None  # made on the first large batch, when threads > 1

    def interpreter_for(self, images: int) -> LiteRTInterpreter:
        """The interpreter that runs a batch of `images`."""
        if self._threads == 1 or images < MULTI_THREAD_MIN_BATCH:
            return self._single
        if self._multi is None:
            self._multi = LiteRTInterpreter(self._path, self._threads)
        return self._multi

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.interpreter_for(int(batch.shape[0])).run(batch)


class KerasRunner:
    """The Keras fallback for a model directory without `model.tflite` (imports TensorFlow, lazily)."""

    backend = "keras"

    def __init__(self, path: Path) -> None:
        import keras
        import tensorflow as tf

        model = keras.saving.load_model(str(path), compile=False, safe_mode=True)  # no arbitrary code
        signature = [tf.TensorSpec([None, *INPUT_SHAPE], tf.float32)]
        self._tf = tf
        self._call = tf.function(lambda x: model(x, training=False), input_signature=signature)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(self._tf.constant(batch, dtype=self._tf.float32)), dtype=np.float32)


def load_runner(model_dir: Path, threads: int) -> Runner:
    """LiteRT when the model has a `.tflite` export, else Keras; warmed up with one image before use."""
    tflite = model_dir / TFLITE_FILE
    runner: Runner
    if tflite.is_file():
        runner = TFLiteRunner(tflite, threads)
    elif (model_dir / KERAS_FILE).is_file():
        runner = KerasRunner(model_dir / KERAS_FILE)
    else:
        raise FileNotFoundError(f"{model_dir} holds neither {TFLITE_FILE} nor {KERAS_FILE}")
    out = runner.predict(np.zeros((1, *INPUT_SHAPE), dtype=np.float32))
    if out.ndim != 2 or out.shape[0] != 1:
        raise ValueError(f"the model returned shape {out.shape} for one image, expected (1, classes)")
    return runner


@dataclass
class _Request:
    images: np.ndarray
    future: asyncio.Future[np.ndarray]


class MicroBatcher:
    """Merges concurrent `predict` calls on one model into batches of at most `max_batch` images.

    A batch waits for more requests only while some are known to be on their way (`incoming`: their
    bodies are still being read or decoded), and never longer than `window_s`; a lone request runs at
    once. Measured on 2 cores over HTTP: always waiting the full window cost a single client 60% of its
    throughput (185 vs 456 requests/s) for no gain, while under 16 clients the wait pays off.
    """

    def __init__(self, runner: Runner, executor: Executor, max_batch: int, window_s: float,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.runner = runner
        self._executor = executor
        self._max_batch = max_batch
        self._window_s = window_s
        self._on_batch = on_batch
        self._pending: deque[_Request] = deque()
        self._pending_images = 0
        self._incoming = 0
        self._changed = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request whose images are being read, so a forming batch may wait for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._changed.set()

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for `images` (N <= max_batch), computed in a batch shared with concurrent calls."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(images, future))
        self._pending_images += len(images)
        self._changed.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _gather(self) -> None:
        """Wait (at most the window) while announced requests may still join and the batch is not full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._window_s
        while self._incoming > 0 and self._pending_images < self._max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if self._window_s > 0:
                await self._gather()
            batch: list[_Request] = []
            count = 0
            while self._pending and (not batch or count + len(self._pending[0].images) <= self._max_batch):
                request = self._pending.popleft()
                batch.append(request)
                count += len(request.images)
            self._pending_images -= count
            live = [r for r in batch if not r.future.done()]  # skip callers that went away
            if not live:
                continue
            images = live[0].images if len(live) == 1 else np.concatenate([r.images for r in live])
            try:
                probs = await loop.run_in_executor(self._executor, self.runner.predict, images)
            except Exception as exc:
                for request in live:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(images))
            start = 0
            for request in live:
                end = start + len(request.images)
                if not request.future.done():
                    request.future.set_result(probs[start:end])
                start = end


@dataclass
class LoadedModel:
    model_id: str
    classes: list[str]
    backend: str
    batcher: MicroBatcher
    loaded_at: float = field(default_factory=time.time)


class ModelCache:
    """Models ready to predict, least recently used evicted beyond `size`; loads are shared, never repeated."""

    def __init__(self, store: ModelStore, executor: Executor, *, size: int, threads: int, max_batch: int,
                 window_ms: float, on_batch: Callable[[int], None] | None = None,
                 on_load: Callable[[str, float], None] | None = None) -> None:
        self._store = store
        self._executor = executor
        self._size = size
        self._threads = threads
        self._max_batch = max_batch
        self._window_s = window_ms / 1000.0
        self._on_batch = on_batch
        self._on_load = on_load
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
                            MicroBatcher(runner, self._executor, self._max_batch, self._window_s, self._on_batch))
        if self._store.model_dir(model_id) is None:  # deleted while it loaded
            raise ModelNotFound(model_id)
        self._entries[model_id] = entry
        while len(self._entries) > self._size:
            evicted, _ = self._entries.popitem(last=False)
            log.info("evicted model %s from the predict cache", evicted)
        return entry


def rank_predictions(probs: np.ndarray, classes: list[str], k: int, with_probabilities: bool) -> list[dict[str, Any]]:
    """Predictions in request order: label, class_index, probability, top_k (and all probabilities)."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out: list[dict[str, Any]] = []
    for row, indices in zip(probs, order, strict=True):
        ranked = [{"label": _label(classes, int(i)), "class_index": int(i), "probability": round(float(row[i]), 6)}
                  for i in indices]
        prediction: dict[str, Any] = {**ranked[0], "top_k": ranked}
        if with_probabilities:
            prediction["probabilities"] = [round(float(p), 6) for p in row]
        out.append(prediction)
    return out


def _label(classes: list[str], index: int) -> str:
    return classes[index] if index < len(classes) else str(index)
