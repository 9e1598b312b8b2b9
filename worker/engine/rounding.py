"""Error-compensating rounding of a model's weights onto the float16 grid (GPTQ, Frantar et al. 2022).

Rounding each weight to its nearest float16 independently is not enough for the transfer model: its frozen
MobileNetV2 amplifies small weight errors about 20-60 times by the time they reach the 3x3x1280 features the
Flatten -> Dense head reads (on CIFAR-10 upscaled to 96 px), so nearest rounding moves 0.7-0.9 % of top-1
answers. Here each kernel is rounded one input column at a time, and the rounding error of a column is pushed
onto the columns not yet rounded, weighted by the inverse of the layer's input covariance H = X^T X measured on
calibration images: the layer's *output* error on that data is what is minimised, not each weight's.

The kernel a converter folds BatchNormalization into (scale gamma / sqrt(var + eps)) is what is rounded, so the
folded kernel the converter writes is float16-exact and its float16 cast loses nothing more. Layers with more
inputs per output than `MAX_INPUTS` (the head's 11520 x 128 Dense: its H alone would take 1 GB) are rounded to
nearest: their error averages over many inputs and does not flip answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

#: Layers with more inputs per output channel than this are rounded to nearest.
MAX_INPUTS = 4096
#: Dampening of H's diagonal, relative to its mean (GPTQ's default).
DAMPING = 0.01
BATCH = 16


def _weighted(model: Any) -> list[Any]:
    """Conv2D, DepthwiseConv2D and Dense layers of `model`, nested models included, in graph order."""
    import keras

    found: list[Any] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _weighted(layer)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            found.append(layer)
    return found


def _bn_scale(layer: Any, channels: int) -> np.ndarray:
    """The per-channel scale a converter folds into `layer`'s kernel: that of the BatchNormalization that is
    the only reader of its output, else ones."""
    import keras

    readers = [node.operation for node in getattr(layer, "_outbound_nodes", [])]
    if len(readers) == 1 and isinstance(readers[0], keras.layers.BatchNormalization):
        bn = readers[0]
        gamma = bn.gamma.numpy() if bn.scale else np.ones(channels, np.float32)
        return np.asarray(gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon), dtype=np.float64)
    return np.ones(channels, dtype=np.float64)


def _rows(layer: Any) -> np.ndarray:
    """The kernel as (output channels, inputs per output), inputs in the order of `_patches`."""
    import keras

    kernel = layer.kernel.numpy().astype(np.float64)
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (kh, kw, C, m) -> (C*m, kh*kw)
        kh, kw, c, mult = kernel.shape
        return kernel.reshape(kh * kw, c * mult).T
    return kernel.reshape(-1, kernel.shape[-1]).T


def _set_rows(layer: Any, rows: np.ndarray) -> None:
    layer.kernel.assign(rows.T.reshape(tuple(layer.kernel.shape)).astype(np.float32))


def _patches(layer: Any, x: Any) -> np.ndarray:
    """`layer`'s inputs per output: (positions, inputs) for Conv2D and Dense, (channels, positions, kh*kw)
    for DepthwiseConv2D."""
    import keras
    import tensorflow as tf

    if isinstance(layer, keras.layers.Dense):
        return np.asarray(x, dtype=np.float64).reshape(-1, int(x.shape[-1]))
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    padding = "SAME" if layer.padding == "same" else "VALID"
    p = tf.image.extract_patches(x, [1, kh, kw, 1], [1, sh, sw, 1], [1, dh, dw, 1], padding).numpy()
    channels = int(x.shape[-1])
    p = p.reshape(-1, kh * kw, channels).astype(np.float64)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        mult = int(layer.kernel.shape[-1])
        p = np.repeat(p, mult, axis=2) if mult > 1 else p
        return p.transpose(2, 0, 1)
    return p.reshape(len(p), kh * kw * channels)


def _covariances(model: Any, layers: list[Any], images: np.ndarray) -> list[np.ndarray | None]:
    """X^T X of each layer's inputs over `images` (per channel for depthwise layers), from the float model."""
    import keras

    covariances: list[np.ndarray | None] = [None] * len(layers)
    wanted = [i for i, layer in enumerate(layers) if _inputs_per_output(layer) <= MAX_INPUTS]
    outputs = [_input_in_top_graph(model, layers[i]) for i in wanted]
    probe = keras.Model(model.inputs, outputs)
    for start in range(0, len(images), BATCH):
        values = probe(np.asarray(images[start:start + BATCH], dtype=np.float32), training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        for i, x in zip(wanted, values, strict=True):
            p = _patches(layers[i], x)
            h = np.einsum("cni,cnj->cij", p, p) if p.ndim == 3 else p.T @ p
            covariances[i] = h if covariances[i] is None else covariances[i] + h
    return covariances


def _input_in_top_graph(model: Any, layer: Any) -> Any:
    """The Keras tensor, in `model`'s own graph, that `layer` reads (through a nested model if it is in one)."""
    import keras

    if layer in model.layers:
        return layer.input
    for sub in model.layers:
        if isinstance(sub, keras.Model) and layer in _weighted(sub):
            # The nested model's input as the top graph feeds it (its first call), then on to the layer.
            fed = sub._inbound_nodes[0].input_tensors
            return keras.Model(sub.inputs, layer.input)(
                fed[0] if len(fed) == 1 else fed)
    raise ValueError(f"layer {layer.name} is not in model {model.name}")


def _inputs_per_output(layer: Any) -> int:
    import keras

    shape = tuple(layer.kernel.shape)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return int(shape[0] * shape[1])
    return int(np.prod(shape[:-1]))


def gptq(rows: np.ndarray, h: np.ndarray, grid: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`rows` (R, d) rounded by `grid` column by column, each column's error compensated on the columns after
    it through the inverse of `h` ((d, d) shared by the rows, or (R, d, d) one per row)."""
    w = rows.astype(np.float64).copy()
    hs = (h[None] if h.ndim == 2 else h).astype(np.float64).copy()
    d = hs.shape[-1]
    diagonal = np.einsum("rii->ri", hs)
    dead = diagonal <= 0  # inputs that are always zero: any value does
    index = np.arange(d)
    hs[:, index, index] += DAMPING * diagonal.mean(axis=1, keepdims=True) + dead
    upper = np.linalg.cholesky(np.linalg.inv(hs)).transpose(0, 2, 1)  # inv(H) = U^T U
    rounded = np.empty_like(w)
    for j in range(d):
        column = w[:, j]
        q = grid(column)
        rounded[:, j] = q
        error = (column - q) / upper[:, j, j]
        w[:, j + 1:] -= error[:, None] * upper[:, j, j + 1:]
    return rounded


def to_float16(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float16).astype(np.float64)


@contextlib.contextmanager
def float16_rounded(model: Any, images: np.ndarray) -> Iterator[None]:
    """Within the block, `model`'s kernels (as a converter folds them) are float16-exact, chosen by `gptq` on
    `images`; the original weights are back afterwards."""
    layers = _weighted(model)
    saved = [layer.kernel.numpy().copy() for layer in layers]
    try:
        covariances = _covariances(model, layers, images)
        for layer, h in zip(layers, covariances, strict=True):
            rows = _rows(layer)
            scale = _bn_scale(layer, rows.shape[0])[:, None]
            folded = rows * scale
            rounded = to_float16(folded) if h is None else gptq(folded, h, to_float16)
            _set_rows(layer, rounded / scale)
        yield
    finally:
        for layer, kernel in zip(layers, saved, strict=True):
            layer.kernel.assign(kernel)
