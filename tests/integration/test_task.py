"""The Celery task `tl.train` in a real worker process, driven through the job store and the broker (no HTTP)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import Celery

from worker.config import Settings
from worker.jobstore import TERMINAL, Job, JobStore, job_key, new_job_id, utc_now
from worker.queue import TRAIN_TASK, TRAINING_QUEUE, make_celery
from worker.spec import JobCreate

from .harness import BASELINE_SMALL, Stack, train_split_size, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker(stack: Stack) -> Celery:
    return make_celery(Settings(redis_url=stack.redis_url))


@pytest.fixture(scope="module")
def store(stack: Stack) -> JobStore:
    return JobStore.from_url(stack.redis_url)


def send(broker: Celery, job_id: str) -> Any:
    """What the API does: send the task by name, with the job id as the task id."""
    return broker.send_task(TRAIN_TASK, args=[job_id], task_id=job_id, queue=TRAINING_QUEUE)


def wait_terminal(store: JobStore, job_id: str, timeout: float = 300) -> Job:
    def terminal() -> Job | None:
        job = store.get(job_id)
        return job if job is not None and job.status in TERMINAL else None

    return wait_for(terminal, timeout, what=f"job {job_id} to finish")


@pytest.mark.realdata
def test_task_runs_a_queued_job_to_success(stack: Stack, broker: Celery, store: JobStore, realdata: None) -> None:
    job = store.create(JobCreate.model_validate({**BASELINE_SMALL, "seed": 3}))
    send(broker, job.id)

    done = wait_terminal(store, job.id)

    assert done.status == "succeeded", done.error
    assert done.model_id is not None
    assert (stack.artifact_dir / "models" / done.model_id / "model.keras").is_file()
    assert [record.epoch for record in done.history] == [1]
    assert done.progress.stage == "done" and done.progress.fraction == 1.0
    assert done.metrics is not None and 0.0 <= done.metrics.test_accuracy <= 1.0
    assert done.error is None
    assert done.started_at is not None and done.finished_at is not None
    assert done.created_at <= done.started_at <= done.finished_at
    raw = store.get_raw(job.id)
    assert float(raw["heartbeat_at"]) > 0 and raw["worker"].startswith("it")
    assert raw["attempts"] == "1"


def test_task_does_not_run_a_job_that_is_no_longer_queued(broker: Celery, store: JobStore) -> None:
    job = store.create(JobCreate.model_validate(BASELINE_SMALL))
    assert store.update(job.id, {"status": "cancelled", "finished_at": utc_now()}, from_statuses=["queued"])

    result = send(broker, job.id).get(timeout=180)

    assert result == {"job_id": job.id, "status": "skipped"}
    after = store.get(job.id)
    assert after is not None
    assert after.status == "cancelled" and after.started_at is None and after.model_id is None


def test_task_ignores_an_unknown_job(broker: Celery, store: JobStore) -> None:
    job_id = new_job_id()

    result = send(broker, job_id).get(timeout=180)

    assert result == {"job_id": job_id, "status": "skipped"}
    assert store.get(job_id) is None


@pytest.mark.realdata
def test_task_records_an_engine_error_as_failed(broker: Celery, store: JobStore, realdata: None) -> None:
    if train_split_size() >= 50000:
        pytest.skip("TL_DATA_DIR holds the full training split: no sample count is too large for it")
    # More training images than the data set holds: the engine refuses the spec with a message.
    job = store.create(JobCreate.model_validate({**BASELINE_SMALL, "train_samples": 50000}))
    send(broker, job.id)

    done = wait_terminal(store, job.id)

    assert done.status == "failed"
    assert done.error is not None and done.error.type == "InvalidSpec", done.error
    assert "50000" in done.error.message
    assert done.model_id is None and done.metrics is None


def test_task_records_an_unreadable_spec_as_failed(broker: Celery, store: JobStore) -> None:
    job = store.create(JobCreate.model_validate(BASELINE_SMALL))
    store.redis.hset(job_key(job.id), "spec", json.dumps({**BASELINE_SMALL, "epochs": 0}))

    send(broker, job.id)
    done = wait_terminal(store, job.id, timeout=180)

    assert done.status == "failed"
    assert done.error is not None and done.error.type == "TrainingError"
    assert "epochs" in done.error.message
    assert done.started_at is not None and done.model_id is None
