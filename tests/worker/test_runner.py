"""The task's bookkeeping against a real Redis: the engine's reporter, the heartbeat, the outcome writes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis
import testkit

from worker.jobstore import EpochRecord, JobStore, Progress, cancel_key, utc_now
from worker.runner import (
    CANCEL_POLL_SECONDS,
    PROGRESS_INTERVAL_SECONDS,
    Heartbeat,
    JobReporter,
    WorkerStopped,
    _StopOnSigterm,
)
from worker.spec import JobCreate


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_url(redis_server: testkit.RedisServer) -> str:
    return redis_server.url(testkit.RUNNER_DB)


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield JobStore(client)
    client.flushdb()
    client.close()


def running_job(store: JobStore) -> str:
    job = store.create(JobCreate(model="baseline", epochs=2))
    assert store.update(job.id, {"status": "running", "started_at": utc_now()}, from_statuses=["queued"])
    return job.id


def epoch(n: int) -> EpochRecord:
    return EpochRecord(epoch=n, loss=1.0 / n, accuracy=0.1 * n, val_loss=1.1 / n, val_accuracy=0.09 * n, seconds=1.5)


def test_progress_writes_are_throttled(store: JobStore) -> None:
    job_id, clock = running_job(store), Clock()
    reporter = JobReporter(store, job_id, Progress(stage="training", epochs=2), clock=clock)

    reporter.progress(0.10)
    clock.now += PROGRESS_INTERVAL_SECONDS / 2
    reporter.progress(0.20)
    first = store.get(job_id)
    clock.now += PROGRESS_INTERVAL_SECONDS
    reporter.progress(0.30)
    second = store.get(job_id)

    assert first is not None and first.progress.fraction == 0.10
    assert second is not None and second.progress.fraction == 0.30
    assert second.progress.stage == "training"


def test_stage_and_epoch_end_are_written_at_once(store: JobStore) -> None:
    job_id, clock = running_job(store), Clock()
    reporter = JobReporter(store, job_id, Progress(stage="loading_data", epochs=2), clock=clock)

    reporter.stage("training")
    reporter.epoch_end(epoch(1))
    reporter.epoch_end(epoch(2))  # same instant: never throttled

    job = store.get(job_id)
    assert job is not None
    assert job.progress.stage == "training" and job.progress.epoch == 2
    assert [record.epoch for record in job.history] == [1, 2]
    assert job.history[1] == epoch(2)


def test_progress_never_goes_backwards(store: JobStore) -> None:
    job_id, clock = running_job(store), Clock()
    reporter = JobReporter(store, job_id, Progress(stage="training", epochs=2), clock=clock)
    reporter.progress(0.5)
    clock.now += 1
    reporter.progress(0.4)
    job = store.get(job_id)
    assert job is not None and job.progress.fraction == 0.5


def test_reporter_never_resurrects_a_finished_job_and_asks_the_engine_to_stop(store: JobStore) -> None:
    job_id, clock = running_job(store), Clock()
    reporter = JobReporter(store, job_id, Progress(stage="training", epochs=2), clock=clock)
    assert store.update(job_id, {"status": "failed", "finished_at": utc_now()}, from_statuses=["running"])

    reporter.epoch_end(epoch(1))

    job = store.get(job_id)
    assert job is not None and job.status == "failed" and job.history == []
    assert reporter.detached and reporter.cancel_requested()


def test_cancel_flag_is_read_at_most_every_poll_interval(store: JobStore) -> None:
    job_id, clock = running_job(store), Clock()
    reporter = JobReporter(store, job_id, Progress(stage="training", epochs=2), clock=clock)
    assert reporter.cancel_requested() is False

    store.redis.set(cancel_key(job_id), "1")
    seen_at_once = reporter.cancel_requested()
    clock.now += CANCEL_POLL_SECONDS
    seen_later = reporter.cancel_requested()

    assert seen_at_once is False
    assert seen_later is True


def test_reporter_writes_while_cancelling(store: JobStore) -> None:
    job_id, clock = running_job(store), Clock()
    assert store.update(job_id, {"status": "cancelling"}, from_statuses=["running"])
    reporter = JobReporter(store, job_id, Progress(stage="training", epochs=2), clock=clock)

    reporter.epoch_end(epoch(1))

    job = store.get(job_id)
    assert job is not None and job.status == "cancelling" and len(job.history) == 1


def test_heartbeat_stamps_the_job_until_stopped(store: JobStore) -> None:
    job_id = running_job(store)
    with Heartbeat(store, job_id, "w1@host", interval=0.05):
        time.sleep(0.3)
        during = float(store.get_raw(job_id)["heartbeat_at"])
    stopped = float(store.get_raw(job_id)["heartbeat_at"])
    time.sleep(0.2)

    assert abs(during - time.time()) < 1.0
    assert store.get_raw(job_id)["worker"] == "w1@host"
    assert float(store.get_raw(job_id)["heartbeat_at"]) == stopped  # no beat after the job



def test_sigterm_during_a_job_stops_it_at_the_next_cancel_check_even_inside_a_swallowing_except(
        store: JobStore) -> None:
    """The handler only flags; the next check raises WorkerStopped, which no best-effort `except` can eat."""
    reporter = JobReporter(store, running_job(store), Progress(stage="training"))
    previous = signal.getsignal(signal.SIGTERM)
    with _StopOnSigterm(reporter):
        try:  # what a best-effort write does: a raise from the handler here would be lost
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs in the main thread at the next bytecode
        except Exception:
            pytest.fail("the SIGTERM handler raised where the engine was, not at a cancel check")
        assert reporter.stop_requested
        with pytest.raises(WorkerStopped, match="SIGTERM"):
            reporter.cancel_requested()
    assert signal.getsignal(signal.SIGTERM) is previous  # restored after the job
