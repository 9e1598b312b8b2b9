"""The API's reaper beyond the basics: the grace after Redis comes back, stranded queued jobs sent again, and a
lost job whose model was published recorded `succeeded` (real Redis, real artifact store)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from fastapi.testclient import TestClient
from svc_helpers import add_model

from service.watch import RedisWatch
from worker.jobstore import NOW, JobStore, job_key, utc_now
from worker.queue import TRAINING_QUEUE
from worker.spec import JobCreate

SMALL = {"model": "baseline", "train_samples": 100, "test_samples": 100, "epochs": 1}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reaping_waits_a_grace_after_redis_was_unreachable() -> None:
    clock = Clock()
    watch = RedisWatch(45, clock=clock)
    assert watch.reaping_allowed()  # no outage seen
    watch.failed()
    assert not watch.reaping_allowed()
    clock.now += 120
    watch.answered()
    assert not watch.reaping_allowed()  # heartbeats could not land while Redis was gone
    clock.now += 44
    assert not watch.reaping_allowed()
    clock.now += 2
    assert watch.reaping_allowed()


def test_a_read_does_not_reap_during_the_grace(client: TestClient, job_store: JobStore) -> None:
    job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    job_store.update(job_id, {"status": "running", "heartbeat_at": f"{time.time() - 3600:.3f}"}, ["queued"])
    services = client.app.state.services  # type: ignore[attr-defined]
    services.jobs.watch.failed()
    services.jobs.watch.answered()
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


def _queued_ids(redis_db: redis.Redis) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in redis_db.lrange(TRAINING_QUEUE, 0, -1)]


def test_a_queued_job_whose_message_was_lost_is_sent_again_once(client: TestClient, job_store: JobStore,
                                                               redis_db: redis.Redis) -> None:
    sent = client.post("/v1/jobs", json=SMALL).json()["id"]
    stranded = job_store.create(JobCreate(**SMALL)).id  # recorded, but its API died before sending the task
    assert _queued_ids(redis_db) == [sent]
    jobs = client.app.state.services.jobs  # type: ignore[attr-defined]
    assert client.portal.call(jobs.resend_stranded, 0.0) == [stranded]  # type: ignore[union-attr]
    assert sorted(_queued_ids(redis_db)) == sorted([sent, stranded])
    assert client.portal.call(jobs.resend_stranded, 0.0) == []  # type: ignore[union-attr]  # on the queue now
    assert client.portal.call(jobs.resend_stranded, 3600.0) == []  # type: ignore[union-attr]  # too young anyway


def test_the_reaper_records_success_from_a_model_published_before_its_worker_died(
        client: TestClient, job_store: JobStore, settings: Any, trained_model: Any) -> None:
    job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    model_id = "m_publishedbeforedeath"
    add_model(settings.artifact_dir, trained_model, model_id)
    job_store.update(job_id, {"status": "running", "started_at": utc_now(), "heartbeat_at": NOW,
                              "pending_model_id": model_id}, ["queued"])
    now = float(job_store.redis.time()[0])
    job_store.redis.hset(job_key(job_id), "heartbeat_at", f"{now - 3600:.3f}")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["model_id"] == model_id and job["error"] is None
    assert job["metrics"]["test_accuracy"] > 0
    assert client.get(f"/v1/models/{model_id}").json()["id"] == model_id
