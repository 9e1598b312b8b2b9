"""The standard protocols' request and response bodies <-> arrays: Open Inference Protocol (KServe v2 / Triton)
tensors, with its binary tensor data extension, and TensorFlow Serving's `instances` / `inputs`.

Only the wire formats live here; the images go on through the one serving path (`decode`'s image decoding,
the model's batcher, `encode.rank_predictions`). Every function here is plain CPU work: call it in a worker
thread, never on the event loop. Errors are the service's own (400 a body that breaks the protocol, 413 too
many images or pixels, 422 a nested list of the wrong shape); the protocol routes turn them into `{"error"}`.

Open Inference Protocol, as served:
- inputs: one tensor, `image` (UINT8 [N, H, W, 3], any H x W: resized to the model's input like every predict
  input) or `image_bytes` (BYTES [N], each an encoded image file: raw in binary form, base64 in JSON);
- outputs: `probabilities` (FP32 [N, C]) and `label` (BYTES [N], the top-1 class name), or those requested;
  `parameters: {"classification": k}` on `probabilities` answers Triton's classification strings instead
  (BYTES [N, k], `"<score>:<index>:<label>"`, the score printed like C++ `std::to_string(float)`: 6 decimals);
- binary tensor data: a request body is the JSON header (`Inference-Header-Content-Length` bytes) followed by
  the inputs that carry `binary_data_size`, in input order; outputs are binary when their `binary_data`
  parameter says so, else as the request's `binary_data_output` says (default JSON). BYTES elements are each
  a 4-byte little-endian length and the bytes (Triton's serialization).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from service.errors import BadRequest, PayloadTooLarge
from service.serving.decode import (
    PixelLimits,
    b64_bytes,
    check_pixels,
    decode_image,
    nested_list_to_array,
    refuse_oversized_json,
)
from service.serving.encode import rank_predictions
from worker import imaging

IMAGE_INPUT = "image"
IMAGE_BYTES_INPUT = "image_bytes"
PROBABILITIES_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
OUTPUTS = (PROBABILITIES_OUTPUT, LABEL_OUTPUT)
#: Every datatype of the protocol, so a wrong one is named as wrong rather than as unknown.
DATATYPES = frozenset({"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                       "FP16", "FP32", "FP64", "BF16", "BYTES"})
_LENGTH = struct.Struct("<I")


@dataclass
class RequestedOutput:
    """One output the client asked for: binary or JSON, and `classification` top-k strings (0: the tensor)."""

    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    """An `infer` request read up to its pixels: its one input tensor (header, and its binary data when sent
    so), and what to answer; `request_images` does the pixel work."""

    id: str | None
    tensor: dict[str, Any]
    chunk: bytes | None
    outputs: list[RequestedOutput] = field(default_factory=list)

    def at_model_size(self, shape: tuple[int, ...]) -> bool:
        """UINT8 images already at the model's input size: their decoding is a copy (no resizing, no files)."""
        dims = self.tensor["shape"]
        return (self.tensor["name"] == IMAGE_INPUT and self.tensor["datatype"] == "UINT8" and len(dims) == 4
                and tuple(dims[1:]) == tuple(shape))


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]
    binary: bool


# ----- Open Inference Protocol: requests -----

