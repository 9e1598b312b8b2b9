"""Response (and small request) bodies of the API, named by role; the job schemas come from `worker`.

`JobCreate` (worker.spec), `Job` (worker.jobstore) and `ModelInfo` (worker.store) are shared with the
worker and used here as they are, so the API and the record cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.jobstore import Job
from worker.store import ModelInfo
from worker.store.datasets import Dataset

JOB_EXAMPLE: dict[str, Any] = {
    "id": "j_5f2c0e8a9b1d4c37",
    "status": "queued",
    "spec": {"model": "transfer", "dataset": "cifar10", "train_samples": 5000, "test_samples": 1000, "epochs": 10,
             "batch_size": 32, "learning_rate": 0.001, "seed": 42, "name": None, "image_size": 96, "alpha": 1.0,
             "dropout": 0.5, "dense_units": [128, 64], "fine_tune_layers": 0, "fine_tune_epochs": 0,
             "fine_tune_learning_rate": 1e-05, "class_weight": None, "augment": []},
    "created_at": "2026-11-29T10:00:00.000Z", "started_at": None, "finished_at": None,
    "progress": {"stage": "queued", "epoch": 0, "epochs": 10, "fraction": 0.0},
    "history": [], "metrics": None, "model_id": None, "error": None,
}


class JobList(BaseModel):
    """A page of jobs, newest first; pass `next_cursor` as `cursor` for the next page (null at the end)."""

    items: list[Job]
    next_cursor: str | None = None


class DatasetList(BaseModel):
    """Every dataset, newest first; the built-in `cifar10` last."""

    items: list[Dataset]


class ModelList(BaseModel):
    """Every model in the artifact store, newest first."""

    items: list[ModelInfo]


class AliasSet(BaseModel):
    """Body of `PUT /v1/aliases/{alias}`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model_id": "m_0a1b2c3d4e5f6789"}]})

    model_id: str = Field(description="id of the model the alias points at")


class Alias(BaseModel):
    alias: str
    model_id: str


class AliasList(BaseModel):
    items: list[Alias]


class ClassScore(BaseModel):
    label: str = Field(examples=["cat"])
    class_index: int = Field(ge=0, examples=[3])
    probability: float = Field(ge=0, le=1, examples=[0.91])


class Prediction(ClassScore):
    top_k: list[ClassScore]
    probabilities: list[float] | None = Field(
        None, description="all class probabilities, in class order (only with ?probabilities=true)")


class PredictResponse(BaseModel):
    """Predictions in request order."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model_id": "m_0a1b2c3d4e5f6789",
        "predictions": [{"label": "cat", "class_index": 3, "probability": 0.91,
                         "top_k": [{"label": "cat", "class_index": 3, "probability": 0.91},
                                   {"label": "dog", "class_index": 5, "probability": 0.05},
                                   {"label": "frog", "class_index": 6, "probability": 0.02}]}],
    }]})

    model_id: str
    predictions: list[Prediction]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    redis: Literal["ok", "error"]
    workers: int = Field(ge=0, description="live training workers (0: submitted jobs wait in `queued`)")


#: The request bodies predict accepts (read by hand in the route, documented here for OpenAPI clients).
PREDICT_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "one or more images: multipart file parts named `file`, a JSON `instances` list "
                       "(base64 image files or 32x32x3 nested lists of 0..255), or a raw PNG/JPEG body",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "array", "minItems": 1,
                                            "items": {"type": "string", "format": "binary"}}},
                },
                "encoding": {"file": {"contentType": "image/png, image/jpeg, image/bmp, image/gif, image/webp"}},
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["instances"],
                    "additionalProperties": False,
                    "properties": {"instances": {
                        "type": "array", "minItems": 1,
                        "items": {"oneOf": [
                            {"type": "object", "required": ["b64"], "additionalProperties": False,
                             "properties": {"b64": {"type": "string", "description": "base64 of an image file"}}},
                            {"type": "array", "minItems": 32, "maxItems": 32, "description": "32 rows",
                             "items": {"type": "array", "minItems": 32, "maxItems": 32,
                                       "items": {"type": "array", "minItems": 3, "maxItems": 3,
                                                 "items": {"type": "number", "minimum": 0, "maximum": 255}}}},
                        ]},
                    }},
                },
                "example": {"instances": [{"b64": "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAALElEQVR42u3NQREAMAgA"
                                                  "IF0aQ9j/jLUS+oMC5HTFpRfHBAKBQCAQCAQCwZYPxMkBbMCgtygAAAAASUVORK5CYII="}]},
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# ----- the standard inference protocols (service/routes/oip.py, service/routes/tfserving.py) -----

class ProtocolError(BaseModel):
    """An error of the standard protocol routes: the protocols' own `{"error": ...}`, not problem+json."""

    error: str = Field(examples=["unexpected input 'x': the model takes 'image' or 'image_bytes'"])


