"""Post-training rounding of a float32 TFLite model's kernels onto float16 or int8, with error compensation
(GPTQ, Frantar et al. 2022), done on the `.tflite` itself.

Rounding each weight to its nearest value independently is not enough for the transfer model: its frozen
MobileNetV2 amplifies small weight errors about 20-60 times by the time they reach the 3x3x1280 features the
Flatten -> Dense head reads (on CIFAR-10 upscaled to 96 px), so nearest rounding to float16 moves 0.7-0.9 % of
top-1 answers, and to int8 far more. Here each kernel is rounded one input column at a time, and the rounding
error of a column is pushed onto the columns not yet rounded, weighted by the inverse of the layer's input
covariance H = X^T X: the layer's *output* error on calibration images is what is minimised, not each weight's.

Everything is read off the float32 `.tflite` the job already exported: its kernels are the folded ones (the
BatchNormalization scale already multiplied in), and each kernel's inputs X are recorded by running that file in
LiteRT on the calibration images (one pass, every intermediate tensor kept). The rounded kernels are stored as
float16 or int8 (per output channel, symmetric) and read through DEQUANTIZE ops, which runtimes evaluate once at
load time; activations and everything else stay float32.

Layers with more inputs per output than `MAX_INPUTS` (the head's 11520 x 128 Dense: its H alone would take 1 GB)
are rounded to nearest: their error averages over many inputs and moves few answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Layers with more inputs per output channel than this are rounded to nearest.
MAX_INPUTS = 4096
#: Dampening of H's diagonal, relative to its mean (GPTQ's default).
DAMPING = 0.01
BATCH = 16
FLOAT16, INT8 = "float16", "int8"
#: Operators whose second input is a kernel: output channels first, except depthwise (last).
_KERNEL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
#: DEQUANTIZE's operator version for each stored type (float16; int8 with one scale per channel).
_DEQUANTIZE_VERSION = {FLOAT16: 3, INT8: 5}


@dataclass
class Kernel:
    """One constant float32 kernel of the model's main graph and the first operator that reads it."""

    op: Any  # schema OperatorT
    kind: str  # one of _KERNEL_OPS
    tensor: int  # index of the kernel tensor in subgraph 0
    weights: np.ndarray  # as stored: [O, kh, kw, I], [1, kh, kw, C*m] or [O, I]

    @property
    def rows(self) -> np.ndarray:
        """(output channels, inputs per output), inputs in the order of `_patches`."""
        w = self.weights.astype(np.float64)
        if self.kind == "DEPTHWISE_CONV_2D":
            return w.reshape(-1, w.shape[3]).T
        return w.reshape(w.shape[0], -1)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.kind == "DEPTHWISE_CONV_2D":
            return rows.T.reshape(self.weights.shape)
        return rows.reshape(self.weights.shape)

    @property
    def inputs_per_output(self) -> int:
        return int(np.prod(self.weights.shape[1:3]) if self.kind == "DEPTHWISE_CONV_2D"
                   else np.prod(self.weights.shape[1:]))


@dataclass
class Rounded:
    """A kernel's rounded values (as rows) and how they are stored; `scale` per output channel for int8."""

    store: str
    rows: np.ndarray
    scale: np.ndarray | None = None


def _schema() -> tuple[Any, Any]:
    from tensorflow.lite.python import schema_py_generated as fb
    from tensorflow.lite.tools import flatbuffer_utils

    return fb, flatbuffer_utils


def _builtin(model: Any, index: int) -> int:
    code = model.operatorCodes[index]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def kernels(model: Any) -> list[Kernel]:
    """The constant float32 kernels of `model` (a schema ModelT), each once, in graph order."""
    fb, _ = _schema()
    names = {getattr(fb.BuiltinOperator, name): name for name in _KERNEL_OPS}
    graph = model.subgraphs[0]
    found: list[Kernel] = []
    seen: set[int] = set()
    for op in graph.operators:
        kind = names.get(_builtin(model, op.opcodeIndex))
        if kind is None or len(op.inputs) < 2 or int(op.inputs[1]) in seen:
            continue
        index = int(op.inputs[1])
        tensor = graph.tensors[index]
        data = model.buffers[tensor.buffer].data
        if tensor.type != fb.TensorType.FLOAT32 or data is None or len(data) == 0:
            continue
        seen.add(index)
        weights = np.frombuffer(bytes(bytearray(data)), dtype=np.float32).reshape(tuple(tensor.shape))
        found.append(Kernel(op=op, kind=kind, tensor=index, weights=weights))
    return found


