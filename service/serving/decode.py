"""Decoding the images of a predict request: image files, base64 strings and nested lists -> arrays.

The pixel work is `worker.imaging` (shared with dataset processing, so training and serving see images
the same way); this module turns its errors into the HTTP side's (400 undecodable, 413 too many pixels).
The pixel work runs in a worker thread, except for a request of a few small images (`INLINE_DECODE_FILES`
files of at most `INLINE_DECODE_PIXELS` declared pixels together in `INLINE_DECODE_BYTES`, a JSON body of at
most that many bytes): decoding those on the event loop costs less than the hand-off to a thread and back.

Pixel bombs (a few KB of PNG that declare 40 megapixels) cost CPU and memory by the pixel, not by the byte,
so pixels are bounded from the headers before anything is decoded: per image (`TL_MAX_IMAGE_PIXELS`) and
for all images of a request together (`TL_MAX_REQUEST_PIXELS`), both 413. Large images (over
`BIG_IMAGE_PIXELS`) are decoded by a few threads of their own (`BIG_DECODER`), whatever the number of
requests: they queue for the CPU instead of each holding its decoded pixels, and only those threads' malloc
arenas ever hold such images (the allocator keeps each thread's freed memory for that thread to reuse).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
#: The defaults of TL_MAX_IMAGE_PIXELS and TL_MAX_REQUEST_PIXELS.
MAX_IMAGE_PIXELS = 16_000_000
MAX_REQUEST_PIXELS = 64_000_000
#: Images above this many pixels are decoded by `BIG_DECODER`'s threads, at most that many at a time.
BIG_IMAGE_PIXELS = 2_000_000
BIG_DECODER = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="tl-decode")
#: A request of at most this many image files, this many bytes (of files, or of JSON body) and this many declared
#: pixels together is decoded on the event loop (a 32x32 PNG: about 0.1 ms; a thread hand-off costs more).
INLINE_DECODE_FILES = 4
INLINE_DECODE_BYTES = 16 * 1024
INLINE_DECODE_PIXELS = 64 * 64


@dataclass(frozen=True)
class PixelLimits:
    """Pixels one image, and all images of one request together, may declare (from their headers)."""

    per_image: int = MAX_IMAGE_PIXELS
    per_request: int = MAX_REQUEST_PIXELS

    @classmethod
    def of(cls, settings: Any) -> PixelLimits:
        """The limits `TL_MAX_IMAGE_PIXELS` and `TL_MAX_REQUEST_PIXELS` set."""
        return cls(per_image=settings.max_image_pixels, per_request=settings.max_request_pixels)


def decode_image(data: bytes, label: str, size: int = imaging.INPUT_SIZE, *,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """One image file -> (size, size, 3) uint8 RGB; 400 if undecodable, 413 if it has too many pixels."""
    pixels = imaging.declared_pixels(data) or 0
    if pixels > max_pixels:
        raise PayloadTooLarge(_image_too_large(label, pixels, max_pixels))
    return _decode(data, label, size, max_pixels, big=pixels > BIG_IMAGE_PIXELS)


def _decode(data: bytes, label: str, size: int, max_pixels: int, *, big: bool = False) -> np.ndarray:
    """`decode_image` once the header was read: `big` images go to `BIG_DECODER`."""
    try:
        if big:  # called in a worker thread already: waiting here blocks no event loop
            return BIG_DECODER.submit(imaging.decode_image, data, label, size, max_pixels=max_pixels).result()
        return imaging.decode_image(data, label, size, max_pixels=max_pixels)
    except imaging.ImageTooLarge as exc:
        raise PayloadTooLarge(f"{exc} (TL_MAX_IMAGE_PIXELS)") from None
    except imaging.ImageError as exc:
        raise BadImage(str(exc)) from None


def _image_too_large(label: str, pixels: int, limit: int) -> str:
    return f"{label} is too large: {pixels} pixels, at most {limit} are accepted per image (TL_MAX_IMAGE_PIXELS)"


def check_pixels(files: Sequence[tuple[str, bytes]], limits: PixelLimits) -> int:
    """413 when one image, or all of them together, declare more pixels than `limits` allow; read from the
    headers alone, before any image is decoded (an unreadable file counts nothing: decoding says why).
    Returns the pixels they declare together."""
    total = 0
    for label, data in files:
        pixels = imaging.declared_pixels(data) or 0
        if pixels > limits.per_image:
            raise PayloadTooLarge(_image_too_large(label, pixels, limits.per_image))
        total += pixels
        if total > limits.per_request:
            raise PayloadTooLarge(f"too many pixels in one request: its images declare more than {limits.per_request}"
                                  f" together (TL_MAX_REQUEST_PIXELS; {len(files)} images, {label} passes it); "
                                  "send smaller images or fewer per request")
    return total


def decode_b64(value: str, label: str, size: int = imaging.INPUT_SIZE, *,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A base64 image file (standard or URL-safe alphabet, padding optional) -> (size, size, 3) uint8."""
    return decode_image(b64_bytes(value, label), label, size, max_pixels=max_pixels)


def b64_bytes(value: str, label: str) -> bytes:
    """The file a base64 string holds (standard or URL-safe alphabet, padding optional, or a data: URL)."""
    text = "".join(value.split())
    if "," in text and text.startswith("data:"):  # a data: URL
        text = text.split(",", 1)[1]
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImage(f"{label}: 'b64' is not valid base64") from exc


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


