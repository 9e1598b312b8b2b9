"""The exports beyond the served float32 `.tflite`: quantized TFLite for phones and edge devices, and a
SavedModel for TensorFlow Serving and KServe.

- `tflite-float16`: the kernels of convolutions and dense layers stored as float16 (DEQUANTIZE at load time),
  biases and the other small constants kept float32; float32 image in (raw 0..255, as `model.tflite`) and
  float32 probabilities out (about half the size; any TFLite runtime).
- `tflite-int8`: post-training weight quantization calibrated on training images: the kernels stored as int8
  (symmetric, one scale per output channel), except the smallest ones that together hold at most 5 % of the
  weights (the first blocks' kernels, where an error travels through the whole network), stored as float16;
  about 27 % of the float32 file. Computation stays float32 (the runtime dequantizes the weights once at load
  time), so a TFLite CPU runtime runs it at about the float32 file's latency. uint8 image in (the raw
  0..255 pixels a camera gives; no conversion needed) and float32 probabilities out. Full-integer quantization
  (int8 activations too, as integer-only accelerators need) agreed with the Keras transfer model on only about
  75 % of images: rounding the upscaled input to whole pixels alone moves 4 % of its answers, so an 8-bit
  activation grid cannot pass the 98 % check; see `bench/README.md`, "Exports".
- Neither TFLite export rounds a kernel to its nearest values one by one: `worker.engine.rounding` picks values
  that keep each layer's output on calibration images closest to the float model's (nearest rounding to float16
  moved 0.7-0.9 % of the transfer model's answers; its frozen MobileNetV2 amplifies small weight errors 20-60
  times).
- `savedmodel`: `savedmodel.tar.gz` holding `1/` (a version directory, as TF Serving and KServe's TensorFlow
  runtime expect) whose `serving_default` signature takes `image`: uint8 [N, H, W, 3] and returns
  `probabilities` float32 [N, C].

Each is checked on the job's test images against the Keras model's probabilities: top-1 agreement (at least
`MIN_AGREEMENT[format]`) and the test accuracy the exported file itself reaches. One that fails its check, or
cannot be made, is not shipped, and the record says why.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worker.litert import run_batches

log = logging.getLogger(__name__)

FLOAT16, INT8, SAVEDMODEL = "tflite-float16", "tflite-int8", "savedmodel"
FILES = {FLOAT16: "model-float16.tflite", INT8: "model-int8.tflite", SAVEDMODEL: "savedmodel.tar.gz"}
MIN_AGREEMENT = {FLOAT16: 0.995, INT8: 0.98, SAVEDMODEL: 0.999}
#: Training images the error-compensating rounding of float16 and int8 measures layer inputs on.
CALIBRATION_IMAGES = 64
#: int8 keeps the smallest kernels float16 while they hold at most this share of the weights.
FLOAT16_SHARE = 0.05
CHECK_BATCH = 64


def calibration_images(x_train: np.ndarray) -> np.ndarray:
    """`CALIBRATION_IMAGES` training images spread evenly over `x_train` (whose order may follow the classes)."""
    n = len(x_train)
    return np.asarray(x_train[np.unique(np.linspace(0, n - 1, min(n, CALIBRATION_IMAGES)).astype(int))])


def convert_float16(float32: bytes, calibration: np.ndarray) -> bytes:
    """`float32` (a float32 TFLite model) with its kernels rounded by `worker.engine.rounding` on `calibration`
    images and stored as float16; biases and small constants float32; float32 in and out."""
    from worker.engine.rounding import FLOAT16, round_kernels

    return round_kernels(float32, calibration[:CALIBRATION_IMAGES], lambda found: [FLOAT16] * len(found))


def convert_int8(float32: bytes, calibration: np.ndarray) -> bytes:
    """`float32` (a float32 TFLite model) with its kernels rounded by `worker.engine.rounding` on `calibration`
    images and stored as int8, one scale per output channel, except the smallest kernels that together hold at
    most `FLOAT16_SHARE` of the weights (float16); uint8 image in (raw pixels), float32 out."""
    from worker.engine.rounding import round_kernels

    return round_kernels(float32, calibration[:CALIBRATION_IMAGES], int8_stores, uint8_input=True)


def int8_stores(found: Sequence[Any]) -> list[str]:
    """INT8 for each kernel, except FLOAT16 for the smallest ones while they hold at most `FLOAT16_SHARE` of
    all kernel weights: in the transfer model, 34 of its 55 kernels, MobileNetV2's first blocks, where a rounding
    error travels through the whole network (the file is then 27.5 % of the float32 one)."""
    from worker.engine.rounding import FLOAT16, INT8

    sizes = [int(k.weights.size) for k in found]
    stores, budget = [INT8] * len(found), FLOAT16_SHARE * sum(sizes)
    for i in sorted(range(len(found)), key=sizes.__getitem__):
        if sizes[i] > budget:
            break
        stores[i], budget = FLOAT16, budget - sizes[i]
    return stores


def write_savedmodel(model: Any, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """`savedmodel.tar.gz` at `path` (version directory `1/`, uint8 `image` in, `probabilities` out); returns a
    function that predicts with the SavedModel loaded back from the archive's contents."""
    import tensorflow as tf

    class Serving(tf.Module):
        def __init__(self, keras_model: Any) -> None:
            super().__init__()
            self.model = keras_model

        @tf.function(input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.uint8, name="image")])
        def serve(self, image: Any) -> dict[str, Any]:
            probabilities = tf.cast(self.model(tf.cast(image, tf.float32), training=False), tf.float32)
            return {"probabilities": probabilities}

    module = Serving(model)
    with tempfile.TemporaryDirectory(prefix="tl-savedmodel-") as tmp:
        version = Path(tmp) / "1"
        tf.saved_model.save(module, str(version), signatures={"serving_default": module.serve})
        with tarfile.open(path, "w:gz") as archive:
            archive.add(version, arcname="1")
    extracted = Path(tempfile.mkdtemp(prefix="tl-savedmodel-check-"))
    with tarfile.open(path, "r:gz") as archive:
        archive.extractall(extracted, filter="data")
    loaded = tf.saved_model.load(str(extracted / "1"))
    signature = loaded.signatures["serving_default"]

    def predict(images: np.ndarray) -> np.ndarray:
        batches = (tf.constant(np.asarray(images[i:i + CHECK_BATCH], dtype=np.uint8))
                   for i in range(0, len(images), CHECK_BATCH))
        return np.concatenate([signature(image=batch)["probabilities"].numpy() for batch in batches])

    predict.cleanup = lambda: shutil.rmtree(extracted, ignore_errors=True)  # type: ignore[attr-defined]
    return predict


