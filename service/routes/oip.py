"""The Open Inference Protocol (KServe v2 / Triton) REST: an encoding over the one serving path.

Health, server and model metadata, model readiness and `infer` (`service.serving.tensors` has the wire
format, binary tensor data included). `{name}` is a model id, an alias or `latest`; its one version is its
model id. An `infer` goes the way of every predict request: the model's batcher is told a request is coming
while its body is read and decoded, the images join its micro-batches, and the probabilities are ranked by
`encode.rank_predictions`. Errors are the protocol's `{"error": "..."}` (`ProtocolRoute`), never problem+json.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from service.deps import Services, ServicesDep, SettingsDep
from service.errors import BadRequest, NotFound, PayloadTooLarge, ServiceError, UnsupportedMediaType
from service.middleware import BodyTooLarge
from service.schemas import (
    InferRequestBody,
    InferResponseBody,
    ModelMetadata,
    ModelReady,
    ProtocolError,
    ServerLive,
    ServerMetadata,
    ServerReady,
    inline_schema,
)
from service.serving.cache import LoadedModel
from service.serving.decode import PixelLimits
from service.serving.tensors import (
    IMAGE_INPUT,
    LABEL_OUTPUT,
    PROBABILITIES_OUTPUT,
    InferRequest,
    encode_infer_response,
    infer_outputs,
    parse_infer_request,
    request_images,
)

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
SERVER_NAME = "tl-service"
EXTENSIONS = ["classification", "binary_tensor_data"]
PLATFORM = "tensorflow_lite"
#: Media types an `infer` body may declare (tritonclient sends none; binary requests may say octet-stream).
INFER_MEDIA_TYPES = frozenset({"", "application/json", "application/octet-stream"})
#: Bodies up to this size, of images at the model's size, are decoded on the event loop (`_decode`).
INLINE_DECODE_BYTES = 16 * 1024


def protocol_error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocols' error shape: `{"error": "..."}`."""
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


class ProtocolRoute(APIRoute):
    """A route that answers its errors as `{"error": "..."}` (the standard protocols' shape, not problem+json);
    a 422 of our own checks is the protocols' 400."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return protocol_error(400 if exc.status == 422 else exc.status, exc.detail, exc.headers)
            except RequestValidationError as exc:
                first: dict[str, Any] = next(iter(exc.errors()), {})
                where = ".".join(str(p) for p in first.get("loc", ()))
                return protocol_error(400, f"{where}: {first.get('msg', 'invalid request')}")
            except StarletteHTTPException as exc:
                return protocol_error(exc.status_code, str(exc.detail), dict(exc.headers or {}))
            except (BodyTooLarge, ClientDisconnect):
                raise  # the guard answers the 413; nobody is left to answer
            except Exception:
                log.exception("unhandled error in %s %s", request.method, request.url.path)
                return protocol_error(500, "internal server error; the service logged the details")

        return route


def protocol_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of a protocol route: its errors are `ProtocolError` (a `4XX` entry also keeps
    FastAPI from documenting a problem+json 422 that these routes never answer)."""
    out: dict[int | str, dict[str, Any]] = {"4XX": {"model": ProtocolError, "description": "a protocol error"}}
    for status in statuses:
        out[status] = {"model": ProtocolError, "description": _STATUS_TEXT.get(status, "error")}
    return out


_STATUS_TEXT = {400: "the request breaks the protocol or names wrong inputs, datatypes or shapes",
                401: "missing or wrong bearer key", 404: "no such model or version",
                413: "too many images or bytes", 415: "unsupported content type or encoding",
                500: "the model cannot be loaded", 503: "the artifact store is unavailable"}

router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=ProtocolRoute)


@router.get("/health/live", response_model=ServerLive, responses=protocol_responses())
async def read_server_live() -> JSONResponse:
    """Liveness: 200 while the process runs."""
    return JSONResponse({"live": True})


@router.get("/health/ready", response_model=ServerReady, responses=protocol_responses(503))
async def read_server_ready(services: ServicesDep) -> JSONResponse:
    """Readiness: 200 when models can be served (the artifact store can be read; Redis is not needed)."""
    await services.registry.check()
    return JSONResponse({"ready": True})


