"""The job record's guarantees against a real Redis: Redis' clock for heartbeats, the active index, reaping a job
whose worker published its model before dying, and no record recreated by a late heartbeat."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import testkit

from worker.jobstore import ACTIVE_KEY, NOW, JobStore, Metrics, Progress, job_key, utc_now
from worker.runner import JobReporter, _record_success
from worker.spec import JobCreate

SMALL = JobCreate(model="baseline", epochs=2)


@pytest.fixture
def store(redis_server: testkit.RedisServer) -> Iterator[JobStore]:
    client = redis.Redis.from_url(redis_server.url(testkit.RUNNER_DB), decode_responses=True)
    client.flushdb()
    yield JobStore(client)
    client.flushdb()
    client.close()


def claim(store: JobStore, model_id: str = "m_pending") -> str:
    """A queued job claimed the way the runner claims it (Redis' clock, the model id it will publish)."""
    job = store.create(SMALL)
    assert store.update(job.id, {"status": "running", "started_at": utc_now(), "heartbeat_at": NOW,
                                 "pending_model_id": model_id}, from_statuses=["queued"])
    return job.id


def age_heartbeat(store: JobStore, job_id: str, seconds: float) -> None:
    now = float(store.redis.time()[0])
    store.redis.hset(job_key(job_id), "heartbeat_at", f"{now - seconds:.3f}")


METRICS = {"train_accuracy": 0.6, "test_accuracy": 0.5, "test_loss": 1.4, "params_total": 10, "params_trainable": 10,
           "params_non_trainable": 0, "train_seconds": 12.0}


def metadata(model_id: str) -> dict[str, Any]:
    epochs = [{"epoch": n, "loss": 1.5 / n, "accuracy": 0.3 * n, "val_loss": 1.6 / n, "val_accuracy": 0.25 * n,
               "seconds": 1.0} for n in (1, 2)]
    return {"id": model_id, "created_at": "2026-12-01T10:00:00.000Z", "metrics": METRICS, "history": epochs}


def test_a_worker_clock_far_behind_does_not_get_its_job_reaped(store: JobStore,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = claim(store)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 40)  # the worker's clock, 40 s behind
    store.heartbeat(job_id, "slow-clock-worker")
    monkeypatch.undo()
    assert store.reap(job_id, lost_seconds=30) is None
    assert store.get(job_id).status == "running"  # type: ignore[union-attr]


def test_a_silent_job_is_failed_by_redis_clock(store: JobStore) -> None:
    job_id = claim(store)
    age_heartbeat(store, job_id, 31)
    outcome = store.reap(job_id, lost_seconds=30)
    assert outcome is not None and outcome.status == "failed"
    job = store.get(job_id)
    assert job is not None and job.status == "failed" and job.error is not None and job.error.type == "WorkerLost"
    assert store.redis.zcard(ACTIVE_KEY) == 0


def test_a_heartbeat_after_the_record_was_wiped_recreates_nothing(store: JobStore) -> None:
    job_id = claim(store)
    store.redis.flushdb()
    assert store.heartbeat(job_id, "w") is False
    assert not store.redis.exists(job_key(job_id))


def test_the_active_index_covers_every_active_job_however_many(store: JobStore) -> None:
    oldest = claim(store)
    age_heartbeat(store, oldest, 3600)
    ended = [store.create(SMALL).id for _ in range(1200)]
    for job_id in ended:
        store.update(job_id, {"status": "cancelled", "finished_at": utc_now()}, from_statuses=["queued"])
    waiting = store.create(SMALL).id
    assert set(store.active_ids()) == {oldest, waiting}
    outcome = store.reap(oldest, lost_seconds=45)
    assert outcome is not None and outcome.status == "failed"
    assert store.active_ids() == [waiting]


def test_a_lost_job_whose_model_was_published_is_recorded_succeeded(store: JobStore) -> None:
    job_id = claim(store, "m_done")
    age_heartbeat(store, job_id, 120)
    outcome = store.reap(job_id, 45, published=lambda model_id: metadata(model_id) if model_id == "m_done" else None)
    assert outcome is not None and outcome.status == "succeeded" and outcome.discard_model is None
    job = store.get(job_id)
    assert job is not None and job.status == "succeeded" and job.model_id == "m_done" and job.error is None
    assert job.metrics == Metrics.model_validate(METRICS) and len(job.history) == 2
    assert job.progress.stage == "done" and job.progress.fraction == 1.0


def test_a_lost_job_being_cancelled_ends_cancelled_and_its_model_is_to_be_removed(store: JobStore) -> None:
    job_id = claim(store, "m_unwanted")
    store.update(job_id, {"status": "cancelling"}, from_statuses=["running"])
    age_heartbeat(store, job_id, 120)
    outcome = store.reap(job_id, 45, published=metadata)
    assert outcome is not None and outcome.status == "cancelled" and outcome.discard_model == "m_unwanted"
    assert store.get(job_id).status == "cancelled"  # type: ignore[union-attr]


def _result(model_id: str) -> SimpleNamespace:
    return SimpleNamespace(model_id=model_id, metrics=Metrics.model_validate(METRICS))


def test_a_job_reaped_while_it_saved_is_recorded_succeeded_and_keeps_its_model(store: JobStore,
                                                                               tmp_path: Any) -> None:
    job_id = claim(store, "m_saved")
    age_heartbeat(store, job_id, 120)
    assert store.reap(job_id, 45).status == "failed"  # type: ignore[union-attr]  # e.g. a partition hid beats
    settings = SimpleNamespace(artifact_dir=tmp_path, artifact_url=None)
    reporter = JobReporter(store, job_id, Progress(stage="saving", epochs=2))
    job = store.get(job_id)
    assert _record_success(store, settings, job, reporter, _result("m_saved")) == "succeeded"  # type: ignore[arg-type]
    record = store.get(job_id)
    assert record is not None and record.status == "succeeded" and record.model_id == "m_saved"
    assert record.error is None


def test_a_job_cancelled_while_it_saved_discards_the_model(store: JobStore, tmp_path: Any) -> None:
    job_id = claim(store, "m_cancelled")
    store.update(job_id, {"status": "cancelling"}, from_statuses=["running"])
    models = tmp_path / "models" / "m_cancelled"
    models.mkdir(parents=True)
    (models / "metadata.json").write_text("{}")
    settings = SimpleNamespace(artifact_dir=tmp_path, artifact_url=None)
    reporter = JobReporter(store, job_id, Progress(stage="saving", epochs=2))
    job = store.get(job_id)
    assert _record_success(store, settings, job, reporter, _result("m_cancelled")) == "cancelled"  # type: ignore[arg-type]
    assert store.get(job_id).status == "cancelled"  # type: ignore[union-attr]
    assert not models.exists()
