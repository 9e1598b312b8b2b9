"""Without Redis: job endpoints answer 503 problems, models and predict keep working, and the API recovers by
itself when Redis is back (a real redis-server of the test's own, stopped and started again)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from svc_helpers import add_model, assert_problem, make_settings, png

from service.launcher import free_port, local_redis_argv, redis_answers
from worker.config import Settings

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture
def down(artifact_dir: Path, app_client: Callable[[Settings], TestClient]) -> TestClient:
    return app_client(make_settings(DEAD_REDIS, artifact_dir))


def test_readyz_is_503_with_the_contract_body(down: TestClient) -> None:
    response = down.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"redis": "error", "workers": 0}


def test_healthz_and_metrics_still_answer(down: TestClient) -> None:
    assert down.get("/healthz").status_code == 200
    metrics = down.get("/metrics")
    assert metrics.status_code == 200 and "tl_job_store_up 0.0" in metrics.text


@pytest.mark.parametrize("method, path, body", [
    ("post", "/v1/jobs", {"model": "baseline"}), ("get", "/v1/jobs", None), ("get", "/v1/jobs/j_abc", None),
    ("post", "/v1/jobs/j_abc/cancel", None), ("get", "/v1/jobs/j_abc/events", None),
])
def test_job_endpoints_answer_503(down: TestClient, method: str, path: str, body: dict | None) -> None:
    response = down.request(method, path, json=body)
    assert_problem(response, 503, "Redis")


@pytest.mark.realdata
def test_models_and_predict_work_without_redis(down: TestClient, artifact_dir: Path, trained_model: Path) -> None:
    add_model(artifact_dir, trained_model, "m_noredis")
    assert [m["id"] for m in down.get("/v1/models").json()["items"]] == ["m_noredis"]
    assert down.put("/v1/aliases/default", json={"model_id": "m_noredis"}).status_code == 200
    one = [("file", ("a.png", png(np.zeros((32, 32, 3))), "image/png"))]
    response = down.post("/v1/predict", files=one)
    assert response.status_code == 200 and response.json()["model_id"] == "m_noredis"
    assert down.get("/v1/models/default/weights").status_code == 200


class RedisProcess:
    """A redis-server of our own on a fixed port, to stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(local_redis_argv(self.port, self.workdir), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not redis_answers(self.url, timeout=0.5):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.timeout(120)
def test_the_api_recovers_by_itself_when_redis_comes_back(own_redis: RedisProcess, artifact_dir: Path,
                                                          app_client: Callable[[Settings], TestClient]) -> None:
    client = app_client(make_settings(own_redis.url, artifact_dir))
    assert client.post("/v1/jobs", json={"model": "baseline", "epochs": 1}).status_code == 202
    assert client.get("/readyz").status_code == 200

    own_redis.stop()
    assert_problem(client.get("/v1/jobs"), 503)
    assert_problem(client.post("/v1/jobs", json={"model": "baseline"}), 503)
    assert client.get("/readyz").json() == {"redis": "error", "workers": 0}

    own_redis.start()  # same port, empty (no persistence)
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the API did not reconnect"
        time.sleep(0.2)
    assert client.get("/v1/jobs").json() == {"items": [], "next_cursor": None}
    assert client.post("/v1/jobs", json={"model": "baseline", "epochs": 1}).status_code == 202
    assert len(client.get("/v1/jobs").json()["items"]) == 1
