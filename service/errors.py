"""Domain errors of the HTTP side, and the one place they become `application/problem+json` (RFC 9457).

ServiceError                      status  meaning
├── BadRequest                     400     a body that cannot be read (invalid JSON, malformed multipart)
│   └── BadImage                   400     an image that cannot be decoded (names which one)
├── Unauthorized                   401     missing or wrong bearer key
├── NotFound                       404
│   ├── JobNotFound
│   ├── ModelNotFound
│   ├── NoModelYet                 404     nothing trained yet: says to train one first
│   └── AliasNotFound
├── Conflict                       409
│   └── JobFinished                409     cancel of a terminal job
├── PayloadTooLarge                413     body over TL_MAX_UPLOAD_BYTES, more than TL_MAX_BATCH images,
│                                          or an image with too many pixels (decompression bomb)
├── UnsupportedMediaType           415
├── TooManyRequests                429
│   └── TooManyEventStreams        429     more open event streams than TL_MAX_EVENT_STREAMS (with Retry-After)
├── InvalidInput                   422     semantically invalid fields found by our own checks
│   └── IdempotencyKeyReused       422     an Idempotency-Key sent again with another job spec
├── ModelUnavailable               500     a model on disk that cannot be loaded (server-side problem)
└── ServiceUnavailable             503
    ├── JobStoreUnavailable        503     Redis does not answer
    ├── QueueUnavailable           503     the Celery broker refused the task
    └── ArtifactStoreUnavailable   503     the artifact directory cannot be read

Besides these, `install_error_handlers` maps FastAPI's request validation (422, or 400 for invalid
JSON), Starlette's HTTP exceptions (404 for unknown paths, 405 ...), redis-py connection and timeout
errors (503) and anything unexpected (500, logged) to the same shape. The request guard
(`service.middleware`) answers 401, 403 (cross-site), 413, 415 (no Content-Type) and 421 (unknown Host)
itself, before any route, in the same shape (`problem_bytes`).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str | None = None


class Problem(BaseModel):
    """An error response (RFC 9457 problem details)."""

    type: str = Field("about:blank", examples=["about:blank"])
    title: str = Field(examples=["Not Found"])
    status: int = Field(examples=[404])
    detail: str = Field(examples=["model 'm_x' not found"])
    errors: list[ErrorItem] | None = Field(None, description="422 only: each invalid field")


class ServiceError(Exception):
    """Base of every error the service raises on purpose; `status` is the HTTP status."""

    status: int = 500

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers
        self.errors = errors


class BadRequest(ServiceError):
    status = 400


class BadImage(BadRequest):
    pass


class Unauthorized(ServiceError):
    status = 401


class NotFound(ServiceError):
    status = 404


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")


class ModelNotFound(NotFound):
    def __init__(self, ref: str) -> None:
        super().__init__(f"model {ref!r} not found")


class NoModelYet(NotFound):
    def __init__(self) -> None:
        super().__init__("no trained model yet: train one first with POST /v1/jobs, then predict once it has succeeded")


class AliasNotFound(NotFound):
    def __init__(self, alias: str) -> None:
        super().__init__(f"alias {alias!r} not found")


class Conflict(ServiceError):
    status = 409


class JobFinished(Conflict):
    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id!r} is already {status}; only queued or running jobs can be cancelled")


class PayloadTooLarge(ServiceError):
    status = 413


class UnsupportedMediaType(ServiceError):
    status = 415


class TooManyRequests(ServiceError):
    status = 429


class TooManyEventStreams(TooManyRequests):
    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"too many open event streams: at most {limit} at once (TL_MAX_EVENT_STREAMS); retry in "
                         f"{retry_after} s, or poll GET /v1/jobs/{{id}}", headers={"Retry-After": str(retry_after)})


class InvalidInput(ServiceError):
    status = 422

    @classmethod
    def at(cls, loc: list[str | int], msg: str, detail: str | None = None) -> InvalidInput:
        """A 422 for one field at `loc` (FastAPI's `loc` convention), `msg` saying what is wrong with it."""
        return cls(detail or msg, errors=[{"loc": loc, "msg": msg, "type": "value_error"}])


class IdempotencyKeyReused(InvalidInput):
    def __init__(self, key: str, job_id: str) -> None:
        msg = (f"Idempotency-Key {key[:64]!r} was used for job {job_id} with another request body; a retry must "
               "send the same body, and a different job needs a new key")
        super().__init__(msg, errors=[{"loc": ["header", "Idempotency-Key"], "msg": msg, "type": "value_error"}])


class ModelUnavailable(ServiceError):
    status = 500


class ServiceUnavailable(ServiceError):
    status = 503


class JobStoreUnavailable(ServiceUnavailable):
    def __init__(self) -> None:
        super().__init__("the job store (Redis) is unavailable; job endpoints recover by themselves once it answers "
                         "again (models and predict keep working)")


class QueueUnavailable(ServiceUnavailable):
    pass


class ArtifactStoreUnavailable(ServiceUnavailable):
    pass


def problem_response(status: int, detail: str, *, headers: dict[str, str] | None = None,
                     errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    """The one error shape: `{"type", "title", "status", "detail"}` (+ `errors` on a 422)."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_CONTENT_TYPE)


def problem_bytes(status: int, detail: str) -> bytes:
    """The body of `problem_response`, for the raw ASGI middleware that answers before the app runs."""
    return bytes(problem_response(status, detail).body)


def validation_errors(raw: list[Any]) -> list[dict[str, Any]]:
    """pydantic/FastAPI errors -> `[{"loc", "msg", "type"}]` (JSON-safe: inputs and contexts dropped)."""
    return [{"loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
             "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))} for err in raw]


def _summary(errors: list[dict[str, Any]]) -> str:
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}" if where else f"{first['msg']}{more}"


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return problem_response(exc.status, exc.detail, headers=exc.headers, errors=exc.errors)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    if any(err.get("type") == "json_invalid" for err in raw):
        return problem_response(400, "the request body is not valid JSON")
    errors = validation_errors(raw)
    return problem_response(422, _summary(errors), errors=errors)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route for {request.method} {request.url.path}"
    return problem_response(exc.status_code, detail, headers=dict(exc.headers or {}))


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("Redis unavailable during %s %s: %s", request.method, request.url.path, exc)
    return problem_response(503, JobStoreUnavailable().detail)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "internal server error; the service logged the details")


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the app can raise to a problem+json response."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(redis.exceptions.ConnectionError, _redis_error)
    app.add_exception_handler(redis.exceptions.TimeoutError, _redis_error)
    app.add_exception_handler(Exception, _unexpected_error)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting the problem+json errors a route can answer."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    return out
