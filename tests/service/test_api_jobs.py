"""POST/GET /v1/jobs, read, cancel, the reaper and Idempotency-Key, against the real local Redis."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from svc_helpers import assert_problem, make_settings

from worker.config import Settings
from worker.jobstore import JobStore, cancel_key, utc_now
from worker.queue import TRAIN_TASK, TRAINING_QUEUE, make_celery
from worker.spec import JobCreate

SMALL = {"model": "baseline", "train_samples": 100, "test_samples": 100, "epochs": 1}


def queued_tasks(redis_db: redis.Redis) -> list[dict[str, Any]]:
    """The Celery messages waiting on the training queue: (headers, decoded args)."""
    out = []
    for raw in redis_db.lrange(TRAINING_QUEUE, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "id": message["headers"]["id"], "args": body[0]})
    return out


def start_running(job_store: JobStore, job_id: str, heartbeat_age: float = 0.0) -> None:
    """Move a queued job to running the way the worker does (with a heartbeat)."""
    assert job_store.update(job_id, {"status": "running", "started_at": utc_now(),
                                     "heartbeat_at": f"{time.time() - heartbeat_age:.3f}"},
                            from_statuses=["queued"]) == "queued"


def test_create_job_answers_202_with_location_and_every_default(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={"model": "transfer"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["spec"] == {"model": "transfer", "dataset": "cifar10", "train_samples": 5000, "test_samples": 1000,
                           "epochs": 10, "batch_size": 32, "learning_rate": 0.001, "seed": 42, "name": None,
                           "image_size": 96, "alpha": 1.0, "dropout": 0.5, "dense_units": [128, 64],
                           "fine_tune_layers": 0, "fine_tune_epochs": 0, "fine_tune_learning_rate": 0.00001,
                           "class_weight": None, "augment": []}
    assert job["progress"] == {"stage": "queued", "epoch": 0, "epochs": 10, "fraction": 0.0}
    assert job["history"] == [] and job["metrics"] is None and job["model_id"] is None and job["error"] is None
    assert job["started_at"] is None and job["finished_at"] is None
    assert job["created_at"].endswith("Z")
    assert client.get(response.headers["location"]).json() == job


def test_create_job_sends_the_task_by_name_on_the_training_queue(client: TestClient,
                                                                 redis_db: redis.Redis) -> None:
    job = client.post("/v1/jobs", json=SMALL).json()
    assert queued_tasks(redis_db) == [{"task": TRAIN_TASK, "id": job["id"], "args": [job["id"]]}]


def test_baseline_spec_omits_transfer_fields(client: TestClient) -> None:
    job = client.post("/v1/jobs", json=SMALL).json()
    assert "alpha" not in job["spec"] and job["spec"]["epochs"] == 1
    assert job["progress"]["epochs"] == 1


def test_idempotency_key_returns_the_same_job(client: TestClient, redis_db: redis.Redis) -> None:
    first = client.post("/v1/jobs", json=SMALL, headers={"Idempotency-Key": "abc-123"})
    again = client.post("/v1/jobs", json=SMALL, headers={"Idempotency-Key": "abc-123"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    other = client.post("/v1/jobs", json=SMALL, headers={"Idempotency-Key": "another"})
    assert other.json()["id"] != first.json()["id"]
    assert len(queued_tasks(redis_db)) == 2
    assert len(client.get("/v1/jobs").json()["items"]) == 2


@pytest.mark.parametrize("body, where", [
    ({"model": "baseline", "colour": "red"}, ["body", "colour"]),
    ({"model": "resnet"}, ["body", "model"]),
    ({"model": "baseline", "epochs": 0}, ["body", "epochs"]),
    ({"model": "baseline", "train_samples": 99}, ["body", "train_samples"]),
    ({"model": "baseline", "learning_rate": 0}, ["body", "learning_rate"]),
    ({"model": "transfer", "alpha": 0.6}, ["body", "alpha"]),
    ({"model": "transfer", "dense_units": [1, 2, 3, 4, 5]}, ["body", "dense_units"]),
    ({"epochs": 3}, ["body", "model"]),
])
def test_invalid_job_fields_are_422_problems_listing_the_field(client: TestClient, body: dict[str, Any],
                                                               where: list[str]) -> None:
    problem = assert_problem(client.post("/v1/jobs", json=body), 422)
    assert any(error["loc"] == where for error in problem["errors"]), problem["errors"]
    assert all(set(error) >= {"loc", "msg"} for error in problem["errors"])


def test_transfer_only_fields_on_a_baseline_job_are_422(client: TestClient) -> None:
    problem = assert_problem(client.post("/v1/jobs", json={"model": "baseline", "image_size": 64}), 422,
                             "image_size")
    assert "transfer-only" in problem["errors"][0]["msg"]


def test_invalid_json_is_400(client: TestClient) -> None:
    response = client.post("/v1/jobs", content=b'{"model": "baseline",', headers={"content-type": "application/json"})
    assert_problem(response, 400, "not valid JSON")


def test_non_json_body_is_415(client: TestClient) -> None:
    response = client.post("/v1/jobs", content=b"model=baseline",
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert_problem(response, 415)


def test_a_json_array_body_is_422(client: TestClient) -> None:
    assert_problem(client.post("/v1/jobs", json=[SMALL]), 422)


def test_list_jobs_newest_first_filtered_and_paged(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json={**SMALL, "seed": i}).json()["id"] for i in range(5)]
    transfer = client.post("/v1/jobs", json={"model": "transfer", "epochs": 1}).json()["id"]
    listed = client.get("/v1/jobs").json()
    assert [job["id"] for job in listed["items"]] == [transfer, *reversed(ids)]
    assert listed["next_cursor"] is None
    assert [j["id"] for j in client.get("/v1/jobs", params={"model": "transfer"}).json()["items"]] == [transfer]

    seen: list[str] = []
    cursor = None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 2
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [transfer, *reversed(ids)]


def test_list_jobs_by_status(client: TestClient, job_store: JobStore) -> None:
    a = client.post("/v1/jobs", json=SMALL).json()["id"]
    b = client.post("/v1/jobs", json=SMALL).json()["id"]
    start_running(job_store, a)
    assert [j["id"] for j in client.get("/v1/jobs?status=running").json()["items"]] == [a]
    assert [j["id"] for j in client.get("/v1/jobs?status=queued").json()["items"]] == [b]
    assert client.get("/v1/jobs?status=failed").json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("query", ["status=done", "limit=0", "limit=abc", "model=cnn", "cursor=../../etc"])
def test_list_jobs_rejects_invalid_queries(client: TestClient, query: str) -> None:
    assert_problem(client.get(f"/v1/jobs?{query}"), 422)


def test_unknown_job_is_404(client: TestClient) -> None:
    assert_problem(client.get("/v1/jobs/j_0000000000000000"), 404, "j_0000000000000000")


@pytest.mark.parametrize("job_id", ["..%2F..%2Fetc%2Fpasswd", "a" * 65, "a.b", "%00", "j%20x", "..", "caf%C3%A9"])
def test_ids_that_are_not_ids_are_404(client: TestClient, job_id: str) -> None:
    for response in (client.get(f"/v1/jobs/{job_id}"), client.post(f"/v1/jobs/{job_id}/cancel"),
                     client.get(f"/v1/jobs/{job_id}/events")):
        assert_problem(response, 404)


def test_cancel_a_queued_job_cancels_it_at_once_and_revokes_the_task(client: TestClient,
                                                                     redis_db: redis.Redis) -> None:
    job = client.post("/v1/jobs", json=SMALL).json()
    listener = redis_db.pubsub()
    listener.psubscribe("*celery.pidbox*")  # Celery's broadcast of remote control commands
    listener.get_message(timeout=1)
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    cancelled = response.json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    commands = []
    deadline = time.monotonic() + 5
    while not commands and time.monotonic() < deadline:
        message = listener.get_message(timeout=0.5)
        if message and message["type"] == "pmessage":
            commands.append(json.loads(base64.b64decode(json.loads(message["data"])["body"])))
    listener.close()
    assert commands and commands[0]["method"] == "revoke"
    assert commands[0]["arguments"]["task_id"] == job["id"]


def test_cancel_a_running_job_asks_the_worker_to_stop(client: TestClient, job_store: JobStore,
                                                      redis_db: redis.Redis) -> None:
    job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    start_running(job_store, job_id)
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelling"
    assert redis_db.exists(cancel_key(job_id)) == 1
    assert job_store.cancel_requested(job_id)
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 202 and again.json()["status"] == "cancelling"


@pytest.mark.parametrize("terminal", ["succeeded", "failed", "cancelled"])
def test_cancel_a_finished_job_is_409(client: TestClient, job_store: JobStore, terminal: str) -> None:
    job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    job_store.update(job_id, {"status": terminal, "finished_at": utc_now()})
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel"), 409, terminal)


def test_cancel_unknown_job_is_404(client: TestClient) -> None:
    assert_problem(client.post("/v1/jobs/j_doesnotexist/cancel"), 404)


def test_reading_a_running_job_whose_worker_went_silent_fails_it(client: TestClient, job_store: JobStore) -> None:
    job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    start_running(job_store, job_id, heartbeat_age=3600)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["type"] == "WorkerLost" and "heartbeat" in job["error"]["message"]
    assert job["finished_at"] is not None


def test_reading_a_running_job_with_a_fresh_heartbeat_leaves_it_running(client: TestClient,
                                                                       job_store: JobStore) -> None:
    job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    start_running(job_store, job_id)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


def test_the_background_reaper_fails_lost_jobs_without_any_request(
        redis_url: str, artifact_dir: Any, app_client: Callable[[Settings], TestClient], job_store: JobStore) -> None:
    client = app_client(make_settings(redis_url, artifact_dir, job_lost_seconds=1.0))
    lost = client.post("/v1/jobs", json=SMALL).json()["id"]
    alive = client.post("/v1/jobs", json=SMALL).json()["id"]
    start_running(job_store, lost)
    start_running(job_store, alive)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job_store.heartbeat(alive, "test-worker")  # this one keeps beating
        record = job_store.get(lost)
        if record is not None and record.status != "running":
            break
        time.sleep(0.2)
    record = job_store.get(lost)
    assert record is not None and record.status == "failed" and record.error is not None
    assert record.error.type == "WorkerLost"
    assert job_store.get(alive).status == "running"  # type: ignore[union-attr]


def test_a_job_the_broker_refuses_is_failed_and_answers_503(client: TestClient, settings: Settings,
                                                            redis_db: redis.Redis) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]
    working = services.jobs.celery
    services.jobs.celery = make_celery(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    try:
        response = client.post("/v1/jobs", json=SMALL, headers={"Idempotency-Key": "k1"})
    finally:
        services.jobs.celery.close()
        services.jobs.celery = working
    assert_problem(response, 503, "marked failed")
    [job] = client.get("/v1/jobs").json()["items"]
    assert job["status"] == "failed" and job["error"]["type"] == "QueueUnavailable"
    retry = client.post("/v1/jobs", json=SMALL, headers={"Idempotency-Key": "k1"})
    assert retry.status_code == 202 and retry.json()["id"] != job["id"]  # the key did not stick to the failure


def test_job_endpoints_never_import_tensorflow(client: TestClient) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from fastapi.testclient import TestClient; from service.main import create_app;"
        "from worker.config import Settings;"
        f"s = Settings(redis_url={client.app.state.settings.redis_url!r}, artifact_dir='/nonexistent');"  # type: ignore[attr-defined]
        "c = TestClient(create_app(s)); c.__enter__();"
        "assert c.get('/v1/jobs').status_code == 200; assert c.get('/v1/models').status_code == 200;"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)); c.__exit__(None, None, None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_job_spec_round_trips_through_jobcreate(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"model": "transfer", "fine_tune_layers": 20, "fine_tune_epochs": 2}).json()
    assert JobCreate.model_validate(job["spec"]).public() == job["spec"]
    assert job["progress"]["epochs"] == 12


def test_empty_query_parameters_count_as_absent(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    response = client.get("/v1/jobs?status=&model=&limit=50&cursor=")  # API.md's template, as written
    assert response.status_code == 200
    assert [job["id"] for job in response.json()["items"]] == [job_id]
    assert client.get("/v1/jobs?limit=&status=queued").json()["items"][0]["id"] == job_id