def _recorded_inputs(content: bytes, found: Sequence[Kernel], images: np.ndarray) -> Iterator[list[np.ndarray]]:
    """Per batch of `images`, the input tensor of each kernel's operator, from LiteRT's reference kernels."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=content, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    detail = interpreter.get_input_details()[0]
    for start in range(0, len(images), BATCH):
        batch = np.asarray(images[start:start + BATCH], dtype=detail["dtype"])
        interpreter.resize_tensor_input(detail["index"], list(batch.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(detail["index"], batch)
        interpreter.invoke()
        yield [np.array(interpreter.get_tensor(int(k.op.inputs[0]))) for k in found]


def _patches(kernel: Kernel, x: np.ndarray) -> np.ndarray | None:
    """`kernel`'s inputs per output: (positions, inputs) for convolutions and dense layers, (channels,
    positions, kh*kw) for depthwise ones; None where the layout is not one this handles (grouped convolution)."""
    import tensorflow as tf

    fb, _ = _schema()
    shape = kernel.weights.shape
    if kernel.kind == "FULLY_CONNECTED":
        return x.reshape(-1, shape[1]).astype(np.float64) if x.size % shape[1] == 0 else None
    channels = int(x.shape[-1])
    if x.ndim != 4 or (kernel.kind == "CONV_2D" and shape[3] != channels):
        return None
    options = kernel.op.builtinOptions
    kh, kw = int(shape[1]), int(shape[2])
    padding = "SAME" if options.padding == fb.Padding.SAME else "VALID"
    p = tf.image.extract_patches(x, [1, kh, kw, 1], [1, options.strideH, options.strideW, 1],
                                 [1, options.dilationHFactor, options.dilationWFactor, 1], padding).numpy()
    p = p.reshape(-1, kh * kw, channels).astype(np.float64)
    if kernel.kind == "DEPTHWISE_CONV_2D":
        multiplier = int(shape[3]) // channels
        p = np.repeat(p, multiplier, axis=2) if multiplier > 1 else p
        return p.transpose(2, 0, 1)
    return p.reshape(len(p), kh * kw * channels)


def covariances(content: bytes, found: Sequence[Kernel], images: np.ndarray) -> list[np.ndarray | None]:
    """X^T X of each kernel's inputs over `images` (per channel for depthwise kernels), from the float model;
    None for kernels rounded to nearest (more than `MAX_INPUTS` inputs per output, or a layout `_patches`
    does not handle)."""
    result: list[np.ndarray | None] = [None] * len(found)
    wanted = [i for i, k in enumerate(found) if k.inputs_per_output <= MAX_INPUTS]
    skipped: set[int] = set()
    for inputs in _recorded_inputs(content, [found[i] for i in wanted], images):
        for i, x in zip(wanted, inputs, strict=True):
            p = None if i in skipped else _patches(found[i], x)
            if p is None:
                skipped.add(i)
                result[i] = None
                continue
            h = np.einsum("cni,cnj->cij", p, p) if p.ndim == 3 else p.T @ p
            result[i] = h if result[i] is None else result[i] + h
    return result


def gptq(rows: np.ndarray, h: np.ndarray, grid: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`rows` (R, d) rounded by `grid` column by column, each column's error compensated on the columns after
    it through the inverse of `h` ((d, d) shared by the rows, or (R, d, d) one per row). `grid` takes a
    column (R,) and returns it rounded."""
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


