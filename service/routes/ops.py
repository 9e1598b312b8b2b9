"""Operations: liveness, readiness (Redis + live workers) and Prometheus metrics; open without a key."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.deps import ServicesDep
from service.schemas import Health, Readiness
from worker.jobstore import REDIS_ERRORS, AsyncJobStore

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

REDIS_PING_TIMEOUT_SECONDS = 2.0
#: `tl_jobs{status}` reads up to 10,000 statuses from Redis: at most once per this many seconds, whatever the
#: number of scrapers, and never twice at once.
JOB_COUNTS_TTL_SECONDS = 5.0


class JobCounts:
    """Jobs by status, counted at most once per `ttl` seconds; concurrent scrapes share one count."""

    def __init__(self, ttl: float = JOB_COUNTS_TTL_SECONDS) -> None:
        self._ttl = ttl
        self._value: dict[str, int] | None = None
        self._at = float("-inf")
        self._task: asyncio.Task[dict[str, int] | None] | None = None

    async def get(self, store: AsyncJobStore) -> dict[str, int] | None:
        """The counts, or None when Redis did not answer (then asked again at the next scrape)."""
        if time.monotonic() - self._at < self._ttl:
            return self._value
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._count(store))
        return await asyncio.shield(self._task)

    async def _count(self, store: AsyncJobStore) -> dict[str, int] | None:
        try:
            counts = await asyncio.wait_for(store.count_by_status(), REDIS_PING_TIMEOUT_SECONDS)
        except (*REDIS_ERRORS, TimeoutError):
            return None
        self._value, self._at = counts, time.monotonic()
        return counts


def job_counts_of(request: Request) -> JobCounts:
    """The app's `JobCounts` (made on the first scrape)."""
    counts = getattr(request.app.state, "job_counts", None)
    if counts is None:
        counts = request.app.state.job_counts = JobCounts()
    assert isinstance(counts, JobCounts)
    return counts


@router.get("/healthz", response_model=Health)
async def read_health() -> Health:
    """Liveness: 200 while the process runs."""
    return Health()


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Redis does not answer"}})
async def read_readiness(services: ServicesDep) -> JSONResponse:
    """Readiness: 200 when Redis answers (503 otherwise), with the number of live Celery workers."""
    try:
        await asyncio.wait_for(services.jobs.store.ping(), REDIS_PING_TIMEOUT_SECONDS)
    except (*REDIS_ERRORS, TimeoutError) as exc:
        log.warning("readiness: Redis unavailable: %s", exc)
        services.workers.forget()
        return JSONResponse(Readiness(redis="error", workers=0).model_dump(), status_code=503)
    workers = await services.workers.count()
    return JSONResponse(Readiness(redis="ok", workers=workers).model_dump())


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
async def read_metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus metrics: requests and latency by route and status, predictions, jobs by status (counted at
    most every 5 s)."""
    counts = await job_counts_of(request).get(services.jobs.store)
    services.metrics.set_job_counts(counts)
    services.metrics.models_loaded.set(len(services.cache))
    return Response(services.metrics.render(), media_type=services.metrics.content_type)