class ServerLive(BaseModel):
    live: bool = True


class ServerReady(BaseModel):
    ready: bool = True


class ServerMetadata(BaseModel):
    """`GET /v2`: the server and the protocol extensions it supports."""

    name: str = Field(examples=["tl-service"])
    version: str = Field(examples=["1.0.0"])
    extensions: list[str] = Field(examples=[["classification", "binary_tensor_data"]])


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(examples=["UINT8"])
    shape: list[int] = Field(description="-1: any size (the batch)", examples=[[-1, 32, 32, 3]])


class ModelMetadata(BaseModel):
    """A model as the Open Inference Protocol describes it; its one version is its model id."""

    name: str
    versions: list[str]
    platform: str = Field(examples=["tensorflow_lite"])
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class InferInputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_size: int | None = Field(None, ge=0, description="bytes of this input after the JSON header")


class InferInputTensor(BaseModel):
    """`image` (UINT8 [N, H, W, 3], any H x W) or `image_bytes` (BYTES [N]: base64 image files in JSON, raw files
    in binary form)."""

    name: str = Field(examples=["image"])
    datatype: str = Field(examples=["UINT8"])
    shape: list[int] = Field(examples=[[1, 32, 32, 3]])
    parameters: InferInputParameters | None = None
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent with binary_data_size")


class InferOutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data: bool | None = Field(None, description="answer this output as binary tensor data")
    classification: int | None = Field(None, ge=1, description="`probabilities` only: the top k as "
                                                               "\"<score>:<index>:<label>\" strings")


class InferRequestedOutput(BaseModel):
    name: str = Field(examples=["probabilities"])
    parameters: InferOutputParameters | None = None


class InferRequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_output: bool | None = Field(None, description="outputs are binary unless they say otherwise")


class InferRequestBody(BaseModel):
    """An Open Inference Protocol `infer` request (the JSON header, when binary tensors follow it)."""

    id: str | None = None
    parameters: InferRequestParameters | None = None
    inputs: list[InferInputTensor] = Field(min_length=1, max_length=1)
    outputs: list[InferRequestedOutput] | None = Field(None, description="absent: `probabilities` and `label`")


class InferOutputTensor(BaseModel):
    name: str = Field(examples=["probabilities"])
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[1, 10]])
    parameters: dict[str, int] | None = Field(None, description="`binary_data_size` of a binary output")
    data: list[float | str] | None = Field(None, description="flat, row-major; absent for a binary output")


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutputTensor]


class TFServingPredictRequest(BaseModel):
    """TF Serving predict: `instances` (row format) or `inputs` (columnar: a list, or `{"image": [...]}`), each
    image an H x W x 3 nested list of 0..255 at the model's input size or `{"b64": "<image file>"}`."""

    signature_name: str | None = Field(None, examples=["serving_default"])
    instances: list[Any] | None = None
    inputs: list[Any] | dict[str, list[Any]] | None = None


class TFServingPredictResponse(BaseModel):
    """One row of class probabilities per image: `predictions` for the row format, `outputs` for columnar."""

    predictions: list[list[float]] | None = None
    outputs: list[list[float]] | None = None


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` written in place, for an `openapi_extra` request body (whose
    references FastAPI would not add to the components)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
