"""Helpers of the standard-protocol tests: a second kind of model (96x96x3 input, 3 classes, as trained on an
uploaded dataset) and the model's own LiteRT answer to compare the service with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import testkit
from PIL import Image
from svc_helpers import add_model

from worker import imaging
from worker.litert import LiteRTInterpreter
from worker.store import METADATA_FILE, TFLITE_FILE

SMALL_CLASSES = ["boats", "cars", "horses"]
SMALL_SHAPE = (96, 96, 3)

# A small convolutional model at 96x96 with 3 classes, exported by TensorFlow's own converter in a child
# process (TensorFlow never enters the test process, as it never enters the API's).
_TFLITE_SCRIPT = """
import sys
import keras
import tensorflow as tf
keras.utils.set_random_seed(3)
inputs = keras.Input((96, 96, 3))
x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
x = keras.layers.Conv2D(8, 5, strides=4, activation="relu")(x)
x = keras.layers.GlobalAveragePooling2D()(x)
outputs = keras.layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 3))(x)
model = keras.Model(inputs, outputs)
with open(sys.argv[1], "wb") as f:
    f.write(tf.lite.TFLiteConverter.from_keras_model(model).convert())
"""


def small_tflite(out: Path) -> Path:
    """`out/model.tflite`: the 96x96x3, 3-class model."""
    path = out / TFLITE_FILE
    done = subprocess.run([sys.executable, "-c", _TFLITE_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=600, cwd=testkit.REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return path


def add_small_model(artifact_dir: Path, source: Path, tflite: Path, model_id: str) -> Path:
    """A copy of a trained model directory turned into the 96x96x3, 3-class model (its metadata says so)."""
    target = add_model(artifact_dir, source, model_id)
    (target / TFLITE_FILE).write_bytes(tflite.read_bytes())
    meta = json.loads((target / METADATA_FILE).read_text())
    meta.update({"classes": SMALL_CLASSES, "input_shape": list(SMALL_SHAPE)})
    (target / METADATA_FILE).write_text(json.dumps(meta))
    return target


def resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """What predict makes of a uint8 RGB image: `worker.imaging.resize` to size x size, as float32."""
    return np.asarray(imaging.resize(Image.fromarray(pixels), size), dtype=np.float32)


def litert_probabilities(tflite: Path, batch: np.ndarray) -> np.ndarray:
    """The model's own answer (LiteRT, no service) for a float32 batch of raw 0..255 RGB."""
    return LiteRTInterpreter(tflite, threads=1).run(np.asarray(batch, dtype=np.float32))
