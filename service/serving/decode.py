"""Decoding the images of a predict request: image files, base64 strings and nested lists -> arrays.

The pixel work is `worker.imaging` (shared with dataset processing, so training and serving see images
the same way); this module turns its errors into the HTTP side's (400 undecodable, 413 too many pixels).
Runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from service.errors import BadImage, BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from worker import imaging
from worker.imaging import INPUT_SHAPE

RAW_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/bmp", "image/gif", "image/webp"})
SUPPORTED = ("multipart/form-data (file parts named 'file'), application/json ({\"instances\": [...]}), "
             "or a raw image/png or image/jpeg body")


def decode_image(data: bytes, label: str, size: int = imaging.INPUT_SIZE) -> np.ndarray:
    """One image file -> (size, size, 3) uint8 RGB; 400 if undecodable, 413 if it has too many pixels."""
    try:
        return imaging.decode_image(data, label, size)
    except imaging.ImageTooLarge as exc:
        raise PayloadTooLarge(str(exc)) from None
    except imaging.ImageError as exc:
        raise BadImage(str(exc)) from None


def decode_b64(value: str, label: str, size: int = imaging.INPUT_SIZE) -> np.ndarray:
    """A base64 image file (standard or URL-safe alphabet, padding optional) -> (size, size, 3) uint8."""
    text = "".join(value.split())
    if "," in text and text.startswith("data:"):  # a data: URL
        text = text.split(",", 1)[1]
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImage(f"{label}: 'b64' is not valid base64") from exc
    return decode_image(data, label, size)


def nested_list_to_array(value: Sequence[Any], label: str, loc: list[str | int],
                         shape: tuple[int, ...] = INPUT_SHAPE) -> np.ndarray:
    """A HxWx3 nested list of numbers 0..255 (the model's input shape) -> float32 array; anything else is a 422."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = None
    if array is None or array.dtype.kind not in "iuf" or array.shape != shape:
        if array is None or array.dtype.kind == "O":
            got = "a ragged or mixed list"
        elif array.dtype.kind not in "iuf":
            got = {"b": "booleans", "U": "strings", "S": "strings"}.get(array.dtype.kind, "values that are not numbers")
        else:
            got = f"shape {list(array.shape)}"
        raise InvalidInput.at(loc, f"{label} must be a {_dims(shape)} nested list of numbers 0..255 (got {got})")
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 255:
        raise InvalidInput.at(loc, f"{label} has values outside 0..255 (min {low:g}, max {high:g})")
    return array


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


async def read_images(request: Request, max_batch: int, shape: tuple[int, ...] = INPUT_SHAPE) -> np.ndarray:
    """The request's images as a float32 (N, *shape) batch of raw 0..255 RGB, N in 1..max_batch.

    `shape` is the model's input (H, W, 3): image files are resized to it, nested lists must have it.
    """
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return await _read_multipart(request, max_batch, shape[0])
    if media == "application/json" or media.endswith("+json"):
        body = await request.body()
        return await run_in_threadpool(_images_from_json, body, max_batch, shape)
    if media in RAW_IMAGE_TYPES:
        body = await request.body()
        return await run_in_threadpool(_stack, [_decoder(body, "image 0 (the request body)", shape[0])])
    shown = f"{media!r}" if media else "none"
    raise UnsupportedMediaType(f"unsupported content type {shown}: send {SUPPORTED}")


async def _read_multipart(request: Request, max_batch: int, size: int) -> np.ndarray:
    try:
        form = await request.form(max_files=max_batch, max_fields=32, max_part_size=64 * 1024)
    except StarletteHTTPException as exc:
        detail = str(exc.detail)
        if detail.startswith("Too many files"):
            raise PayloadTooLarge(f"too many images: at most {max_batch} per request (TL_MAX_BATCH)") from None
        raise BadRequest(f"malformed multipart body: {detail}") from None
    try:
        parts = form.getlist("file")
        if not parts:
            raise BadRequest("no image: send the images as multipart file parts named 'file'")
        files: list[tuple[str, bytes]] = []
        for index, part in enumerate(parts):
            if not isinstance(part, UploadFile):
                raise BadRequest(f"image {index} (part 'file' #{index}) is a text field, not a file upload")
            name = f"image {index} (part 'file' #{index}" + (f", {part.filename!r})" if part.filename else ")")
            files.append((name, await part.read()))
    finally:
        await form.close()
    return await run_in_threadpool(_stack, [_decoder(data, name, size) for name, data in files])


def _decoder(data: bytes, name: str, size: int) -> Any:
    return lambda: decode_image(data, name, size)


def _stack(decoders: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(decode(), dtype=np.float32) for decode in decoders])


def _images_from_json(body: bytes, max_batch: int, shape: tuple[int, ...]) -> np.ndarray:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(payload, dict) or "instances" not in payload:
        raise InvalidInput.at(["body"], "expected an object {\"instances\": [...]}")
    unknown = sorted(set(payload) - {"instances"})
    if unknown:
        raise InvalidInput.at(["body", unknown[0]], f"unknown field(s): {', '.join(map(repr, unknown))}")
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise InvalidInput.at(["body", "instances"], "'instances' must be a non-empty list")
    if len(instances) > max_batch:
        raise PayloadTooLarge(f"too many images: {len(instances)}, at most {max_batch} per request (TL_MAX_BATCH)")
    arrays = []
    for index, instance in enumerate(instances):
        loc: list[str | int] = ["body", "instances", index]
        label = f"image {index} (instances[{index}])"
        if isinstance(instance, dict):
            if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
                raise InvalidInput.at(loc, f"{label} must be {{\"b64\": \"<base64 of an image file>\"}}")
            arrays.append(decode_b64(instance["b64"], label, shape[0]).astype(np.float32))
        elif isinstance(instance, list):
            arrays.append(nested_list_to_array(instance, label, loc, shape))
        else:
            raise InvalidInput.at(
                loc, f"{label} must be {{\"b64\": ...}} or a {_dims(shape)} nested list of numbers 0..255")
    return np.stack(arrays)