async def read_images(request: Request, max_batch: int, shape: tuple[int, ...] = INPUT_SHAPE,
                      limits: PixelLimits | None = None) -> np.ndarray:
    """The request's images as a float32 (N, *shape) batch of raw 0..255 RGB, N in 1..max_batch.

    `shape` is the model's input (H, W, 3): image files are resized to it, nested lists must have it.
    `limits` bound the pixels the image files declare (413), checked before any is decoded.
    """
    limits = limits or PixelLimits()
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return await _read_multipart(request, max_batch, shape[0], limits)
    if media == "application/json" or media.endswith("+json"):
        body = await request.body()
        if len(body) > INLINE_DECODE_BYTES:
            return await run_in_threadpool(_images_from_json, body, max_batch, shape, limits)
        items = _json_items(body, max_batch, shape)  # a small body: parsed here
        files = [item for item in items if isinstance(item, tuple)]
        if _small(files, limits):
            return _stack_items(items, shape, limits)
        return await run_in_threadpool(_stack_items, items, shape, limits)
    if media in RAW_IMAGE_TYPES:
        body = await request.body()
        return await decode_files([("image 0 (the request body)", body)], shape[0], limits)
    shown = f"{media!r}" if media else "none"
    raise UnsupportedMediaType(f"unsupported content type {shown}: send {SUPPORTED}")


async def decode_files(files: list[tuple[str, bytes]], size: int, limits: PixelLimits) -> np.ndarray:
    """Image files -> a float32 (N, size, size, 3) batch, their pixels checked against `limits` first; a few
    small files are decoded here on the event loop, the rest in a worker thread."""
    if _small(files, limits):  # their headers were read: at most INLINE_DECODE_PIXELS, none is big
        return np.stack([_decode(data, label, size, limits.per_image).astype(np.float32) for label, data in files])
    return await run_in_threadpool(_decode_files, files, size, limits)


def _small(files: list[tuple[str, bytes]], limits: PixelLimits) -> bool:
    """Whether `files` are few and small enough to decode on the event loop: checks their declared pixels
    against `limits` (413) when they are few and small in bytes (reading a header costs microseconds)."""
    if len(files) > INLINE_DECODE_FILES or sum(len(data) for _, data in files) > INLINE_DECODE_BYTES:
        return False
    return check_pixels(files, limits) <= INLINE_DECODE_PIXELS


def _decode_files(files: list[tuple[str, bytes]], size: int, limits: PixelLimits) -> np.ndarray:
    check_pixels(files, limits)
    return np.stack([decode_image(data, label, size, max_pixels=limits.per_image).astype(np.float32)
                     for label, data in files])


async def _read_multipart(request: Request, max_batch: int, size: int, limits: PixelLimits) -> np.ndarray:
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
    return await decode_files(files, size, limits)


def refuse_oversized_json(body: bytes, max_batch: int, shape: tuple[int, ...]) -> None:
    """413 before parsing a JSON body with more separators than `max_batch` nested lists of `shape` have: a
    10 MiB body of nested lists is about 120 MB of Python objects and half a second holding the GIL to parse,
    counting its commas a few milliseconds. Every value but the first of a list or object needs a comma, so
    this bounds what parsing can build (base64 strings hold none; a data: URL one; deeper nesting than the
    interpreter's recursion limit fails at once)."""
    height, width = int(shape[0]), int(shape[1])
    channels = int(shape[2]) if len(shape) > 2 else 1
    commas = height * width * channels  # between the numbers, the pixels and the rows, and after the image
    if body.count(b",") > max_batch * (commas + 2) + 8:
        raise PayloadTooLarge(f"too many images: the body holds more values than {max_batch} images of "
                              f"{_dims(shape)} (at most {max_batch} per request, TL_MAX_BATCH)")


def _images_from_json(body: bytes, max_batch: int, shape: tuple[int, ...], limits: PixelLimits) -> np.ndarray:
    return _stack_items(_json_items(body, max_batch, shape), shape, limits)


def _json_items(body: bytes, max_batch: int, shape: tuple[int, ...]) -> list[np.ndarray | tuple[str, bytes]]:
    """The instances of a JSON body: nested lists as arrays, image files (base64) as (label, bytes) still to
    decode."""
    refuse_oversized_json(body, max_batch, shape)
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
    items: list[np.ndarray | tuple[str, bytes]] = []  # arrays, or image files still to decode
    for index, instance in enumerate(instances):
        loc: list[str | int] = ["body", "instances", index]
        label = f"image {index} (instances[{index}])"
        if isinstance(instance, dict):
            if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
                raise InvalidInput.at(loc, f"{label} must be {{\"b64\": \"<base64 of an image file>\"}}")
            items.append((label, b64_bytes(instance["b64"], label)))
        elif isinstance(instance, list):
            items.append(nested_list_to_array(instance, label, loc, shape))
        else:
            raise InvalidInput.at(
                loc, f"{label} must be {{\"b64\": ...}} or a {_dims(shape)} nested list of numbers 0..255")
    return items


def _stack_items(items: list[np.ndarray | tuple[str, bytes]], shape: tuple[int, ...],
                 limits: PixelLimits) -> np.ndarray:
    """The batch of a JSON body's instances, its image files' pixels checked against `limits` first."""
    check_pixels([item for item in items if isinstance(item, tuple)], limits)
    return np.stack([item if isinstance(item, np.ndarray)
                     else decode_image(item[1], item[0], shape[0], max_pixels=limits.per_image).astype(np.float32)
                     for item in items])