def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """An `infer` body (JSON, or JSON + binary tensors after `header_length` bytes) -> its checked header, its
    one input and the outputs to answer (400 for anything the protocol does not allow)."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not 0 < header_length <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} "
                             "bytes")
        header, binary = body[:header_length], body[header_length:]
    try:
        payload = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError):
        where = "the request body" if header_length is None else "the JSON header of the request"
        raise BadRequest(f"{where} is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request must be a JSON object with 'inputs'")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    parameters = _parameters(payload.get("parameters"), "the request")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    tensors = [_tensor_header(tensor, index) for index, tensor in enumerate(inputs)]
    chunks = _binary_chunks(tensors, binary)
    if len(tensors) != 1:
        names = ", ".join(repr(t["name"]) for t in tensors)
        raise BadRequest(f"expected one input, {IMAGE_INPUT!r} or {IMAGE_BYTES_INPUT!r}; got {len(tensors)} ({names})")
    tensor = tensors[0]
    if tensor["name"] not in (IMAGE_INPUT, IMAGE_BYTES_INPUT):
        raise BadRequest(f"unexpected input {tensor['name']!r}: the model takes {IMAGE_INPUT!r} (UINT8 "
                         f"[N, H, W, 3]) or {IMAGE_BYTES_INPUT!r} (BYTES [N], encoded image files)")
    binary_default = _flag(parameters.get("binary_data_output", False), "binary_data_output")
    return InferRequest(request_id, tensor, chunks[0], _requested_outputs(payload.get("outputs"), binary_default))


def request_images(request: InferRequest, max_batch: int, shape: tuple[int, ...],
                   limits: PixelLimits | None = None) -> np.ndarray:
    """The request's images as the model's float32 (N, *shape) batch: UINT8 tensors resized to the model's
    input, image files decoded at it (after their headers passed `limits`); at most `max_batch` images (413)."""
    if request.tensor["name"] == IMAGE_INPUT:
        return _image_tensor(request.tensor, request.chunk, max_batch, shape)
    return _image_bytes_tensor(request.tensor, request.chunk, max_batch, shape, limits or PixelLimits())


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"'parameters' of {what} must be an object")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {name!r} must be true or false")
    return value


def _tensor_header(tensor: Any, index: int) -> dict[str, Any]:
    """The checked header of input `index`: name, datatype, shape, parameters (and `data` when JSON)."""
    if not isinstance(tensor, dict):
        raise BadRequest(f"inputs[{index}] must be an object with 'name', 'datatype', 'shape' and 'data'")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}] has no 'name'")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"input {name!r}: 'datatype' must be one of the protocol's types (got {datatype!r})")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or any(d < 0 for d in shape)):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers (got {shape!r})")
    parameters = _parameters(tensor.get("parameters"), f"input {name!r}")
    if "shared_memory_region" in parameters:
        raise BadRequest(f"input {name!r}: shared memory is not supported over HTTP here; send the data")
    size = parameters.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise BadRequest(f"input {name!r}: 'binary_data_size' must be a non-negative integer")
    if size is None and "data" not in tensor:
        raise BadRequest(f"input {name!r} has neither 'data' nor a 'binary_data_size' parameter")
    if size is not None and "data" in tensor:
        raise BadRequest(f"input {name!r} has both 'data' and a 'binary_data_size' parameter")
    return {"name": name, "datatype": datatype, "shape": shape, "binary_size": size, "data": tensor.get("data")}


def _binary_chunks(tensors: list[dict[str, Any]], binary: bytes) -> list[bytes | None]:
    """Each input's binary data (None for JSON data), cut from the bytes after the header in input order."""
    declared = sum(t["binary_size"] or 0 for t in tensors)
    if declared != len(binary):
        raise BadRequest(f"the inputs' binary_data_size add up to {declared} bytes but {len(binary)} bytes follow "
                         "the JSON header (Inference-Header-Content-Length)")
    chunks: list[bytes | None] = []
    offset = 0
    for tensor in tensors:
        size = tensor["binary_size"]
        if size is None:
            chunks.append(None)
            continue
        chunks.append(binary[offset:offset + size])
        offset += size
    return chunks


def _batch_size(tensor: dict[str, Any], max_batch: int) -> int:
    count = tensor["shape"][0]
    if count < 1:
        raise BadRequest(f"input {tensor['name']!r}: the batch dimension is 0; send at least one image")
    if count > max_batch:
        raise PayloadTooLarge(f"too many images: {count}, at most {max_batch} per request (TL_MAX_BATCH)")
    return int(count)


