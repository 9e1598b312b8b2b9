"""Models and aliases over HTTP: list, read, delete, download files, and set aliases (`service.registry`)."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service.deps import RegistryDep, require_json
from service.errors import (
    NotFound,
    problem_responses,
)
from service.schemas import Alias, AliasList, AliasSet, ModelList
from worker.store import (
    CONFUSION_FILE,
    CURVES_FILE,
    EXPORT_FILES,
    ModelInfo,
)

router = APIRouter(prefix="/v1", tags=["models"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get("/models", response_model=ModelList, responses=problem_responses(401, 503))
async def list_models(registry: RegistryDep) -> ModelList:
    """List every model in the artifact store, newest first."""
    return ModelList(items=await registry.list())


@router.get("/models/{ref}", response_model=ModelInfo, responses=problem_responses(401, 404, 503))
async def read_model(ref: str, registry: RegistryDep) -> ModelInfo:
    """Read one model by id, alias or `latest`: its spec, metrics and aliases."""
    return await registry.info(ref)


@router.delete("/models/{model_id}", status_code=204, response_class=Response,
               responses=problem_responses(401, 404, 503))
async def delete_model(model_id: str, registry: RegistryDep) -> Response:
    """Delete a model (and the aliases pointing at it); predict answers 404 for it from now on."""
    await registry.delete(model_id)
    return Response(status_code=204)


def _file_response(path: Any, media_type: str, filename: str | None = None) -> FileResponse:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise NotFound("the file was removed (model deleted?)") from None
    return FileResponse(path, media_type=media_type, filename=filename, stat_result=stat)


ExportFormat = Literal["keras", "tflite", "tflite-float16", "tflite-int8", "savedmodel"]
_FORMAT_NAMES = {"keras": "a saved Keras model", "tflite": "a TensorFlow Lite export",
                 "tflite-float16": "a float16 TensorFlow Lite export", "tflite-int8": "an int8 TensorFlow Lite export",
                 "savedmodel": "a SavedModel export"}


@router.get(
    "/models/{ref}/weights",
    response_class=FileResponse,
    responses={200: {"description": "the `.keras` file, or the export named by `?format=` (the Model's `exports` "
                                    "lists what it offers)",
                     "content": {"application/octet-stream": _BINARY, "application/gzip": _BINARY}},
               **problem_responses(401, 404, 422, 503)},
)
async def download_weights(
    ref: str,
    registry: RegistryDep,
    format: Annotated[ExportFormat, Query(description="`keras` (default), `tflite`, `tflite-float16`, "
                                                      "`tflite-int8` or `savedmodel` (a .tar.gz)")] = "keras",
) -> FileResponse:
    """Download the saved Keras model, or one of its exports for phones, edge devices and model servers."""
    name = EXPORT_FILES[format]
    model_id, path = await registry.file(ref, name, _FORMAT_NAMES[format])
    suffix = name.split(".", 1)[1]
    media = "application/gzip" if suffix == "tar.gz" else "application/octet-stream"
    filename = f"{model_id}-{format}.{suffix}" if format not in ("keras", "tflite") else f"{model_id}.{suffix}"
    return await run_in_threadpool(_file_response, path, media, filename)


@router.get(
    "/models/{ref}/curves.png",
    response_class=FileResponse,
    responses={200: {"description": "accuracy and loss per epoch, train vs test",
                     "content": {"image/png": _BINARY}},
               **problem_responses(401, 404, 503)},
)
async def read_curves(ref: str, registry: RegistryDep) -> FileResponse:
    """The training curves of a model as a PNG."""
    _, path = await registry.file(ref, CURVES_FILE, "training curves")
    return await run_in_threadpool(_file_response, path, "image/png")


@router.get(
    "/models/{ref}/confusion.png",
    response_class=FileResponse,
    responses={200: {"description": "the test subset's confusion matrix, labelled with the class names",
                     "content": {"image/png": _BINARY}},
               **problem_responses(401, 404, 503)},
)
async def read_confusion(ref: str, registry: RegistryDep) -> FileResponse:
    """The confusion matrix of a model on its test subset as a PNG."""
    _, path = await registry.file(ref, CONFUSION_FILE, "confusion matrix")
    return await run_in_threadpool(_file_response, path, "image/png")


# ----- aliases -----


@router.get("/aliases", response_model=AliasList, responses=problem_responses(401, 503))
async def list_aliases(registry: RegistryDep) -> AliasList:
    """List every alias and the model it points at."""
    aliases = await registry.aliases()
    return AliasList(items=[Alias(alias=a, model_id=m) for a, m in sorted(aliases.items())])


@router.put("/aliases/{alias}", response_model=Alias, dependencies=[Depends(require_json)],
            responses=problem_responses(400, 401, 404, 415, 422, 503))
async def set_alias(alias: str, body: AliasSet, registry: RegistryDep) -> Alias:
    """Point an alias at a model (created or moved); `default` is the model `POST /v1/predict` uses."""
    await registry.set_alias(alias, body.model_id)
    return Alias(alias=alias, model_id=body.model_id)


@router.delete("/aliases/{alias}", status_code=204, response_class=Response,
               responses=problem_responses(401, 404, 503))
async def delete_alias(alias: str, registry: RegistryDep) -> Response:
    """Remove an alias (the model stays)."""
    await registry.delete_alias(alias)
    return Response(status_code=204)
