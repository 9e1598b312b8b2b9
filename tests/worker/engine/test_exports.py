"""The quantized TFLite exports on small models (no data needed): how float16 and int8 store kernels, the
error-compensated rounding they share, int8's uint8 input."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from worker.engine import rounding
from worker.engine.export import convert_tflite
from worker.engine.exports import convert_float16, convert_int8
from worker.litert import run_batches


def _model() -> keras.Model:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    bn = model.layers[3]
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 8).astype(np.float32))
    bn.beta.assign(np.linspace(-1, 1, 8).astype(np.float32) * 3.3)
    return model


def _images(n: int, seed: int = 0) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    images[0], images[1] = 0, 255  # the whole 0..255 range: the int8 input's scale is 1
    return images


def _stored(content: bytes) -> dict[str, tuple[Any, int, tuple[float, ...]]]:
    """Kernel tensors stored below float32: name -> (dtype, rank, scales)."""
    from ai_edge_litert.interpreter import Interpreter

    found = {}
    for detail in Interpreter(model_content=content).get_tensor_details():
        if detail["name"].endswith(("/float16", "/int8")):
            scales = tuple(detail["quantization_parameters"]["scales"])
            found[detail["name"]] = (detail["dtype"], len(detail["shape"]), scales)
    return found


def test_float16_stores_kernels_as_float16_and_keeps_biases_float32() -> None:
    model = _model()
    content, _ = convert_tflite(model)
    half = convert_float16(content, _images(16))
    kinds = {(dtype, rank) for dtype, rank, _ in _stored(half).values()}
    assert kinds == {(np.float16, 2), (np.float16, 4)}  # the Dense and the two convolution kernels
    assert len(_stored(half)) == 3 and len(half) < len(content)
    x = _images(64, seed=1).astype(np.float32)
    np.testing.assert_allclose(run_batches(half, x, batch_size=64), model.predict(x, verbose=0), atol=5e-3)


@pytest.mark.parametrize("store", [rounding.FLOAT16, rounding.INT8])
def test_error_compensated_rounding_is_on_the_grid_and_beats_nearest(store: str) -> None:
    """GPTQ's values lie on the grid (float16, or int8 times the channel's scale) and move the layer's output on
    the calibration inputs less than rounding each weight to nearest does: what it is for."""
    from tensorflow.lite.tools import flatbuffer_utils

    content, _ = convert_tflite(_model())
    found = rounding.kernels(flatbuffer_utils.convert_bytearray_to_object(bytearray(content)))
    assert [k.kind for k in found] == ["CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"]
    images = _images(64)
    hs = rounding.covariances(content, found, images)
    for kernel, h in zip(found, hs, strict=True):
        assert h is not None
        chosen, nearest = rounding.rounded(kernel, h, store), rounding.rounded(kernel, None, store)
        if store == rounding.INT8:
            steps = chosen.rows / chosen.scale[:, None]
            assert np.allclose(steps, np.round(steps)) and np.abs(np.round(steps)).max() <= 127
        else:
            assert np.array_equal(chosen.rows, rounding.to_float16(chosen.rows))

        def output_error(rows: np.ndarray, h: np.ndarray = h, w: np.ndarray = kernel.rows) -> float:
            e = rows - w  # sum over inputs of (e x)^2 = e H e^T, per row (per-row H for depthwise)
            return float(np.einsum("ri,rij,rj->", e, h, e) if h.ndim == 3 else np.einsum("ri,ij,rj->", e, h, e))

        assert output_error(chosen.rows) <= output_error(nearest.rows) * 1.0001


def test_int8_stores_per_channel_int8_kernels_and_takes_raw_uint8_pixels() -> None:
    from ai_edge_litert.interpreter import Interpreter

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1),
                              keras.layers.Conv2D(4, 3), keras.layers.Conv2D(64, 3), keras.layers.Flatten(),
                              keras.layers.Dense(4, activation="softmax")])
    content, _ = convert_tflite(model)
    small = convert_int8(content, _images(64))
    stored = _stored(small)
    # The 3x3x3x4 kernel (108 of 2,412+9,216 weights, under FLOAT16_SHARE) stays float16; the rest are int8 with
    # one scale per output channel.
    assert sorted((str(np.dtype(d)), len(s)) for d, _, s in stored.values()) == [
        ("float16", 0), ("int8", 4), ("int8", 64)]
    assert len(small) < 0.4 * len(content)  # 0.27 on the transfer model, where headers weigh nothing
    detail = Interpreter(model_content=small).get_input_details()[0]
    assert detail["dtype"] == np.uint8 and tuple(detail["quantization"]) == (0.0, 0)
    images = _images(64, seed=2)
    probs = run_batches(small, images, batch_size=32)
    keras_probs = model.predict(images.astype(np.float32), verbose=0)
    assert np.mean(probs.argmax(axis=1) == keras_probs.argmax(axis=1)) >= 0.95
    np.testing.assert_allclose(probs, keras_probs, atol=0.05)
