"""`/v1` prediction: the service's own encoding over the serving path (decode -> micro-batch -> run -> rank).

Bodies are read by `service.serving.decode` rather than through FastAPI's body parameters, because one
route takes four shapes of body; the OpenAPI schema documents them all (`PREDICT_REQUEST_BODY`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from service.deps import ServicesDep, SettingsDep
from service.errors import (
    problem_responses,
)
from service.schemas import PREDICT_REQUEST_BODY, PredictResponse
from service.serving.decode import PixelLimits, read_images
from service.serving.encode import predict_body, rank_predictions

router = APIRouter(prefix="/v1", tags=["predict"])


TopK = Annotated[int, Query(ge=1, le=10, description="how many classes to rank per image")]
WithProbabilities = Annotated[bool, Query(description="also return all class probabilities")]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "one prediction per image, in request order"},
    **problem_responses(400, 401, 404, 413, 415, 422, 500, 503),
}


@router.post("/models/{ref}/predict", response_model=PredictResponse, response_model_exclude_none=True,
             openapi_extra=PREDICT_REQUEST_BODY, responses=_RESPONSES)
async def predict_with_model(ref: str, request: Request, services: ServicesDep, settings: SettingsDep,
                             top_k: TopK = 3, probabilities: WithProbabilities = False) -> Response:
    """Classify images with a model named by id, alias or `latest`."""
    model_id = await services.registry.resolve_for_predict(ref)
    return await _predict(request, services, settings, model_id, top_k, probabilities)


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
             openapi_extra=PREDICT_REQUEST_BODY, responses=_RESPONSES)
async def predict_default(request: Request, services: ServicesDep, settings: SettingsDep, top_k: TopK = 3,
                          probabilities: WithProbabilities = False) -> Response:
    """Classify images with the `default` alias's model, or the newest model when no default is set."""
    model_id = await services.registry.resolve_for_predict(None)
    return await _predict(request, services, settings, model_id, top_k, probabilities)


async def _predict(request: Request, services: ServicesDep, settings: SettingsDep, model_id: str, k: int,
                   with_probabilities: bool) -> Response:
    entry = await services.cache.get(model_id)  # loaded (once) before the body is read
    limits = PixelLimits.of(settings)
    with entry.batcher.incoming():
        images = await read_images(request, settings.max_batch, entry.input_shape, limits)
    probs = await entry.batcher.predict(images)
    services.metrics.predictions.inc(len(images))
    # The body is `PredictResponse` (the route's documented model), written directly: validating and serializing
    # it through pydantic cost more than the rest of the response.
    return Response(predict_body(model_id, rank_predictions(probs, entry.classes, k, with_probabilities)),
                    media_type="application/json")
