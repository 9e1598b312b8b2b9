"""Prediction: read the images of a request (multipart, JSON or a raw image), batch them, classify.

Bodies are read by hand rather than through FastAPI's body parameters, because one route takes
four shapes of body; the OpenAPI schema documents them all (`PREDICT_REQUEST_BODY`). Decoding runs
in a worker thread; the model runs in the micro-batcher (service.inference).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.deps import ServicesDep, SettingsDep
from service.errors import (
    BadRequest,
    InvalidInput,
    ModelNotFound,
    NoModelYet,
    PayloadTooLarge,
    UnsupportedMediaType,
    problem_responses,
)
from service.images import decode_b64, decode_image, nested_list_to_array
from service.inference import rank_predictions
from service.routes.models import resolve_model
from service.schemas import PREDICT_REQUEST_BODY, PredictResponse
from worker.store import ModelStore

router = APIRouter(prefix="/v1", tags=["predict"])

RAW_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/bmp", "image/gif", "image/webp"})
SUPPORTED = ("multipart/form-data (file parts named 'file'), application/json ({\"instances\": [...]}), "
             "or a raw image/png or image/jpeg body")
DEFAULT_ALIAS = "default"

TopK = Annotated[int, Query(ge=1, le=10, description="how many classes to rank per image")]
WithProbabilities = Annotated[bool, Query(description="also return all class probabilities")]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "one prediction per image, in request order"},
    **problem_responses(400, 401, 404, 413, 415, 422, 500, 503),
}


@router.post("/models/{ref}/predict", response_model=PredictResponse, response_model_exclude_none=True,
             openapi_extra=PREDICT_REQUEST_BODY, responses=_RESPONSES)
async def predict_with_model(ref: str, request: Request, services: ServicesDep, settings: SettingsDep,
                             top_k: TopK = 3, probabilities: WithProbabilities = False) -> PredictResponse:
    """Classify images with a model named by id, alias or `latest`."""
    model_id = await _resolve_or_explain(services.models, ref)
    return await _predict(request, services, model_id, settings.max_batch, top_k, probabilities)


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
             openapi_extra=PREDICT_REQUEST_BODY, responses=_RESPONSES)
async def predict_default(request: Request, services: ServicesDep, settings: SettingsDep, top_k: TopK = 3,
                          probabilities: WithProbabilities = False) -> PredictResponse:
    """Classify images with the `default` alias's model, or the newest model when no default is set."""
    store = services.models
    try:
        model_id = await resolve_model(store, DEFAULT_ALIAS)
    except ModelNotFound:
        model_id = await _resolve_or_explain(store, "latest")
    return await _predict(request, services, model_id, settings.max_batch, top_k, probabilities)


async def _resolve_or_explain(store: ModelStore, ref: str) -> str:
    try:
        return await resolve_model(store, ref)
    except ModelNotFound:
        if not await run_in_threadpool(store.list_ids):
            raise NoModelYet() from None
        raise


async def _predict(request: Request, services: ServicesDep, model_id: str, max_batch: int, k: int,
                   with_probabilities: bool) -> PredictResponse:
    entry = await services.cache.get(model_id)  # loaded (once) before the body is read
    with entry.batcher.incoming():
        images = await read_images(request, max_batch)
    probs = await entry.batcher.predict(images)
    services.metrics.predictions.inc(len(images))
    return PredictResponse.model_validate(
        {"model_id": model_id, "predictions": rank_predictions(probs, entry.classes, k, with_probabilities)})


async def read_images(request: Request, max_batch: int) -> np.ndarray:
    """The request's images as a float32 (N, 32, 32, 3) batch of raw 0..255 RGB, N in 1..max_batch."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return await _read_multipart(request, max_batch)
    if media == "application/json" or media.endswith("+json"):
        body = await request.body()
        return await run_in_threadpool(_images_from_json, body, max_batch)
    if media in RAW_IMAGE_TYPES:
        body = await request.body()
        return await run_in_threadpool(_stack, [lambda: decode_image(body, "image 0 (the request body)")])
    shown = f"{media!r}" if media else "none"
    raise UnsupportedMediaType(f"unsupported content type {shown}: send {SUPPORTED}")


async def _read_multipart(request: Request, max_batch: int) -> np.ndarray:
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
    return await run_in_threadpool(_stack, [_decoder(data, name) for name, data in files])


def _decoder(data: bytes, name: str) -> Any:
    return lambda: decode_image(data, name)


def _stack(decoders: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(decode(), dtype=np.float32) for decode in decoders])


def _images_from_json(body: bytes, max_batch: int) -> np.ndarray:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(payload, dict) or "instances" not in payload:
        raise _invalid(["body"], "expected an object {\"instances\": [...]}")
    unknown = sorted(set(payload) - {"instances"})
    if unknown:
        raise _invalid(["body", unknown[0]], f"unknown field(s): {', '.join(map(repr, unknown))}")
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise _invalid(["body", "instances"], "'instances' must be a non-empty list")
    if len(instances) > max_batch:
        raise PayloadTooLarge(f"too many images: {len(instances)}, at most {max_batch} per request (TL_MAX_BATCH)")
    arrays = []
    for index, instance in enumerate(instances):
        loc: list[str | int] = ["body", "instances", index]
        label = f"image {index} (instances[{index}])"
        if isinstance(instance, dict):
            if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
                raise _invalid(loc, f"{label} must be {{\"b64\": \"<base64 of an image file>\"}}")
            arrays.append(decode_b64(instance["b64"], label).astype(np.float32))
        elif isinstance(instance, list):
            arrays.append(nested_list_to_array(instance, label, loc))
        else:
            raise _invalid(loc, f"{label} must be {{\"b64\": ...}} or a 32x32x3 nested list of numbers 0..255")
    return np.stack(arrays)


def _invalid(loc: list[str | int], msg: str) -> InvalidInput:
    return InvalidInput(msg, errors=[{"loc": loc, "msg": msg, "type": "value_error"}])
