"""TensorFlow Serving's REST predict: an encoding over the one serving path.

`POST /v1/models/{name}:predict` and `/v1/models/{name}/versions/{model_id}:predict` (`{name}`: a model id,
an alias or `latest`; its one version is its model id), row (`instances`) or columnar (`inputs`) bodies
(`service.serving.tensors`), answered as probability rows. The images go through the model's batcher like
every predict request; errors are TF Serving's `{"error": "..."}`.

Starlette matches a path parameter up to the next `/`, so `m_abc:predict` reaches these routes and never the
`/v1/models/{ref}` ones (no other POST route has that shape).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service.deps import Services, ServicesDep, SettingsDep
from service.errors import NotFound, UnsupportedMediaType
from service.routes.oip import ProtocolRoute, protocol_responses
from service.schemas import TFServingPredictRequest, TFServingPredictResponse, inline_schema
from service.serving.decode import PixelLimits
from service.serving.tensors import parse_tfserving_request, tfserving_body

router = APIRouter(prefix="/v1/models", tags=["tensorflow serving"], route_class=ProtocolRoute)

_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {
            "schema": inline_schema(TFServingPredictRequest),
            "example": {"instances": [{"b64": "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAALElEQVR42u3NQREAMAgA"
                                              "IF0aQ9j/jLUS+oMC5HTFpRfHBAKBQCAQCAQCwZYPxMkBbMCgtygAAAAASUVORK5CYII="}]},
        }},
    }
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": TFServingPredictResponse, "description": "one row of class probabilities per image, in order"},
    **protocol_responses(400, 401, 404, 413, 415, 500, 503),
}


@router.post("/{name}:predict", response_class=Response, openapi_extra=_BODY, responses=_RESPONSES)
async def predict_tfserving(name: str, request: Request, services: ServicesDep, settings: SettingsDep) -> Response:
    """TF Serving predict: class probabilities for `instances` (row) or `inputs` (columnar)."""
    return await _predict(request, services, settings.max_batch, name, None)


@router.post("/{name}/versions/{model_id}:predict", response_class=Response, openapi_extra=_BODY,
             responses=_RESPONSES)
async def predict_tfserving_version(name: str, model_id: str, request: Request, services: ServicesDep,
                                    settings: SettingsDep) -> Response:
    """TF Serving predict with one version of a model (the model id `name` resolves to)."""
    return await _predict(request, services, settings.max_batch, name, model_id)


async def _predict(request: Request, services: Services, max_batch: int, name: str, version: str | None) -> Response:
    model_id = await services.registry.resolve_for_predict(name)
    if version is not None and version != model_id:
        raise NotFound(f"model {name!r} has no version {version!r} (its one version is {model_id!r})")
    media = request.headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"unsupported content type {media!r}: send application/json")
    entry = await services.cache.get(model_id)  # loaded (once) before the body is read
    with entry.batcher.incoming():
        body = await request.body()
        images, columnar = await run_in_threadpool(parse_tfserving_request, body, max_batch, entry.input_shape,
                                                   PixelLimits.of(services.settings))
    probs = await entry.batcher.predict(images)
    services.metrics.predictions.inc(len(images))
    return Response(tfserving_body(probs, columnar), media_type="application/json")
