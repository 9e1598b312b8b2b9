"""Writing a trained model's files: model.keras, and model.tflite when it agrees with the Keras model.

The TensorFlow Lite export is float32 with a dynamic batch dimension. It is checked on the job's own test
images against the Keras model's probabilities: the top-1 class must be identical on at least 99.9 % of them
and no probability may differ by more than 1e-3. If the conversion or the check fails, no .tflite is shipped
and the reason is recorded in metadata["export"]; the job itself still succeeds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from worker.artifacts import KERAS_FILE, TFLITE_FILE

log = logging.getLogger(__name__)

MIN_TOP1_AGREEMENT = 0.999
MAX_PROB_DIFF = 1e-3
CHECK_BATCH = 64  # XNNPACK's fastest batch size here


def save_keras(model: Any, directory: Path) -> Path:
    path = directory / KERAS_FILE
    model.save(path)
    return path


def convert_tflite(model: Any) -> tuple[bytes, str]:
    """Float32 TFLite bytes of `model` (input (None, 32, 32, 3) float32) and the conversion path used."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    shape = [None, *model.input_shape[1:]]
    try:
        # Freezing the inference function first is ~3x faster than from_keras_model (no SavedModel round trip).
        fn = tf.function(lambda x: model(x, training=False),
                         input_signature=[tf.TensorSpec(shape, tf.float32, name="image")])
        frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
        with _quiet():
            converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            return converter.convert(), "frozen_concrete_function"
    except Exception as exc:  # fall back to the SavedModel path, which handles more graphs
        log.warning("frozen-function TFLite conversion failed (%s); trying from_keras_model", exc)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with _quiet():
        return converter.convert(), "from_keras_model"


@contextlib.contextmanager
def _quiet() -> Any:
    # The converter prints the exported SavedModel's signature (hundreds of lines) to stdout, and the CLI's
    # last stdout line must stay its JSON result; its absl notices ("deprecated conversion path", "new
    # converter") are about TensorFlow's internals, not this model.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl.setLevel(level)


def run_tflite(content: bytes, images: np.ndarray, *, batch_size: int, threads: int | None = None,
               on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Outputs of a TFLite model over `images` in batches, with the serving runtime (LiteRT, XNNPACK).

    The interpreter is resized only when the batch size changes (the last batch); results go straight into
    one preallocated array. `on_batch(done, total)` is called after each batch.
    """
    from ai_edge_litert.interpreter import Interpreter

    from worker.features import cpu_threads

    interpreter = Interpreter(model_content=content, num_threads=threads or cpu_threads())
    inp = interpreter.get_input_details()[0]
    out_index = interpreter.get_output_details()[0]["index"]
    total = int(images.shape[0])
    out: np.ndarray | None = None
    current = None
    for start in range(0, total, batch_size):
        chunk = np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32)
        if current != len(chunk):
            interpreter.resize_tensor_input(inp["index"], [len(chunk), *chunk.shape[1:]])
            interpreter.allocate_tensors()
            current = len(chunk)
        interpreter.set_tensor(inp["index"], chunk)
        interpreter.invoke()
        result = interpreter.get_tensor(out_index)
        if out is None:
            out = np.empty((total, *result.shape[1:]), dtype=np.float32)
        out[start:start + len(chunk)] = result
        if on_batch is not None:
            on_batch(min(start + batch_size, total), total)
    assert out is not None, "no images to run the model on"
    return out


def tflite_predict(content: bytes, images: np.ndarray, batch_size: int = CHECK_BATCH, threads: int | None = None,
                   ) -> np.ndarray:
    """Probabilities of a TFLite model for float32/uint8 images (N, 32, 32, 3), with the serving runtime."""
    return run_tflite(content, images, batch_size=batch_size, threads=threads)


def export_tflite(model: Any, images: np.ndarray, keras_probs: np.ndarray, directory: Path) -> dict[str, Any]:
    """Convert, check against `keras_probs` on `images`, write model.tflite if it passes; the check's record."""
    record: dict[str, Any] = {"format": "tflite", "file": None, "dtype": "float32", "check_images": len(images),
                              "min_top1_agreement": MIN_TOP1_AGREEMENT, "max_prob_diff_allowed": MAX_PROB_DIFF}
    started = time.perf_counter()
    try:
        content, how = convert_tflite(model)
        record["conversion"] = how
        record["convert_seconds"] = round(time.perf_counter() - started, 3)
        checked = time.perf_counter()
        probs = tflite_predict(content, images)
        record["check_seconds"] = round(time.perf_counter() - checked, 3)
    except Exception as exc:  # an export problem must not fail the training job: record it, ship no .tflite
        log.warning("TFLite export failed: %s: %s", type(exc).__name__, exc)
        record.update(passed=False, reason=f"conversion or inference failed: {type(exc).__name__}: {exc}")
        return record
    agreement = float(np.mean(probs.argmax(axis=1) == keras_probs.argmax(axis=1)))
    max_diff = float(np.max(np.abs(probs - keras_probs)))
    passed = bool(agreement >= MIN_TOP1_AGREEMENT and max_diff <= MAX_PROB_DIFF)
    record.update(top1_agreement=agreement, max_prob_diff=max_diff, passed=passed)
    if not passed:
        record["reason"] = (f"TFLite disagrees with the Keras model on the test images: top-1 agreement "
                            f"{agreement:.4f} (needs {MIN_TOP1_AGREEMENT}), max |prob diff| {max_diff:.2e} "
                            f"(allowed {MAX_PROB_DIFF:.0e})")
        log.warning("not shipping model.tflite: %s", record["reason"])
        return record
    (directory / TFLITE_FILE).write_bytes(content)
    record["file"] = TFLITE_FILE
    record["bytes"] = len(content)
    return record
