"""The FastAPI app: `create_app(settings)` builds it; `service.main:app` is the one uvicorn serves.

Where a request goes: `MetricsMiddleware` (counts and times it) -> `RequestGuard` (bearer key on /v1,
body size) -> a router in `service.routes` -> domain errors become problem+json in `service.errors`.
The lifespan opens Redis (lazily: the API starts, and models and predict work, without it), the
model cache with its inference threads, and the reaper that fails jobs whose worker died.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from service.datasets import DatasetService
from service.deps import Services
from service.errors import PROBLEM_CONTENT_TYPE, install_error_handlers
from service.events import ChangeFeed
from service.housekeeping import WorkerCensus, reaper_interval, run_reaper
from service.jobs import JobService
from service.metrics import MetricsMiddleware, ServiceMetrics
from service.middleware import RequestGuard, is_protected
from service.registry import ModelRegistry
from service.routes import datasets, jobs, models, oip, ops, predict, tfserving, ui
from service.serving.cache import ModelCache
from worker.config import Settings, get_settings
from worker.jobstore import AsyncJobStore
from worker.queue import make_celery
from worker.store import open_dataset_store, open_model_store

log = logging.getLogger(__name__)

TITLE = "CIFAR-10 transfer-learning service"
VERSION = "1.0.0"
DESCRIPTION = (
    "Train CIFAR-10 image classifiers (a small CNN from scratch, or an ImageNet MobileNetV2 base with a new head) "
    "as background jobs, keep the resulting models in a registry with aliases, and classify images with them. "
    "Errors are `application/problem+json`. When `TL_API_KEY` is set, every `/v1` route needs "
    "`Authorization: Bearer <key>`."
)
#: Job endpoints must answer 503 quickly when Redis is down, then recover by themselves.
REDIS_CONNECT_TIMEOUT_SECONDS = 1.0
REDIS_SOCKET_TIMEOUT_SECONDS = 5.0
#: The main pool's size, and how long a request waits for a free connection before its 503: no burst of
#: requests makes redis-py raise "Too many connections" at once (event streams hold none: `ChangeFeed`).
REDIS_POOL_SIZE = 64
REDIS_POOL_WAIT_SECONDS = 3.0
SHUTDOWN_STEP_SECONDS = 5.0


def redis_client(settings: Settings, *, pool_size: int = REDIS_POOL_SIZE) -> aioredis.Redis:
    """The API's Redis client: short timeouts, one quick retry, reconnects on its own; a bounded pool that
    makes a request wait a moment for a free connection rather than fail."""
    return aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, decode_responses=True, max_connections=pool_size, timeout=REDIS_POOL_WAIT_SECONDS,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS, socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1), health_check_interval=15,
    ))


def build_services(settings: Settings, metrics: ServiceMetrics) -> Services:
    """Everything the routes share; nothing here connects yet or loads a model."""
    store = open_model_store(settings, check=True)  # a missing bucket fails the lifespan, naming it
    executor = ThreadPoolExecutor(max_workers=settings.model_cache_size, thread_name_prefix="tl-infer")
    cache = ModelCache(store, executor, size=settings.model_cache_size, threads=settings.serving_threads,
                       max_batch=settings.max_batch, window_ms=settings.batch_window_ms,
                       on_batch=metrics.batch_images.observe,
                       on_load=lambda backend, seconds: metrics.model_load.labels(backend=backend).observe(seconds),
                       alone=metrics.predict_alone)
    celery = make_celery(settings)
    job_store = AsyncJobStore(redis_client(settings), settings.job_ttl_seconds)
    datasets = DatasetService(open_dataset_store(settings), job_store, celery, settings.job_lost_seconds)
    # The event streams' one pub/sub connection lives on a client of its own: it never takes from the main pool.
    feed = ChangeFeed(redis_client(settings, pool_size=2))
    jobs = JobService(job_store, celery, settings.job_lost_seconds, datasets, published=store.metadata, feed=feed,
                      max_streams=settings.max_event_streams, stream_max_seconds=settings.event_stream_max_seconds)
    return Services(settings=settings, jobs=jobs, datasets=datasets, registry=ModelRegistry(store, cache), cache=cache,
                    celery=celery, metrics=metrics, workers=WorkerCensus(celery), executor=executor)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for `settings` (by default the process's, read from `TL_*` environment variables)."""
    settings = settings or get_settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not logging.getLogger().handlers:  # under uvicorn, only its own loggers have handlers
            logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("service").setLevel(settings.log_level)
        services = build_services(settings, metrics)
        app.state.services = services
        interval = reaper_interval(settings.job_lost_seconds)
        stop = asyncio.Event()
        reaper = asyncio.create_task(run_reaper(services.jobs, settings.job_lost_seconds, interval, stop,
                                                models=services.registry.store),
                                     name="tl-reaper")
        try:
            yield
        finally:
            stop.set()
            try:
                await asyncio.wait_for(reaper, SHUTDOWN_STEP_SECONDS)
            except TimeoutError:  # stuck on an unreachable Redis: cancelled by wait_for
                log.warning("the reaper did not stop in time; cancelled")
            services.cache.clear()
            services.executor.shutdown(wait=False, cancel_futures=True)
            if services.jobs.feed is not None:
                await services.jobs.feed.close()
            with suppress(TimeoutError):
                await asyncio.wait_for(services.jobs.store.close(), SHUTDOWN_STEP_SECONDS)
            services.celery.close()

    app = FastAPI(title=TITLE, version=VERSION, description=DESCRIPTION, lifespan=lifespan, redoc_url=None,
                  generate_unique_id_function=operation_id,
                  openapi_tags=[
                      {"name": "jobs", "description": "training jobs"},
                      {"name": "datasets", "description": "upload your own labelled images"},
                      {"name": "models", "description": "the model registry and aliases"},
                      {"name": "predict", "description": "classify images"},
                      {"name": "operations", "description": "health, readiness and metrics (no key needed)"},
                  ])
    app.state.settings = settings
    install_error_handlers(app)
    # Predict first: routes are matched in order, and its requests are the ones that come by the hundred per
    # second, and matching them after the job and model routes costs several times more (no paths overlap).
    for module in (predict, oip, tfserving, jobs, datasets, models, ops, ui):
        app.include_router(module.router)
    # Added last = outermost: metrics see every answer, including the guard's 401 and 413.
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_upload_bytes,
                       max_dataset_bytes=settings.max_dataset_bytes, allowed_hosts=settings.allowed_host_names)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes, tags=app.openapi_tags)
            app.openapi_schema = _polish_openapi(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def operation_id(route: APIRoute) -> str:
    """The OpenAPI operationId of a route: its function's name in camelCase, `read_*` as `get*`
    (`create_job` -> `createJob`, `read_model` -> `getModel`), the names generated clients give their methods."""
    words = route.name.split("_")
    if words[0] == "read":
        words[0] = "get"
    return words[0] + "".join(word.capitalize() for word in words[1:])


def _polish_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Errors documented as problem+json only (FastAPI's default 422 shape is not what we answer),
    and the bearer scheme declared on every /v1 operation."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http", "scheme": "bearer", "description": "TL_API_KEY (only when the server sets one)"}
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if is_protected(path):
                operation["security"] = [{"bearerAuth": []}, {}]
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status[:1] in "45":
                    if PROBLEM_CONTENT_TYPE in content or "HTTPValidationError" in str(content):
                        response["content"] = {PROBLEM_CONTENT_TYPE: {"schema": problem_ref}}
    for name in ("HTTPValidationError", "ValidationError"):
        if name not in str(schema["paths"]):
            components.get("schemas", {}).pop(name, None)
    return schema


app = create_app()
