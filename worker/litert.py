"""LiteRT (TensorFlow Lite) interpreters, as the API serves and the engine checks exports. No TensorFlow here.

One rule lives here: an interpreter is resized only when the batch size changes. Resize + allocate costs
a few percent of running the batch, so a stream of same-sized batches pays it once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


def cpu_threads() -> int:
    """The CPUs this process may use (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class LiteRTInterpreter:
    """One interpreter over a `.tflite` file or its bytes, with a fixed thread count; not thread-safe."""

    def __init__(self, model: Path | bytes, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.threads = threads
        self.batch = -1  # the batch size the tensors are allocated for
        if isinstance(model, bytes):
            self._interpreter = Interpreter(model_content=model, num_threads=threads)
        else:
            self._interpreter = Interpreter(model_path=str(model), num_threads=threads)
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in self._input["shape_signature"][1:])
        self.input_dtype = np.dtype(self._input["dtype"])
        scale, zero_point = self._input.get("quantization", (0.0, 0))
        #: An integer input's quantization (real = scale * (q - zero_point)); None for float inputs.
        self.input_quantization = (float(scale), int(zero_point)) if self.input_dtype.kind in "iu" and scale else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output for a batch (N, *input_shape), as float32."""
        n = int(batch.shape[0])
        if n != self.batch:
            self._interpreter.resize_tensor_input(self._input["index"], [n, *batch.shape[1:]])
            self._interpreter.allocate_tensors()
            self.batch = n
        self._interpreter.set_tensor(self._input["index"], self._prepared(batch))
        self._interpreter.invoke()
        return np.array(self._interpreter.get_tensor(self._output["index"]), dtype=np.float32)

    def _prepared(self, batch: np.ndarray) -> np.ndarray:
        """The batch in the input's dtype: quantized for an integer input (the identity for raw pixels at
        scale 1, zero point 0), as is otherwise."""
        if self.input_quantization is None or self.input_quantization == (1.0, 0):
            return np.ascontiguousarray(batch, dtype=self.input_dtype)
        scale, zero_point = self.input_quantization
        info = np.iinfo(self.input_dtype)
        quantized = np.rint(np.asarray(batch, dtype=np.float32) / scale + zero_point)
        return np.ascontiguousarray(np.clip(quantized, info.min, info.max), dtype=self.input_dtype)


def run_batches(model: Path | bytes, images: np.ndarray, *, batch_size: int, threads: int | None = None,
                on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Outputs of a TFLite model over `images` in batches of `batch_size`, into one preallocated array.

    `on_batch(done, total)` is called after each batch.
    """
    interpreter = LiteRTInterpreter(model, threads or cpu_threads())
    total = int(images.shape[0])
    if total == 0:
        raise ValueError("no images to run the model on")
    out: np.ndarray | None = None
    for start in range(0, total, batch_size):
        result = interpreter.run(images[start:start + batch_size])
        if out is None:
            out = np.empty((total, *result.shape[1:]), dtype=np.float32)
        out[start:start + len(result)] = result
        if on_batch is not None:
            on_batch(min(start + batch_size, total), total)
    assert out is not None
    return out
