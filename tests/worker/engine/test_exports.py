"""The quantized TFLite exports on small models (no data needed): float16's own weight pass and rounding,
int8's uint8 input."""

from __future__ import annotations

import keras
import numpy as np

from worker.engine.export import convert_tflite
from worker.engine.exports import convert_float16, convert_int8, float16_weights
from worker.engine.rounding import float16_rounded
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


def test_float16_weights_stores_kernels_as_float16_and_keeps_biases_float32() -> None:
    from ai_edge_litert.interpreter import Interpreter

    model = _model()
    content, _ = convert_tflite(model)
    half = float16_weights(content)
    tensors = Interpreter(model_content=half).get_tensor_details()
    kinds = {(d["dtype"], len(d["shape"])) for d in tensors if "float16" in d["name"]}
    assert kinds == {(np.float16, 2), (np.float16, 4)}  # the Dense and the two convolution kernels
    assert len(half) < len(content)
    x = _images(32).astype(np.float32)
    np.testing.assert_allclose(run_batches(half, x, batch_size=32), run_batches(content, x, batch_size=32),
                               atol=5e-3)


def test_float16_rounding_is_float16_exact_and_restores_the_weights() -> None:
    model = _model()
    before = [w.copy() for w in model.get_weights()]
    with float16_rounded(model, _images(16)):
        kernel = model.layers[2].kernel.numpy()
        scale = model.layers[3].gamma.numpy() / np.sqrt(model.layers[3].moving_variance.numpy() + 1e-3)
        folded = kernel * scale
        assert np.allclose(folded, folded.astype(np.float16).astype(np.float32), rtol=1e-6, atol=0)
        dense = model.layers[-1].kernel.numpy()
        assert np.array_equal(dense, dense.astype(np.float16).astype(np.float32))
    for a, b in zip(before, model.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_float16_export_agrees_with_keras() -> None:
    model = _model()
    images = _images(64, seed=1)
    probs = run_batches(convert_float16(model, _images(16)), images.astype(np.float32), batch_size=64)
    np.testing.assert_allclose(probs, model.predict(images.astype(np.float32), verbose=0), atol=5e-3)


def test_int8_export_takes_raw_uint8_pixels() -> None:
    from ai_edge_litert.interpreter import Interpreter

    model = _model()
    content = convert_int8(model, _images(64))
    detail = Interpreter(model_content=content).get_input_details()[0]
    assert detail["dtype"] == np.uint8 and tuple(detail["quantization"]) == (1.0, 0)
    probs = run_batches(content, _images(32, seed=2), batch_size=32)
    assert probs.shape == (32, 4) and np.allclose(probs.sum(axis=1), 1, atol=0.05)