def int8_steps(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`values` as whole multiples of `scale`, within the symmetric int8 range -127..127 (as float64)."""
    return np.clip(np.round(values / scale), -127, 127)


def rounded(kernel: Kernel, h: np.ndarray | None, store: str) -> Rounded:
    """`kernel` rounded onto `store`'s grid: GPTQ with `h`, or to nearest without one. int8 is symmetric with
    one scale per output channel (its largest magnitude maps to 127)."""
    rows = kernel.rows
    if store == FLOAT16:
        return Rounded(FLOAT16, to_float16(rows) if h is None else gptq(rows, h, to_float16))
    scale = np.abs(rows).max(axis=1) / 127.0
    scale[scale == 0] = 1.0

    def grid(values: np.ndarray) -> np.ndarray:
        s = scale if values.ndim == 1 else scale[:, None]
        return int8_steps(values, s) * s

    return Rounded(INT8, grid(rows) if h is None else gptq(rows, h, grid), scale)


def with_stored_kernels(model: Any, found: Sequence[Kernel], choices: Sequence[Rounded | None]) -> None:
    """Store each kernel of `found` as its choice says (None: float32 as it is), read through a DEQUANTIZE op
    put at the start of the graph; changes `model` (a schema ModelT) in place."""
    fb, _ = _schema()
    graph = model.subgraphs[0]
    dequantize: dict[str, int] = {}
    loads = []
    for kernel, choice in zip(found, choices, strict=True):
        if choice is None:
            continue
        if choice.store not in dequantize:
            code = fb.OperatorCodeT()
            code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.DEQUANTIZE
            code.version = _DEQUANTIZE_VERSION[choice.store]
            model.operatorCodes.append(code)
            dequantize[choice.store] = len(model.operatorCodes) - 1
        tensor = graph.tensors[kernel.tensor]
        stored = fb.TensorT()
        stored.shape, stored.name = list(tensor.shape), (tensor.name or b"") + f"/{choice.store}".encode()
        if choice.store == INT8:
            assert choice.scale is not None
            values = kernel.from_rows(int8_steps(choice.rows, choice.scale[:, None])).astype(np.int8)
            stored.type = fb.TensorType.INT8
            quantization = fb.QuantizationParametersT()
            quantization.scale = [float(s) for s in choice.scale]
            quantization.zeroPoint = [0] * len(choice.scale)
            quantization.quantizedDimension = 3 if kernel.kind == "DEPTHWISE_CONV_2D" else 0
            stored.quantization = quantization
        else:
            values = kernel.from_rows(choice.rows).astype(np.float16)
            stored.type = fb.TensorType.FLOAT16
        buffer = fb.BufferT()
        buffer.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), dtype=np.uint8)
        model.buffers.append(buffer)
        model.buffers[tensor.buffer].data = None
        stored.buffer = len(model.buffers) - 1
        graph.tensors.append(stored)
        load = fb.OperatorT()
        load.opcodeIndex = dequantize[choice.store]
        load.inputs, load.outputs = [len(graph.tensors) - 1], [kernel.tensor]
        loads.append(load)
    graph.operators = loads + list(graph.operators)


def with_uint8_input(model: Any) -> None:
    """The graph's first input taken as uint8 (raw pixels) and cast to the float32 the graph reads; in place."""
    fb, _ = _schema()
    graph = model.subgraphs[0]
    old = int(graph.inputs[0])
    tensor = graph.tensors[old]
    new = fb.TensorT()
    new.shape, new.shapeSignature, new.type = list(tensor.shape), tensor.shapeSignature, fb.TensorType.UINT8
    new.name, new.buffer = tensor.name, 0
    tensor.name = (tensor.name or b"") + b"/float32"
    graph.tensors.append(new)
    index = len(graph.tensors) - 1
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.CAST
    code.version = 1
    model.operatorCodes.append(code)
    options = fb.CastOptionsT()
    options.inDataType, options.outDataType = fb.TensorType.UINT8, fb.TensorType.FLOAT32
    cast = fb.OperatorT()
    cast.opcodeIndex, cast.inputs, cast.outputs = len(model.operatorCodes) - 1, [index], [old]
    cast.builtinOptionsType, cast.builtinOptions = fb.BuiltinOptions.CastOptions, options
    graph.operators = [cast, *graph.operators]
    graph.inputs = [index, *list(graph.inputs)[1:]]
    for signature in model.signatureDefs or []:
        for item in signature.inputs or []:
            if item.tensorIndex == old and item.subgraphIndex in (0, None):
                item.tensorIndex = index


def round_kernels(content: bytes, calibration: np.ndarray, store: Callable[[Sequence[Kernel]], list[str]], *,
                  uint8_input: bool = False) -> bytes:
    """`content` (a float32 TFLite model) with every kernel rounded and stored as `store(kernels)` says (one
    of FLOAT16, INT8 per kernel), error-compensated on the `calibration` images (raw pixels)."""
    _, flatbuffers = _schema()
    model = flatbuffers.convert_bytearray_to_object(bytearray(content))
    found = kernels(model)
    stores = store(found)
    hs = covariances(content, found, calibration)
    with_stored_kernels(model, found, [rounded(k, h, s) for k, h, s in zip(found, hs, stores, strict=True)])
    if uint8_input:
        with_uint8_input(model)
    return bytes(flatbuffers.convert_object_to_bytearray(model))
