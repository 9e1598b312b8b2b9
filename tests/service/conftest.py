"""Fixtures of the service's unit tests: the real local Redis (a database index of our own, flushed before
and after each test), a temporary artifact store, and `with TestClient(app)` so the lifespan runs."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from service.launcher import redis_answers, start_local_redis
from service.main import create_app
from worker.config import Settings
from worker.jobs import JobStore

#: Our own database index (the integration tests use 13, the default config 0).
SERVICE_TEST_DB = 12
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The local Redis on 6379, or a throwaway redis-server when none answers."""
    url = f"redis://127.0.0.1:6379/{SERVICE_TEST_DB}"
    child = None
    if not redis_answers(url):
        child, url = start_local_redis(url, tmp_path_factory.mktemp("redis"), sink=lambda name, line: None)
    yield url
    if child is not None:
        child.stop()


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def make_settings(redis_url: str, artifact_dir: Path, **overrides: Any) -> Settings:
    """Settings for one test; every value the tests rely on is given, so TL_* variables cannot leak in."""
    values: dict[str, Any] = {
        "redis_url": redis_url, "artifact_dir": artifact_dir, "data_dir": SHARED / "data",
        "weights_dir": SHARED / "weights", "api_key": None, "max_upload_bytes": 10 * 1024 * 1024, "max_batch": 64,
        "model_cache_size": 4, "batch_window_ms": 2.0, "serving_threads": 2, "job_lost_seconds": 45.0,
        "allow_download": False,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


@pytest.fixture
def settings(redis_url: str, artifact_dir: Path, redis_db: redis.Redis) -> Settings:
    return make_settings(redis_url, artifact_dir)


@pytest.fixture
def app_client(redis_db: redis.Redis) -> Iterator[Callable[[Settings], TestClient]]:
    """Build and start an app for given settings; every client is closed (lifespan ended) after the test."""
    clients: list[TestClient] = []

    def start(settings: Settings) -> TestClient:
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def client(settings: Settings, app_client: Callable[[Settings], TestClient]) -> TestClient:
    return app_client(settings)


@pytest.fixture
def job_store(redis_url: str, redis_db: redis.Redis) -> Iterator[JobStore]:
    """The worker's side of the job record, to move jobs along as a worker would."""
    store = JobStore.from_url(redis_url)
    yield store
    store.redis.close()


def assert_problem(response: Any, status: int, detail_contains: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem+json with `status`; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["type"] == "about:blank"
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if detail_contains is not None:
        assert detail_contains in body["detail"], body["detail"]
    return body


def image_bytes(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()
