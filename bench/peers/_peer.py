"""What the two peer servers share: the model, the decoding, the ranking. Imported by `bentoml_service.py` and
`litserve_server.py`, in the peers' own venvs (bench/peers/setup.sh), so it uses nothing but numpy, Pillow and
LiteRT, never the service's packages.

The work matches the service's for the benchmark's images (bench/side_by_side.py sends 32x32 RGB PNGs):
Pillow decodes the file, converts it to RGB and resizes it to the model's input side the way
`worker.imaging.resize` does (Lanczos down, bicubic up; a 32x32 image is left as it is), the pixels go in as
float32 raw 0..255 (the input the service's models take), one `ai_edge_litert` interpreter runs the batch,
resized only when the batch size changes (`worker.litert`'s rule), and the answer has the service's shape:
`{"model_id", "predictions": [{"label", "class_index", "probability", "top_k": [...]}]}`. What the service does
besides (pixel-count checks from the header, EXIF rotation, alpha over white, 16-bit scaling) a 32x32 RGB PNG
never needs, so the peers are spared it.

Settings come from the environment, set by bench/side_by_side.py:
PEER_TFLITE (the .tflite file), PEER_CLASSES (a JSON list of class names), PEER_MODEL_ID, PEER_THREADS
(LiteRT threads per interpreter, default 1), PEER_WORKERS (inference processes, default 1), PEER_MAX_BATCH
(1: no batching), PEER_BATCH_WAIT_MS (how long a forming batch may wait) and PEER_FAST_QUEUE (LitServe's
`fast_queue`).
"""

from __future__ import annotations

import io
import json
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

PREDICT_PATH = "/v1/models/latest/predict"
TOP_K = 3


def setting(name: str, default: str) -> str:
    return os.environ.get(f"PEER_{name}", default)


WORKERS = int(setting("WORKERS", "1"))
THREADS = int(setting("THREADS", "1"))
MAX_BATCH = int(setting("MAX_BATCH", "1"))
BATCH_WAIT_MS = float(setting("BATCH_WAIT_MS", "5"))
FAST_QUEUE = setting("FAST_QUEUE", "0") == "1"  # LitServe only: ZeroMQ instead of multiprocessing queues


class Model:
    """One `.tflite` under LiteRT; `run` takes a float32 (N, H, W, 3) batch, returns (N, classes) float32.
    One interpreter per thread that calls it (an interpreter is not thread-safe)."""

    def __init__(self) -> None:
        self.path = setting("TFLITE", "")
        self.classes: list[str] = json.loads(setting("CLASSES", "[]"))
        self.model_id = setting("MODEL_ID", "model")
        self._local = threading.local()
        interpreter = self._interpreter()
        details = interpreter.get_input_details()[0]
        self.input_shape = tuple(int(d) for d in details["shape_signature"][1:])
        self.input_dtype = np.dtype(details["dtype"])
        self.run(np.zeros((1, *self.input_shape), dtype=np.float32))  # warm up, as the service does

    def _interpreter(self) -> Any:
        interpreter = getattr(self._local, "interpreter", None)
        if interpreter is None:
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_path=self.path, num_threads=THREADS)
            self._local.interpreter, self._local.batch = interpreter, -1
        return interpreter

    def run(self, batch: np.ndarray) -> np.ndarray:
        interpreter = self._interpreter()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        if batch.shape[0] != self._local.batch:
            interpreter.resize_tensor_input(inp["index"], list(batch.shape))
            interpreter.allocate_tensors()
            self._local.batch = batch.shape[0]
        interpreter.set_tensor(inp["index"], np.ascontiguousarray(batch, dtype=self.input_dtype))
        interpreter.invoke()
        return np.array(interpreter.get_tensor(out["index"]), dtype=np.float32)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """A decoded image -> (H, W, 3) float32 raw 0..255 at the model's input side."""
        size = self.input_shape[0]
        image = image.convert("RGB") if image.mode != "RGB" else image
        if image.size != (size, size):
            down = image.width >= size and image.height >= size
            image = image.resize((size, size), Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.float32)

    def decode(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return self.pixels(image)

    def rank(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """The service's prediction objects (label, class_index, probability, top_k), one per row."""
        out = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:TOP_K]
            ranked = [{"label": self.classes[i] if i < len(self.classes) else str(i), "class_index": int(i),
                       "probability": round(float(row[i]), 6)} for i in order]
            out.append({**ranked[0], "top_k": ranked})
        return out

    def answer(self, probs: np.ndarray) -> dict[str, Any]:
        return {"model_id": self.model_id, "predictions": self.rank(probs)}