@router.get("", response_model=ServerMetadata, responses=protocol_responses(401))
async def read_server_metadata(request: Request) -> JSONResponse:
    """Server metadata: name, version and the protocol extensions supported."""
    return JSONResponse({"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS})


async def _model(services: Services, name: str, version: str | None) -> tuple[str, LoadedModel]:
    """The model id `name` resolves to and the loaded model; 404 when `version` is not that id."""
    model_id = await services.registry.resolve_for_predict(name)
    if version is not None and version != model_id:
        raise NotFound(f"model {name!r} has no version {version!r} (its one version is {model_id!r})")
    return model_id, await services.cache.get(model_id)


def _metadata(name: str, model_id: str, entry: LoadedModel) -> dict[str, Any]:
    return {
        "name": name, "versions": [model_id], "platform": PLATFORM,
        "inputs": [{"name": IMAGE_INPUT, "datatype": "UINT8", "shape": [-1, *entry.input_shape]}],
        "outputs": [{"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, len(entry.classes)]},
                    {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]}],
    }


@router.get("/models/{name}", response_model=ModelMetadata, responses=protocol_responses(401, 404, 500, 503))
async def read_model_metadata(name: str, services: ServicesDep) -> JSONResponse:
    """Model metadata: its version (the model id), input and outputs (shapes from the model itself)."""
    model_id, entry = await _model(services, name, None)
    return JSONResponse(_metadata(name, model_id, entry))


@router.get("/models/{name}/versions/{model_id}", response_model=ModelMetadata,
            responses=protocol_responses(401, 404, 500, 503))
async def read_model_version_metadata(name: str, model_id: str, services: ServicesDep) -> JSONResponse:
    """Model metadata of one version (the model id `name` resolves to)."""
    resolved, entry = await _model(services, name, model_id)
    return JSONResponse(_metadata(name, resolved, entry))


@router.get("/models/{name}/ready", response_model=ModelReady, responses=protocol_responses(401, 404, 500, 503))
async def read_model_ready(name: str, services: ServicesDep) -> JSONResponse:
    """Model readiness: 200 with `ready: true` once it is loaded (loading it if need be)."""
    await _model(services, name, None)
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{name}/versions/{model_id}/ready", response_model=ModelReady,
            responses=protocol_responses(401, 404, 500, 503))
async def read_model_version_ready(name: str, model_id: str, services: ServicesDep) -> JSONResponse:
    """Readiness of one version of a model."""
    await _model(services, name, model_id)
    return JSONResponse({"name": name, "ready": True})


_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "JSON, or with the binary tensor data extension the JSON header "
                       "(`Inference-Header-Content-Length` bytes) followed by the binary inputs",
        "content": {
            "application/json": {"schema": inline_schema(InferRequestBody), "example": {
                "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                            "data": [0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255]}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}, {"name": "label"}]}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": InferResponseBody, "description": "the outputs; with binary outputs the body is the JSON header "
                                                     "(`Inference-Header-Content-Length` bytes) and their data",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **protocol_responses(400, 401, 404, 413, 415, 500, 503),
}


@router.post("/models/{name}/infer", response_class=Response, openapi_extra=_INFER_BODY,
             responses=_INFER_RESPONSES)
async def infer_model(name: str, request: Request, services: ServicesDep, settings: SettingsDep) -> Response:
    """Classify a batch of images: UINT8 `image` tensors of any size, or BYTES `image_bytes` image files."""
    return await _infer(request, services, settings.max_batch, settings.max_upload_bytes, name, None)


@router.post("/models/{name}/versions/{model_id}/infer", response_class=Response, openapi_extra=_INFER_BODY,
             responses=_INFER_RESPONSES)
async def infer_model_version(name: str, model_id: str, request: Request, services: ServicesDep,
                              settings: SettingsDep) -> Response:
    """Classify a batch of images with one version of a model (the model id `name` resolves to)."""
    return await _infer(request, services, settings.max_batch, settings.max_upload_bytes, name, model_id)


async def _infer(request: Request, services: Services, max_batch: int, max_bytes: int, name: str,
                 version: str | None) -> Response:
    model_id, entry = await _model(services, name, version)  # loaded (once) before the body is read
    header_length = _header_length(request)
    encoding = _content_encoding(request)
    with entry.batcher.incoming():
        body = await request.body()
        if encoding:
            body = await run_in_threadpool(_inflate, body, encoding, max_bytes)
        images, parsed = await _decode(body, header_length, max_batch, entry.input_shape,
                                       PixelLimits.of(services.settings))
    probs = await entry.batcher.predict(images)
    services.metrics.predictions.inc(len(images))
    content, json_length = encode_infer_response(name, model_id, parsed.id,
                                                 infer_outputs(probs, entry.classes, parsed.outputs))
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(json_length)})


async def _decode(body: bytes, header_length: int | None, max_batch: int, shape: tuple[int, ...],
                  limits: PixelLimits) -> tuple[np.ndarray, InferRequest]:
    """The request's images and what to answer. A small body of images at the model's size is read on the event
    loop (a copy of its pixels costs less than the hand-off to a thread); resizing, image files and large
    bodies go to a worker thread."""
    if len(body) > INLINE_DECODE_BYTES:
        return await run_in_threadpool(_parse_and_decode, body, header_length, max_batch, shape, limits)
    parsed = parse_infer_request(body, header_length)
    if parsed.at_model_size(shape):
        return request_images(parsed, max_batch, shape, limits), parsed
    return await run_in_threadpool(request_images, parsed, max_batch, shape, limits), parsed


def _parse_and_decode(body: bytes, header_length: int | None, max_batch: int, shape: tuple[int, ...],
                      limits: PixelLimits) -> tuple[np.ndarray, InferRequest]:
    parsed = parse_infer_request(body, header_length)
    return request_images(parsed, max_batch, shape, limits), parsed


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length must be a number of bytes (got {value!r})") from None


def _content_encoding(request: Request) -> str:
    """The body's compression ('' for none); 415 for a media type or an encoding the protocol does not use."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in INFER_MEDIA_TYPES and not media.endswith("+json"):
        raise UnsupportedMediaType(f"unsupported content type {media!r}: send application/json, or the binary "
                                   "tensor data extension (application/octet-stream)")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return ""
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"unsupported content encoding {encoding!r}: send gzip, deflate or none")
    return encoding


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate (zlib) body, refused once it inflates past `limit` bytes (TL_MAX_UPLOAD_BYTES)."""
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid {encoding} data: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"request body too large once inflated: at most {limit} bytes (TL_MAX_UPLOAD_BYTES)")
    if not inflater.eof:
        raise BadRequest(f"the {encoding} body is truncated")
    return data


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                  include_in_schema=False)
async def no_protocol_route(request: Request, path: str) -> Response:
    """Any other /v2 path: the protocol's 404 (or 405 for a known path with another method)."""
    for route in router.routes:
        if route is not request.scope.get("route") and route.matches(request.scope)[0] is Match.PARTIAL:
            return protocol_error(405, f"method {request.method} not allowed on {request.url.path}")
    return protocol_error(404, f"no route for {request.method} {request.url.path}")
