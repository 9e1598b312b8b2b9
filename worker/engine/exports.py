"""The exports beyond the served float32 `.tflite`: quantized TFLite for phones and edge devices, and a
SavedModel for TensorFlow Serving and KServe.

- `tflite-float16`: the kernels of convolutions and dense layers stored as float16 (DEQUANTIZE at load time),
  biases and the other small constants kept float32; float32 image in (raw 0..255, as `model.tflite`) and
  float32 probabilities out (about half the size; any TFLite runtime). The kernels are not rounded to their
  nearest float16 one by one: `worker.engine.rounding` picks float16 values that keep each layer's output on
  calibration images closest to the float model's (nearest rounding moved 0.7-0.9 % of the transfer model's
  answers; its frozen MobileNetV2 amplifies small weight errors 20-60 times).
- `tflite-int8`: full-integer post-training quantization calibrated on training images; uint8 image in (the raw
  0..255 pixels a camera gives, quantized with scale 1 and zero point 0, so no input conversion is needed: an
  app passes its pixels as they are) and float32 probabilities out. On the transfer model it rarely passes its
  check yet (about 75 % agreement): the same amplification makes int8 weights and activations move too many
  answers; see `bench/README.md`, "Exports".
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
#: Training images the int8 calibration sees.
CALIBRATION_IMAGES = 200
#: Of those, the images float16's error-compensating rounding measures layer inputs on.
ROUNDING_IMAGES = 64
CHECK_BATCH = 64


def convert_float16(model: Any, calibration: np.ndarray) -> bytes:
    """Float16-weight TFLite of `model`: kernels rounded by `worker.engine.rounding` on `calibration` images,
    stored float16; biases and small constants float32; float32 in and out."""
    from worker.engine.export import convert_tflite
    from worker.engine.rounding import float16_rounded

    with float16_rounded(model, calibration[:ROUNDING_IMAGES]):
        content, _ = convert_tflite(model)
    return float16_weights(bytes(content))


#: Operators whose second input is a kernel that float16 stores as float16.
_KERNEL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def float16_weights(content: bytes) -> bytes:
    """A float32 TFLite model with its kernels (constant weights of convolutions and fully connected layers)
    stored as float16, each read through a DEQUANTIZE op (which runtimes fold at load time); everything else
    as it was. The converter's float16 mode also rounds biases and scalars (the 1/127.5 of the preprocessing
    among them), which costs agreement and saves nothing worth having."""
    from tensorflow.lite.python import schema_py_generated as fb
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    codes = model.operatorCodes

    def builtin(index: int) -> int:
        return max(codes[index].builtinCode, codes[index].deprecatedBuiltinCode)

    kernel_ops = {getattr(fb.BuiltinOperator, name) for name in _KERNEL_OPS}
    dequantize = next((i for i in range(len(codes)) if builtin(i) == fb.BuiltinOperator.DEQUANTIZE), None)
    if dequantize is None:
        code = fb.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.DEQUANTIZE
        code.version = 3  # float16 input
        codes.append(code)
        dequantize = len(codes) - 1
    for subgraph in model.subgraphs:
        converted: set[int] = set()
        loads = []
        for op in subgraph.operators:
            if builtin(op.opcodeIndex) not in kernel_ops or len(op.inputs) < 2 or op.inputs[1] in converted:
                continue
            index = int(op.inputs[1])
            tensor = subgraph.tensors[index]
            buffer = model.buffers[tensor.buffer]
            if tensor.type != fb.TensorType.FLOAT32 or buffer.data is None or len(buffer.data) == 0:
                continue
            values = np.frombuffer(bytes(bytearray(buffer.data)), dtype=np.float32)
            half = fb.BufferT()
            half.data = np.frombuffer(values.astype(np.float16).tobytes(), dtype=np.uint8)
            model.buffers.append(half)
            buffer.data = None
            stored = fb.TensorT()
            stored.shape, stored.type = list(tensor.shape), fb.TensorType.FLOAT16
            stored.buffer, stored.name = len(model.buffers) - 1, (tensor.name or b"") + b"/float16"
            subgraph.tensors.append(stored)
            load = fb.OperatorT()
            load.opcodeIndex, load.inputs, load.outputs = dequantize, [len(subgraph.tensors) - 1], [index]
            loads.append(load)
            converted.add(index)
        subgraph.operators = loads + list(subgraph.operators)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def convert_int8(model: Any, calibration: np.ndarray) -> bytes:
    """Full-integer TFLite of `model`, calibrated on `calibration` (uint8 images); uint8 in (scale 1, zero
    point 0: the raw pixels), float32 out."""
    import tensorflow as tf

    def representative() -> Any:
        for image in calibration:
            yield [np.asarray(image, dtype=np.float32)[None]]

    converter = tf.lite.TFLiteConverter.from_concrete_functions([_frozen(model, tf.float32)])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
    return bytes(converter.convert())


def _frozen(model: Any, dtype: Any) -> Any:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], dtype, name="image")])
    return convert_variables_to_constants_v2(fn.get_concrete_function())


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
                 images: np.ndarray, labels: np.ndarray, keras_probs: np.ndarray,
                 progress: Callable[[float], None] | None = None) -> dict[str, dict[str, Any]]:
    """Make, check and write each of `formats` (FLOAT16, INT8, SAVEDMODEL) into `directory`; a record each.

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
                content = (convert_float16(model, calibration) if name == FLOAT16
                           else convert_int8(model, calibration))
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
