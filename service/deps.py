"""What routes depend on: the settings and the services built in the app's lifespan, as `Annotated` aliases."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from service.errors import UnsupportedMediaType
from service.housekeeping import WorkerCensus
from service.inference import ModelCache
from service.metrics import ServiceMetrics
from worker.artifacts import ModelStore
from worker.config import Settings
from worker.jobs import AsyncJobStore


@dataclass
class Services:
    """Everything the routes share, created once per app in its lifespan."""

    settings: Settings
    jobs: AsyncJobStore
    models: ModelStore
    cache: ModelCache
    celery: Celery
    metrics: ServiceMetrics
    workers: WorkerCensus
    executor: ThreadPoolExecutor


def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with (override in tests with `app.dependency_overrides`)."""
    settings: Settings = request.app.state.settings
    return settings


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_job_store(request: Request) -> AsyncJobStore:
    return get_services(request).jobs


def get_model_store(request: Request) -> ModelStore:
    return get_services(request).models


def get_model_cache(request: Request) -> ModelCache:
    return get_services(request).cache


async def require_json(request: Request) -> None:
    """415 for a body that says it is not JSON (a missing Content-Type is read as JSON)."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"unsupported content type {media!r}: send application/json")


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ServicesDep = Annotated[Services, Depends(get_services)]
JobStoreDep = Annotated[AsyncJobStore, Depends(get_job_store)]
ModelStoreDep = Annotated[ModelStore, Depends(get_model_store)]
ModelCacheDep = Annotated[ModelCache, Depends(get_model_cache)]
