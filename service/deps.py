"""What routes depend on: the settings and the services built in the app's lifespan, as `Annotated` aliases.

The providers are `async def` although they never await: FastAPI runs a plain `def` dependency in its
thread pool, and each such hand-off costs more CPU than the dependency itself.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from service.datasets import DatasetService
from service.errors import UnsupportedMediaType
from service.housekeeping import WorkerCensus
from service.jobs import JobService
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from service.serving.cache import ModelCache
from worker.config import Settings


@dataclass
class Services:
    """Everything the routes share, created once per app in its lifespan."""

    settings: Settings
    jobs: JobService
    datasets: DatasetService
    registry: ModelRegistry
    cache: ModelCache
    celery: Celery
    metrics: ServiceMetrics
    workers: WorkerCensus
    executor: ThreadPoolExecutor


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with (override in tests with `app.dependency_overrides`)."""
    settings: Settings = request.app.state.settings
    return settings


def services_of(request: Request) -> Services:
    """The services the app's lifespan built."""
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    return services_of(request)


async def get_job_service(request: Request) -> JobService:
    return services_of(request).jobs


async def get_dataset_service(request: Request) -> DatasetService:
    return services_of(request).datasets


async def get_registry(request: Request) -> ModelRegistry:
    return services_of(request).registry


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
JobServiceDep = Annotated[JobService, Depends(get_job_service)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
DatasetServiceDep = Annotated[DatasetService, Depends(get_dataset_service)]
