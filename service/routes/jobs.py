"""Training jobs: create (enqueue by task name), list, read, cancel, and follow over Server-Sent Events.

The job record in Redis (worker.jobstore) is the job table: these routes read and write only it and send
the Celery task by name, so the API never imports the worker's code or TensorFlow, and Celery's own
task states (PENDING for unknown ids ...) never show.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import redis.exceptions
from celery import Celery
from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import StreamingResponse

from service.deps import JobStoreDep, ServicesDep, SettingsDep, require_json
from service.errors import JobFinished, JobNotFound, QueueUnavailable, problem_responses
from service.schemas import JOB_EXAMPLE, JobList
from worker.jobstore import (
    TERMINAL,
    AsyncJobStore,
    Job,
    JobError,
    JobStatus,
    events_channel,
    idempotency_key,
    utc_now,
)
from worker.queue import TRAIN_TASK, TRAINING_QUEUE
from worker.spec import JobCreate
from worker.store import valid_id

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
#: Publishing to the broker must not hold a request for long when it is down.
ENQUEUE_TIMEOUT_SECONDS = 5.0
ENQUEUE_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
SSE_POLL_SECONDS = 2.0
SSE_HEARTBEAT_SECONDS = 15.0

_JOB_RESPONSE: dict[str, Any] = {"content": {"application/json": {"example": JOB_EXAMPLE}}}


def _location(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def _send_task(celery: Celery, job_id: str) -> None:
    # ignore_result: the job record is where outcomes live; subscribing to Celery's result backend would
    # also make a send to an unreachable Redis hang for ~20 s in the backend's reconnect loop.
    celery.send_task(TRAIN_TASK, args=[job_id], task_id=job_id, queue=TRAINING_QUEUE, ignore_result=True,
                     retry=True, retry_policy=ENQUEUE_RETRY_POLICY)


async def _require_job(store: AsyncJobStore, job_id: str) -> Job:
    """The job, or 404 (an id that is not a valid id is never looked up)."""
    job = await store.get(job_id) if valid_id(job_id) else None
    if job is None:
        raise JobNotFound(job_id)
    return job


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
    services: ServicesDep,
    idempotency: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                              description="a retried POST with the same key returns the same job")]
    = None,
) -> Job:
    """Queue a training job and answer at once; the worker runs it."""
    store = services.jobs
    job, created = await store.create(spec, idempotency)
    response.headers["Location"] = _location(job.id)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
        return job
    try:
        await asyncio.wait_for(asyncio.to_thread(_send_task, services.celery, job.id), ENQUEUE_TIMEOUT_SECONDS)
    except Exception as exc:
        log.error("could not enqueue job %s: %s", job.id, exc)
        message = f"the job queue (Celery broker at TL_REDIS_URL) refused the job: {exc or type(exc).__name__}"
        await store.update(job.id, {"status": "failed", "finished_at": utc_now(),
                                    "error": JobError(type="QueueUnavailable", message=message)},
                           from_statuses=["queued"])
        if idempotency is not None:  # let the client's retry create a fresh job
            await store.redis.delete(idempotency_key(idempotency))
        raise QueueUnavailable(f"{message}; job {job.id} was marked failed, retry later") from exc
    return job


@router.get("", response_model=JobList, responses=problem_responses(401, 422, 503))
async def list_jobs(
    store: JobStoreDep,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    model: Annotated[Literal["baseline", "transfer"] | None, Query(description="only jobs of this model kind")]
    = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^\d{20}:[A-Za-z0-9_-]{1,64}$",
                                        description="`next_cursor` of the previous page")] = None,
) -> JobList:
    """List jobs, newest first, a page at a time."""
    items, next_cursor = await store.list(status=status, model=model, limit=limit, cursor=cursor)
    return JobList(items=items, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=Job, responses={200: _JOB_RESPONSE, **problem_responses(401, 404, 503)})
async def read_job(job_id: str, store: JobStoreDep, settings: SettingsDep) -> Job:
    """Read one job: status, progress, per-epoch history, and metrics or error once it ended."""
    job = await _require_job(store, job_id)
    if job.status in ("running", "cancelling") and await store.reap(job_id, settings.job_lost_seconds):
        job = await _require_job(store, job_id)  # its worker was lost: now failed
    return job


@router.post("/{job_id}/cancel", status_code=202, response_model=Job,
             responses={202: _JOB_RESPONSE, **problem_responses(401, 404, 409, 503)})
async def cancel_job(job_id: str, services: ServicesDep) -> Job:
    """Cancel a job: a queued one at once (`cancelled`), a running one within seconds (`cancelling`)."""
    store = services.jobs
    for _ in range(5):  # the status may move under us (queued -> running); decide again from the new one
        job = await _require_job(store, job_id)
        if job.status in TERMINAL:
            raise JobFinished(job_id, job.status)
        if job.status == "cancelling":
            return job
        if job.status == "queued":
            if await store.update(job_id, {"status": "cancelled", "finished_at": utc_now()},
                                  from_statuses=["queued"]):
                await _revoke(services.celery, job_id)
                return await _require_job(store, job_id)
        elif job.status == "running":
            await store.request_cancel(job_id)
            if await store.update(job_id, {"status": "cancelling"}, from_statuses=["running"]):
                return await _require_job(store, job_id)
    return await _require_job(store, job_id)


async def _revoke(celery: Celery, job_id: str) -> None:
    """Revoke the queued task (best effort: the worker also skips a job that is no longer queued)."""
    try:
        await asyncio.wait_for(asyncio.to_thread(celery.control.revoke, job_id), ENQUEUE_TIMEOUT_SECONDS)
    except Exception as exc:
        log.warning("could not revoke task %s (the worker will still skip it): %s", job_id, exc)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"description": "`event: job` with the Job JSON on every change of status, stage or epoch; "
                                    "closed after the terminal state",
                     "content": {"text/event-stream": {"schema": {"type": "string"},
                                                       "example": "event: job\ndata: {\"id\": \"j_…\", …}\n\n"}}},
               **problem_responses(401, 404, 503)},
)
async def stream_job_events(job_id: str, store: JobStoreDep) -> StreamingResponse:
    """Follow a job as Server-Sent Events until it ends."""
    job = await _require_job(store, job_id)
    return StreamingResponse(job_events(store, job), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(job: Job) -> bytes:
    return f"event: job\ndata: {job.model_dump_json()}\n\n".encode()


def _change_key(job: Job) -> tuple[str, str, int]:
    return job.status, job.progress.stage, job.progress.epoch


async def job_events(store: AsyncJobStore, first: Job, *, poll_seconds: float = SSE_POLL_SECONDS,
                     heartbeat_seconds: float = SSE_HEARTBEAT_SECONDS) -> AsyncIterator[bytes]:
    """The job now, then again on every change (pub/sub notice, or a poll as fallback), until terminal."""
    job_id = first.id
    pubsub = store.redis.pubsub()
    subscribed = False
    try:
        try:
            await pubsub.subscribe(events_channel(job_id))
            subscribed = True
            job = await store.get(job_id) or first  # read after subscribing: no change falls in between
        except REDIS_ERRORS:
            job = first
        yield _sse(job)
        last, last_sent = _change_key(job), time.monotonic()
        while job.status not in TERMINAL:
            wait = max(0.05, min(poll_seconds, heartbeat_seconds - (time.monotonic() - last_sent)))
            try:
                if subscribed:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                else:
                    await asyncio.sleep(wait)
                current = await store.get(job_id)
            except REDIS_ERRORS:
                subscribed = False  # keep the stream, fall back to polling until Redis answers
                await asyncio.sleep(wait)
                current = job
            if current is None:
                return  # the record expired or was removed
            job = current
            if _change_key(job) != last:
                yield _sse(job)
                last, last_sent = _change_key(job), time.monotonic()
            elif time.monotonic() - last_sent >= heartbeat_seconds:
                yield b": keep-alive\n\n"
                last_sent = time.monotonic()
    finally:
        try:
            await pubsub.aclose()
        except Exception as exc:
            log.debug("closing the events subscription failed: %s", exc)