def _image_tensor(tensor: dict[str, Any], chunk: bytes | None, max_batch: int, shape: tuple[int, ...]) -> np.ndarray:
    """`image`: UINT8 [N, H, W, 3] of any H x W -> float32 (N, *shape)."""
    dims = tensor["shape"]
    if tensor["datatype"] != "UINT8":
        raise BadRequest(f"input {IMAGE_INPUT!r} must be UINT8 (got {tensor['datatype']})")
    if len(dims) != 4 or dims[3] != 3 or dims[1] < 1 or dims[2] < 1:
        raise BadRequest(f"input {IMAGE_INPUT!r} must have shape [N, H, W, 3] (RGB, any H x W; the model takes "
                         f"{shape[0]}x{shape[1]}); got {dims}")
    count = _batch_size(tensor, max_batch)
    height, width = int(dims[1]), int(dims[2])
    if height * width > imaging.MAX_PIXELS:
        raise PayloadTooLarge(f"input {IMAGE_INPUT!r}: {width}x{height} images are too large, at most "
                              f"{imaging.MAX_PIXELS} pixels each")
    elements = count * height * width * 3
    if chunk is not None:
        if len(chunk) != elements:
            raise BadRequest(f"input {IMAGE_INPUT!r}: shape {dims} needs {elements} bytes of UINT8 data, "
                             f"binary_data_size is {len(chunk)}")
        pixels = np.frombuffer(chunk, dtype=np.uint8)
    else:
        pixels = _json_uint8(tensor["data"], elements, dims)
    pixels = pixels.reshape(count, height, width, 3)
    if (height, width) == tuple(shape[:2]):
        return pixels.astype(np.float32)
    return np.stack([_resized(image, shape) for image in pixels])


def _json_uint8(data: Any, elements: int, dims: list[int]) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"input {IMAGE_INPUT!r}: 'data' must be a list of numbers 0..255")
    try:
        values = np.asarray(data)
    except ValueError:
        raise BadRequest(f"input {IMAGE_INPUT!r}: 'data' is a ragged list") from None
    if values.size != elements:
        raise BadRequest(f"input {IMAGE_INPUT!r}: shape {dims} has {elements} elements, 'data' has {values.size}")
    if values.dtype.kind not in "iu":
        raise BadRequest(f"input {IMAGE_INPUT!r}: UINT8 'data' must be integers 0..255")
    if values.size and (int(values.min()) < 0 or int(values.max()) > 255):
        raise BadRequest(f"input {IMAGE_INPUT!r}: UINT8 values must be 0..255 (got {int(values.min())}.."
                         f"{int(values.max())})")
    return values.astype(np.uint8).ravel()


def _resized(pixels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One RGB image to the model's size, resampled exactly as predict resizes a decoded image file."""
    image = imaging.resize(Image.fromarray(pixels, mode="RGB"), int(shape[0]))
    return np.asarray(image, dtype=np.float32)


def _image_bytes_tensor(tensor: dict[str, Any], chunk: bytes | None, max_batch: int,
                        shape: tuple[int, ...], limits: PixelLimits) -> np.ndarray:
    """`image_bytes`: BYTES [N] (or [N, 1]) of encoded image files -> float32 (N, *shape)."""
    dims = tensor["shape"]
    if tensor["datatype"] != "BYTES":
        raise BadRequest(f"input {IMAGE_BYTES_INPUT!r} must be BYTES (got {tensor['datatype']})")
    if not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)):
        raise BadRequest(f"input {IMAGE_BYTES_INPUT!r} must have shape [N] (one encoded image each); got {dims}")
    count = _batch_size(tensor, max_batch)
    size = int(shape[0])
    if chunk is not None:
        files = deserialize_bytes(chunk, f"input {IMAGE_BYTES_INPUT!r}")
        if len(files) != count:
            raise BadRequest(f"input {IMAGE_BYTES_INPUT!r}: shape {dims} has {count} elements, the binary data "
                             f"holds {len(files)}")
    else:
        elements = _flatten(tensor["data"])
        if len(elements) != count:
            raise BadRequest(f"input {IMAGE_BYTES_INPUT!r}: shape {dims} has {count} elements, 'data' has "
                             f"{len(elements)}")
        files = [_json_image_bytes(element, i) for i, element in enumerate(elements)]
    labelled = [(_label(i), data) for i, data in enumerate(files)]
    check_pixels(labelled, limits)  # from the headers, before any image is decoded
    arrays = [decode_image(data, label, size, max_pixels=limits.per_image) for label, data in labelled]
    return np.stack(arrays).astype(np.float32)


def _label(index: int) -> str:
    return f"image {index} ({IMAGE_BYTES_INPUT}[{index}])"


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise BadRequest(f"input {IMAGE_BYTES_INPUT!r}: 'data' must be a list of base64 strings")
    out: list[Any] = []
    for element in data:
        out.extend(_flatten(element) if isinstance(element, list) else [element])
    return out


