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
