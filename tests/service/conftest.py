"""Fixtures of the service's unit tests: the session's Redis (database `testkit.SERVICE_DB`, flushed before
and after each test), a temporary artifact store, and `with TestClient(app)` so the lifespan runs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import testkit
from fastapi.testclient import TestClient
from svc_helpers import make_settings

from service.main import create_app
from worker.config import Settings
from worker.jobstore import JobStore


@pytest.fixture(scope="session")
def redis_url(redis_server: testkit.RedisServer) -> str:
    """The service tests' database on the session's Redis."""
    return redis_server.url(testkit.SERVICE_DB)


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


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


#: The engine's smallest job that is reliably above chance (measured: ~0.32 test accuracy, ~10 s on 2 cores).
TRAIN_SPEC = {"model": "baseline", "train_samples": 2000, "test_samples": 200, "epochs": 6, "batch_size": 32,
              "seed": 1, "name": "service-tests"}

_TRAIN_SCRIPT = """
import json, sys
from worker.config import Settings
from worker.spec import JobCreate
from worker.engine.pipeline import NullReporter, train_job
settings = Settings(artifact_dir=sys.argv[1], data_dir=sys.argv[2], allow_download=False)
result = train_job(JobCreate(**json.loads(sys.argv[3])), settings, NullReporter(), job_id="j_servicetests")
print(json.dumps({"model_dir": str(result.model_dir)}))
"""


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model directory written by the engine (`worker.engine.pipeline.train_job`), once per session.

    Trained in a child process, so TensorFlow never enters this one: like the API, the tests serve the
    model through LiteRT (the Keras fallback test imports TensorFlow on purpose)."""
    data = testkit.require_data()
    out = tmp_path_factory.mktemp("trained")
    done = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, str(out), str(data), json.dumps(TRAIN_SPEC)],
                          capture_output=True, text=True, timeout=900, cwd=testkit.REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return Path(json.loads(done.stdout.strip().splitlines()[-1])["model_dir"])
