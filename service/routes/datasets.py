"""Datasets over HTTP: upload an archive (streamed to disk), list, read, preview, delete (`service.datasets`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.deps import DatasetServiceDep
from service.errors import BadRequest, InvalidInput, UnsupportedMediaType, problem_responses
from service.schemas import DatasetList
from worker.store.datasets import Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

ARCHIVE_TYPES = frozenset({"application/zip", "application/x-zip-compressed", "application/x-tar", "application/gzip",
                           "application/x-gzip", "application/x-compressed-tar", "application/octet-stream"})
_BINARY = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the archive (zip, tar, tar.gz or npz): a multipart file part named `file` (with optional "
                       "form fields `name`, `test_fraction`, `seed`), or the raw archive with the options as query "
                       "parameters",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary"}, "name": {"type": "string", "maxLength": 64},
                "test_fraction": {"type": "number", "minimum": 0.05, "maximum": 0.5},
                "seed": {"type": "integer", "minimum": 0}}}},
            **dict.fromkeys(("application/zip", "application/x-tar", "application/gzip", "application/octet-stream"),
                            _BINARY),
        },
    }
}

Name = Annotated[str | None, Query(max_length=64, description="a label for the dataset (raw uploads)")]
TestFraction = Annotated[float, Query(ge=0.05, le=0.5, description="share of each class kept for testing")]
Seed = Annotated[int, Query(ge=0, le=2**31 - 1, description="seed of the stratified split")]


@router.post("", status_code=202, response_model=Dataset, openapi_extra=UPLOAD_BODY,
             responses={202: {"description": "the dataset, `processing`; `Location` points at it"},
                        **problem_responses(400, 401, 413, 415, 422, 503)})
async def create_dataset(request: Request, response: Response, datasets: DatasetServiceDep, name: Name = None,
                         test_fraction: TestFraction = 0.2, seed: Seed = 42) -> Dataset:
    """Upload a labelled image archive; it is checked and normalised in the background."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        dataset = await _receive_multipart(request, datasets)
    elif media in ARCHIVE_TYPES:
        dataset = await datasets.receive(request.stream(), name=name, test_fraction=test_fraction, seed=seed)
    else:
        shown = repr(media) if media else "none"
        raise UnsupportedMediaType(f"unsupported content type {shown}: send multipart/form-data with a file part "
                                   "named 'file', or the archive as application/zip, application/x-tar, "
                                   "application/gzip or application/octet-stream")
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset


async def _receive_multipart(request: Request, datasets: DatasetServiceDep) -> Dataset:
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=1024)
    except StarletteHTTPException as exc:
        raise BadRequest(f"malformed multipart body: {exc.detail}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadRequest("no archive: send it as a multipart file part named 'file'")
        options = {key: value for key, value in form.multi_items() if key != "file"}
        unknown = sorted(set(options) - {"name", "test_fraction", "seed"})
        if unknown:
            raise InvalidInput.at(["body", unknown[0]], f"unknown form field(s): {', '.join(unknown)}")
        name = _text(options.get("name"), "name") or _stem(upload.filename)
        test_fraction = _number(options.get("test_fraction"), "test_fraction", float, 0.2, 0.05, 0.5)
        seed = int(_number(options.get("seed"), "seed", int, 42, 0, 2**31 - 1))
        return await datasets.receive_file(upload.file, name=name, test_fraction=test_fraction, seed=seed)
    finally:
        await form.close()


def _text(value: Any, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidInput.at(["body", field], f"{field} must be text of at most 64 characters")
    return value


def _number(value: Any, field: str, kind: type, default: float, low: float, high: float) -> float:
    if value is None or value == "":
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise InvalidInput.at(["body", field], f"{field} must be a number") from None
    if not low <= number <= high:
        raise InvalidInput.at(["body", field], f"{field} must be between {low} and {high}")
    return float(number)


def _stem(filename: str | None) -> str | None:
    if not filename:
        return None
    stem = filename.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".zip", ".tar", ".npz"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem[:64] or None


@router.get("", response_model=DatasetList, responses=problem_responses(401, 503))
async def list_datasets(datasets: DatasetServiceDep) -> DatasetList:
    """List every dataset, newest first (the built-in `cifar10` included)."""
    return DatasetList(items=await datasets.list())


@router.get("/{dataset_id}", response_model=Dataset, responses=problem_responses(401, 404, 503))
async def read_dataset(dataset_id: str, datasets: DatasetServiceDep) -> Dataset:
    """Read one dataset: status, classes, per-class counts, skipped files, duplicates."""
    return await datasets.get(dataset_id)


@router.get("/{dataset_id}/preview.png", response_class=FileResponse,
            responses={200: {"description": "a few images of every class, labelled", "content": {"image/png": _BINARY}},
                       **problem_responses(401, 404, 409, 503)})
async def read_dataset_preview(dataset_id: str, datasets: DatasetServiceDep) -> FileResponse:
    """A grid of a few images of every class, labelled (409 while processing)."""
    return FileResponse(await datasets.preview(dataset_id), media_type="image/png")


@router.delete("/{dataset_id}", status_code=204, response_class=Response,
               responses=problem_responses(401, 404, 409, 503))
async def delete_dataset(dataset_id: str, datasets: DatasetServiceDep) -> Response:
    """Delete an uploaded dataset (409 while a queued or running job uses it); its models keep working."""
    await datasets.delete(dataset_id)
    return Response(status_code=204)