def _as_input(content: bytes, images: np.ndarray) -> np.ndarray:
    """`images` (raw 0..255 pixels) in the dtype the TFLite model's input documents: no rescaling."""
    from ai_edge_litert.interpreter import Interpreter

    dtype = np.dtype(Interpreter(model_content=content).get_input_details()[0]["dtype"])
    return np.asarray(images, dtype=dtype)


def _checked(name: str, probs: np.ndarray, keras_probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    agreement = float(np.mean(probs.argmax(axis=1) == keras_probs.argmax(axis=1)))
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    record: dict[str, Any] = {"top1_agreement": round(agreement, 6), "test_accuracy": round(accuracy, 6),
                              "min_top1_agreement": MIN_AGREEMENT[name], "passed": agreement >= MIN_AGREEMENT[name]}
    if not record["passed"]:
        record["reason"] = (f"agrees with the Keras model on {agreement:.1%} of the test images; "
                            f"at least {MIN_AGREEMENT[name]:.1%} is needed")
    return record


def export_extra(model: Any, formats: Sequence[str], directory: Path, *, calibration: np.ndarray,
                 images: np.ndarray, labels: np.ndarray, keras_probs: np.ndarray, float32: bytes | None = None,
                 progress: Callable[[float], None] | None = None) -> dict[str, dict[str, Any]]:
    """Make, check and write each of `formats` (FLOAT16, INT8, SAVEDMODEL) into `directory`; a record each.
    The TFLite ones are made from `float32` (the job's float32 `.tflite`), converted from `model` if None.

    A format whose conversion fails or whose check does not pass is not written; its record has
    `passed: false` and a `reason`. Never raises for one format's trouble: the job still succeeds.
    """
    records: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(formats):
        started = time.perf_counter()
        path = directory / FILES[name]
        try:
            if name == SAVEDMODEL:
                predict = write_savedmodel(model, path)
                try:
                    probs = predict(images)
                finally:
                    predict.cleanup()  # type: ignore[attr-defined]
            else:
                if float32 is None:
                    from worker.engine.export import convert_tflite

                    float32 = bytes(convert_tflite(model)[0])
                content = (convert_float16 if name == FLOAT16 else convert_int8)(float32, calibration)
                # As a client runs the file: raw pixels, float32 for float16, uint8 for int8.
                probs = run_batches(content, _as_input(content, images), batch_size=CHECK_BATCH)
                path.write_bytes(content)
            record = _checked(name, probs, keras_probs, labels)
        except Exception as exc:  # an export problem must not fail the training job: record it, ship nothing
            log.warning("%s export failed: %s: %s", name, type(exc).__name__, exc)
            record = {"passed": False, "reason": f"the export could not be made: {type(exc).__name__}: {exc}"}
        if record["passed"]:
            record.update(file=FILES[name], bytes=path.stat().st_size)
        else:
            path.unlink(missing_ok=True)
            log.warning("not shipping %s: %s", name, record["reason"])
        record["seconds"] = round(time.perf_counter() - started, 3)
        records[name] = record
        if progress is not None:
            progress((index + 1) / len(formats))
    return records
