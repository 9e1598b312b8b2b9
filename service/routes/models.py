"""The model registry: models and aliases, read from the artifact store (the source of truth, not Redis).

Refs are a model id, an alias or `latest`; anything that is not a valid id is a 404 before the file
system is touched, and every file served comes from `ModelStore`'s own paths, never from the ref.
Filesystem work runs in a worker thread.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service.deps import ModelCacheDep, ModelStoreDep, require_json
from service.errors import (
    AliasNotFound,
    ArtifactStoreUnavailable,
    InvalidInput,
    ModelNotFound,
    NotFound,
    problem_responses,
)
from service.schemas import Alias, AliasList, AliasSet, ModelList
from worker.store import (
    ALIAS_PATTERN,
    CURVES_FILE,
    KERAS_FILE,
    RESERVED_ALIASES,
    TFLITE_FILE,
    ModelInfo,
    ModelStore,
    valid_id,
)

router = APIRouter(prefix="/v1", tags=["models"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}


async def _store_call(func: Any, *args: Any) -> Any:
    """Run a ModelStore call in a thread; an unreadable artifact directory is a 503."""
    try:
        return await run_in_threadpool(func, *args)
    except PermissionError as exc:
        raise ArtifactStoreUnavailable(f"the artifact store cannot be read: {exc}") from exc
    except OSError as exc:
        raise ArtifactStoreUnavailable(f"the artifact store is unavailable: {exc.strerror or exc}") from exc


async def resolve_model(store: ModelStore, ref: str) -> str:
    """The model id a ref names (id, alias or `latest`), or 404."""
    model_id = await _store_call(store.resolve, ref) if valid_id(ref) else None
    if model_id is None:
        raise ModelNotFound(ref)
    return str(model_id)


async def _model_info(store: ModelStore, ref: str) -> ModelInfo:
    model_id = await resolve_model(store, ref)
    info: ModelInfo | None = await _store_call(store.info, model_id)
    if info is None:  # deleted in between
        raise ModelNotFound(ref)
    return info


@router.get("/models", response_model=ModelList, responses=problem_responses(401, 503))
async def list_models(store: ModelStoreDep) -> ModelList:
    """List every model in the artifact store, newest first."""
    return ModelList(items=await _store_call(store.list))


@router.get("/models/{ref}", response_model=ModelInfo, responses=problem_responses(401, 404, 503))
async def read_model(ref: str, store: ModelStoreDep) -> ModelInfo:
    """Read one model by id, alias or `latest`: its spec, metrics and aliases."""
    return await _model_info(store, ref)


@router.delete("/models/{model_id}", status_code=204, response_class=Response,
               responses=problem_responses(401, 404, 503))
async def delete_model(model_id: str, store: ModelStoreDep, cache: ModelCacheDep) -> Response:
    """Delete a model (and the aliases pointing at it); predict answers 404 for it from now on."""
    if not valid_id(model_id) or not await _store_call(store.delete, model_id):
        raise ModelNotFound(model_id)
    cache.evict(model_id)
    return Response(status_code=204)


def _file_response(path: Any, media_type: str, filename: str | None = None) -> FileResponse:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise NotFound("the file was removed (model deleted?)") from None
    return FileResponse(path, media_type=media_type, filename=filename, stat_result=stat)


@router.get(
    "/models/{ref}/weights",
    response_class=FileResponse,
    responses={200: {"description": "the `.keras` file (or the `.tflite` export with `?format=tflite`)",
                     "content": {"application/octet-stream": _BINARY}},
               **problem_responses(401, 404, 422, 503)},
)
async def download_weights(
    ref: str,
    store: ModelStoreDep,
    format: Annotated[Literal["keras", "tflite"], Query(description="`keras` (default) or `tflite`")] = "keras",
) -> FileResponse:
    """Download the saved Keras model, or its TensorFlow Lite export for phones and edge devices."""
    model_id = await resolve_model(store, ref)
    model_dir = await _store_call(store.model_dir, model_id)
    name = TFLITE_FILE if format == "tflite" else KERAS_FILE
    path = model_dir / name if model_dir is not None else None
    if path is None or not await _store_call(path.is_file):
        what = "a TensorFlow Lite export" if format == "tflite" else "a saved Keras model"
        raise NotFound(f"model {model_id!r} has no {what}")
    suffix = name.rsplit(".", 1)[1]
    return await run_in_threadpool(_file_response, path, "application/octet-stream", f"{model_id}.{suffix}")


@router.get(
    "/models/{ref}/curves.png",
    response_class=FileResponse,
    responses={200: {"description": "accuracy and loss per epoch, train vs test",
                     "content": {"image/png": _BINARY}},
               **problem_responses(401, 404, 503)},
)
async def read_curves(ref: str, store: ModelStoreDep) -> FileResponse:
    """The training curves of a model as a PNG."""
    model_id = await resolve_model(store, ref)
    model_dir = await _store_call(store.model_dir, model_id)
    path = model_dir / CURVES_FILE if model_dir is not None else None
    if path is None or not await _store_call(path.is_file):
        raise NotFound(f"model {model_id!r} has no training curves")
    return await run_in_threadpool(_file_response, path, "image/png")


# ----- aliases -----


def _check_alias(alias: str) -> None:
    if alias in RESERVED_ALIASES:
        raise _invalid_alias(alias, f"{alias!r} is reserved (it always means the newest model)")
    if not ALIAS_PATTERN.fullmatch(alias):
        raise _invalid_alias(alias, "an alias is 1-32 characters: a lowercase letter, then lowercase letters, "
                                    "digits, '_' or '-'")


def _invalid_alias(alias: str, msg: str) -> InvalidInput:
    return InvalidInput(f"alias {alias!r}: {msg}", errors=[{"loc": ["path", "alias"], "msg": msg,
                                                             "type": "value_error"}])


@router.get("/aliases", response_model=AliasList, responses=problem_responses(401, 503))
async def list_aliases(store: ModelStoreDep) -> AliasList:
    """List every alias and the model it points at."""
    aliases = await _store_call(store.read_aliases)
    return AliasList(items=[Alias(alias=a, model_id=m) for a, m in sorted(aliases.items())])


@router.put("/aliases/{alias}", response_model=Alias, dependencies=[Depends(require_json)],
            responses=problem_responses(400, 401, 404, 415, 422, 503))
async def set_alias(alias: str, body: AliasSet, store: ModelStoreDep) -> Alias:
    """Point an alias at a model (created or moved); `default` is the model `POST /v1/predict` uses."""
    _check_alias(alias)
    if not valid_id(body.model_id) or await _store_call(store.model_dir, body.model_id) is None:
        raise ModelNotFound(body.model_id)
    await _store_call(store.set_alias, alias, body.model_id)
    return Alias(alias=alias, model_id=body.model_id)


@router.delete("/aliases/{alias}", status_code=204, response_class=Response,
               responses=problem_responses(401, 404, 503))
async def delete_alias(alias: str, store: ModelStoreDep) -> Response:
    """Remove an alias (the model stays)."""
    if not ALIAS_PATTERN.fullmatch(alias) or not await _store_call(store.delete_alias, alias):
        raise AliasNotFound(alias)
    return Response(status_code=204)
