"""Training jobs over HTTP: create, list, read, cancel, and follow over Server-Sent Events (`service.jobs`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.deps import JobServiceDep, require_json
from service.errors import problem_responses
from service.events import EventStream
from service.schemas import JOB_EXAMPLE, JobList
from worker.jobstore import Job, JobStatus
from worker.spec import JobCreate

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` of one `EventStream`; its slot is released however the response ends (the job
    ended, the time limit, the client went away, an error)."""

    def __init__(self, stream: EventStream) -> None:
        super().__init__(stream, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.release()

_JOB_RESPONSE: dict[str, Any] = {"content": {"application/json": {"example": JOB_EXAMPLE}}}


@router.post(
    "",
    status_code=202,
    response_model=Job,
    dependencies=[Depends(require_json)],
    responses={202: {"description": "the job, queued; `Location` points at it", **_JOB_RESPONSE},
               **problem_responses(400, 401, 413, 415, 422, 503)},
)
async def create_job(
    spec: JobCreate,
    response: Response,
    jobs: JobServiceDep,
    idempotency: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                              description="a retried POST with the same key returns the same job")]
    = None,
) -> Job:
    """Queue a training job and answer at once; the worker runs it."""
    job, created = await jobs.create(spec, idempotency)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.get("", response_model=JobList, responses=problem_responses(401, 422, 503))
async def list_jobs(
    jobs: JobServiceDep,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    model: Annotated[Literal["baseline", "transfer"] | None, Query(description="only jobs of this model kind")]
    = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^\d{20}:[A-Za-z0-9_-]{1,64}$",
                                        description="`next_cursor` of the previous page")] = None,
) -> JobList:
    """List jobs, newest first, a page at a time."""
    items, next_cursor = await jobs.list(status=status, model=model, limit=limit, cursor=cursor)
    return JobList(items=items, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=Job, responses={200: _JOB_RESPONSE, **problem_responses(401, 404, 503)})
async def read_job(job_id: str, jobs: JobServiceDep) -> Job:
    """Read one job: status, progress, per-epoch history, and metrics or error once it ended."""
    return await jobs.read(job_id)


@router.post("/{job_id}/cancel", status_code=202, response_model=Job,
             responses={202: _JOB_RESPONSE, **problem_responses(401, 404, 409, 503)})
async def cancel_job(job_id: str, jobs: JobServiceDep) -> Job:
    """Cancel a job: a queued one at once (`cancelled`), a running one within seconds (`cancelling`)."""
    return await jobs.cancel(job_id)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"description": "`event: job` with the Job JSON on every change of status, stage or epoch; "
                                    "closed after the terminal state, or after TL_EVENT_STREAM_MAX_SECONDS with "
                                    "a `retry:` field (EventSource reconnects); 429 beyond TL_MAX_EVENT_STREAMS "
                                    "open streams",
                     "content": {"text/event-stream": {"schema": {"type": "string"},
                                                       "example": "event: job\ndata: {\"id\": \"j_…\", …}\n\n"}}},
               **problem_responses(401, 404, 429, 503)},
)
async def stream_job_events(job_id: str, jobs: JobServiceDep) -> StreamingResponse:
    """Follow a job as Server-Sent Events until it ends."""
    return EventStreamResponse(await jobs.open_events(job_id))
