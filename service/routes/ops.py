"""Operations: liveness, readiness (Redis + live workers) and Prometheus metrics; open without a key."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.deps import ServicesDep
from service.schemas import Health, Readiness
from worker.jobstore import REDIS_ERRORS

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])

REDIS_PING_TIMEOUT_SECONDS = 2.0


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
async def read_metrics(services: ServicesDep) -> Response:
    """Prometheus metrics: requests and latency by route and status, predictions, jobs by status."""
    try:
        counts = await asyncio.wait_for(services.jobs.store.count_by_status(), REDIS_PING_TIMEOUT_SECONDS)
    except (*REDIS_ERRORS, TimeoutError):
        counts = None
    services.metrics.set_job_counts(counts)
    services.metrics.models_loaded.set(len(services.cache))
    return Response(services.metrics.render(), media_type=services.metrics.content_type)
