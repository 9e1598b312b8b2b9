"""Model runners: LiteRT over `model.tflite`, or the Keras fallback (the only path that imports TensorFlow).

- `model.tflite` is served with LiteRT (`ai_edge_litert`); only a model without one falls back to Keras,
  and only then is TensorFlow imported (the API process otherwise never loads it). The Keras model is
  called through one `tf.function` with a dynamic batch dimension, so nothing retraces per request.
- Each interpreter is resized only when the batch size changes (`worker.litert`); padding to power-of-two
  buckets instead would waste up to half of each batch's compute, and one interpreter per bucket
  multiplies memory.
- Batches under `MULTI_THREAD_MIN_BATCH` images run on a single-threaded interpreter; only larger ones use
  `TL_SERVING_THREADS` (a second interpreter, made on the first such batch). A second thread pays only when
  a core is idle; under concurrent requests the clients and the API's own threads keep both busy
  (bench/README.md has the measurements).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from worker.litert import LiteRTInterpreter
from worker.store import KERAS_FILE, TFLITE_FILE


class Runner(Protocol):
    """Runs a float32 (N, H, W, 3) batch of raw 0..255 RGB and returns (N, classes) probabilities."""

    input_shape: tuple[int, ...]

    backend: str

    #: Whether a lone small request may run on the event loop (`service.serving.batching`).
    inline: bool

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


#: Smaller batches run on one thread, larger ones on `TL_SERVING_THREADS` (see the module docstring).
MULTI_THREAD_MIN_BATCH = 32


class TFLiteRunner:
    """LiteRT over `model.tflite`: batches under `MULTI_THREAD_MIN_BATCH` images on one thread, larger ones on
    `threads`; not thread-safe, so one batch at a time (the batcher's job)."""

    backend = "tflite"
    inline = True

    def __init__(self, path: Path, threads: int) -> None:
        self._path = path
        self._threads = threads
        self._single = LiteRTInterpreter(path, threads=1)
        self._multi: LiteRTInterpreter | None = None  # made on the first large batch, when threads > 1
        self.input_shape = self._single.input_shape

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
    inline = False

    def __init__(self, path: Path) -> None:
        import keras
        import tensorflow as tf

        model = keras.saving.load_model(str(path), compile=False, safe_mode=True)  # no arbitrary code
        self.input_shape = tuple(int(d) for d in model.input_shape[1:])
        signature = [tf.TensorSpec([None, *self.input_shape], tf.float32)]
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
    out = runner.predict(np.zeros((1, *runner.input_shape), dtype=np.float32))
    if out.ndim != 2 or out.shape[0] != 1:
        raise ValueError(f"the model returned shape {out.shape} for one image, expected (1, classes)")
    return runner