def _json_image_bytes(element: Any, index: int) -> bytes:
    """A BYTES element in JSON: the base64 of an image file (JSON cannot hold raw bytes), or {"b64": ...}."""
    if isinstance(element, dict) and set(element) == {"b64"}:
        element = element["b64"]
    if not isinstance(element, str):
        raise BadRequest(f"{_label(index)} must be a base64 string of an image file")
    return b64_bytes(element, _label(index))


def deserialize_bytes(data: bytes, what: str) -> list[bytes]:
    """Triton's BYTES serialization (each element: 4-byte little-endian length, then the bytes) -> elements."""
    out: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise BadRequest(f"{what}: BYTES data ends inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise BadRequest(f"{what}: a BYTES element of {length} bytes runs past the end of the data")
        out.append(data[offset:offset + length])
        offset += length
    return out


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """Elements -> Triton's BYTES serialization."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def _requested_outputs(value: Any, binary_default: bool) -> list[RequestedOutput]:
    if value is None:
        return [RequestedOutput(name, binary_default) for name in OUTPUTS]
    if not isinstance(value, list) or not value:
        raise BadRequest("'outputs' must be a non-empty list of {\"name\": ...} (or absent for every output)")
    outputs: list[RequestedOutput] = []
    for index, output in enumerate(value):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise BadRequest(f"outputs[{index}] must be an object with a 'name'")
        name = output["name"]
        if name not in OUTPUTS:
            raise BadRequest(f"unexpected output {name!r}: the model answers {PROBABILITIES_OUTPUT!r} "
                             f"(FP32 [N, C]) and {LABEL_OUTPUT!r} (BYTES [N])")
        parameters = _parameters(output.get("parameters"), f"output {name!r}")
        if "shared_memory_region" in parameters:
            raise BadRequest(f"output {name!r}: shared memory is not supported over HTTP here")
        binary = _flag(parameters.get("binary_data", binary_default), "binary_data")
        classification = parameters.get("classification", 0)
        if not isinstance(classification, int) or isinstance(classification, bool) or classification < 0:
            raise BadRequest(f"output {name!r}: 'classification' must be a positive integer (the top k)")
        if classification and name != PROBABILITIES_OUTPUT:
            raise BadRequest(f"output {name!r}: classification applies to {PROBABILITIES_OUTPUT!r} only")
        if any(o.name == name for o in outputs):
            raise BadRequest(f"output {name!r} is requested twice")
        outputs.append(RequestedOutput(name, binary, classification))
    return outputs


# ----- Open Inference Protocol: responses -----

def infer_outputs(probs: np.ndarray, classes: list[str], requested: list[RequestedOutput]) -> list[OutputTensor]:
    """The requested outputs of a batch's probabilities, ranked by the same `rank_predictions` as `/v1`."""
    count, n_classes = probs.shape
    top = max([o.classification for o in requested] + [1])
    ranked = rank_predictions(probs, classes, top, False)
    out: list[OutputTensor] = []
    for output in requested:
        if output.name == LABEL_OUTPUT:
            labels = [p["label"].encode() for p in ranked]
            out.append(OutputTensor(LABEL_OUTPUT, "BYTES", [count], labels, output.binary))
        elif output.classification:
            k = min(output.classification, n_classes)
            strings = [f"{c['probability']:.6f}:{c['class_index']}:{c['label']}".encode()
                       for p in ranked for c in p["top_k"][:k]]
            out.append(OutputTensor(PROBABILITIES_OUTPUT, "BYTES", [count, k], strings, output.binary))
        else:
            values = np.ascontiguousarray(probs, dtype=np.float32)
            out.append(OutputTensor(PROBABILITIES_OUTPUT, "FP32", [count, n_classes], values, output.binary))
    return out


def encode_infer_response(model_name: str, model_version: str, request_id: str | None,
                          outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in outputs:
        tensor: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        values = output.values
        if output.binary:
            blob = values.astype("<f4").tobytes() if isinstance(values, np.ndarray) else serialize_bytes(values)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif isinstance(values, np.ndarray):
            tensor["data"] = values.ravel().tolist()
        else:
            tensor["data"] = [value.decode() for value in values]
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = tensors
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


# ----- TensorFlow Serving REST -----

#: Names a TF Serving row may give its one input, and the signature it may name.
TFS_INPUT_NAMES = frozenset({IMAGE_INPUT, IMAGE_BYTES_INPUT, "images", "input"})
TFS_SIGNATURES = frozenset({"serving_default", "predict"})


def parse_tfserving_request(body: bytes, max_batch: int, shape: tuple[int, ...],
                            limits: PixelLimits | None = None) -> tuple[np.ndarray, bool]:
    """A TF Serving predict body -> the model's float32 batch, and whether it was the columnar (`inputs`) form.

    Row form `{"instances": [...]}`, columnar `{"inputs": [...]}` or `{"inputs": {"image": [...]}}`; each
    instance an H x W x 3 nested list of 0..255 (the model's size), `{"b64": "<image file>"}`, or either under
    the input's name (`{"image": ...}`). A body with more values than `max_batch` such images is refused
    before it is parsed, and image files' headers are checked against `limits` before any is decoded."""
    refuse_oversized_json(body, max_batch, shape)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("expected a JSON object {\"instances\": [...]} or {\"inputs\": ...}")
    unknown = sorted(set(payload) - {"instances", "inputs", "signature_name"})
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(map(repr, unknown))}")
    signature = payload.get("signature_name", "serving_default")
    if signature not in TFS_SIGNATURES:
        raise BadRequest(f"unknown signature_name {signature!r}: the model has 'serving_default'")
    if ("instances" in payload) == ("inputs" in payload):
        raise BadRequest("send exactly one of 'instances' (row format) or 'inputs' (columnar format)")
    columnar = "inputs" in payload
    instances = payload["inputs"] if columnar else payload["instances"]
    key = "inputs" if columnar else "instances"
    if columnar and isinstance(instances, dict):
        if len(instances) != 1 or next(iter(instances)) not in TFS_INPUT_NAMES:
            raise BadRequest(f"'inputs' names one input, {IMAGE_INPUT!r}: {{\"inputs\": {{\"image\": [...]}}}}")
        key = f"inputs.{next(iter(instances))}"
        instances = next(iter(instances.values()))
    if not isinstance(instances, list) or not instances:
        raise BadRequest(f"'{key}' must be a non-empty list of images")
    if len(instances) > max_batch:
        raise PayloadTooLarge(f"too many images: {len(instances)}, at most {max_batch} per request (TL_MAX_BATCH)")
    rows = [_tfs_instance(instance, f"{key}[{index}]", shape) for index, instance in enumerate(instances)]
    limits = limits or PixelLimits()
    check_pixels([(label, row) for label, row in rows if isinstance(row, bytes)], limits)
    arrays = [decode_image(row, label, int(shape[0]), max_pixels=limits.per_image).astype(np.float32)
              if isinstance(row, bytes) else row for label, row in rows]
    return np.stack(arrays), columnar


def _tfs_instance(instance: Any, where: str, shape: tuple[int, ...]) -> tuple[str, np.ndarray | bytes]:
    """One instance: its label, and its pixels (a nested list) or its image file (b64, decoded later)."""
    label = f"image {where}"
    if isinstance(instance, dict) and len(instance) == 1 and next(iter(instance)) in TFS_INPUT_NAMES:
        instance = next(iter(instance.values()))  # a row with its input named
    if isinstance(instance, dict):
        if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise BadRequest(f"{label} must be {{\"b64\": \"<base64 of an image file>\"}} or a "
                             f"{'x'.join(map(str, shape))} nested list of numbers 0..255")
        return label, b64_bytes(instance["b64"], label)
    if isinstance(instance, list):
        return label, nested_list_to_array(instance, label, [where], shape)
    raise BadRequest(f"{label} must be a {'x'.join(map(str, shape))} nested list of numbers 0..255 or "
                     "{\"b64\": \"<base64 of an image file>\"}")


def tfserving_body(probs: np.ndarray, columnar: bool) -> bytes:
    """`{"predictions": [[p0..pC-1], ...]}` (row form) or `{"outputs": ...}` (columnar form)."""
    key = "outputs" if columnar else "predictions"
    return json.dumps({key: probs.tolist()}, separators=(",", ":")).encode()

