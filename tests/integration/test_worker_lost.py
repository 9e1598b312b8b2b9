"""A worker that dies mid-job: the job ends `failed` within a bounded time, and work goes on.

Runs last among the integration tests (file order): the second test kills the session's worker and
leaves a new one in its place.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from .harness import BASELINE_SMALL, LOST_SECONDS, Stack, submit, train, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.realdata]


def test_killed_pool_process_fails_its_job_at_once(stack: Stack, client: httpx.Client, realdata: None) -> None:
    # What the kernel's out-of-memory killer does: SIGKILL the process that runs the job, not the worker.
    job = submit(client, {"model": "baseline", "train_samples": 5000, "test_samples": 500, "epochs": 30,
                          "seed": 41})
    wait_job(client, job["id"], timeout=120, until=lambda j: j["progress"]["stage"] == "training")
    children = stack.pool_children()
    assert len(children) == 1

    os.kill(children[0], signal.SIGKILL)
    killed = time.monotonic()
    failed = wait_job(client, job["id"], timeout=LOST_SECONDS)  # well before the reaper would act

    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "WorkerLost", failed["error"]
    assert failed["model_id"] is None
    print(f"job failed {time.monotonic() - killed:.1f} s after its process was killed")
    # The worker replaces its pool process and takes the next job.
    assert stack.worker.running()
    train(client, {**BASELINE_SMALL, "seed": 42})


@pytest.mark.parametrize("target", ["process group", "parent alone"])
def test_stopped_worker_fails_its_running_job_and_exits(stack: Stack, client: httpx.Client, realdata: None,
                                                        target: str) -> None:
    # Ctrl-C on `make run` signals the worker's whole process group; `docker stop` signals only the Celery
    # parent, which must pass it on to the pool process running the job.
    job = submit(client, {"model": "baseline", "train_samples": 5000, "test_samples": 500, "epochs": 30,
                          "seed": 45})
    wait_job(client, job["id"], timeout=120, until=lambda j: j["progress"]["stage"] == "training")

    if target == "process group":
        stack.worker.signal_group(signal.SIGTERM)
    else:
        os.kill(stack.worker.pid, signal.SIGTERM)
    stopped = wait_job(client, job["id"], timeout=15)
    exit_status = stack.worker.process.wait(timeout=30) if stack.worker.process else None

    assert stopped["status"] == "failed"
    assert stopped["error"]["type"] == "WorkerStopped", stopped["error"]
    assert stopped["model_id"] is None
    assert exit_status == 0  # Celery's warm shutdown: the job ended, then the worker left cleanly
    stack.start_worker()
    stack.wait_ready(min_workers=1)


@pytest.mark.slow
def test_killed_worker_mid_transfer_job_fails_it_and_a_new_worker_takes_over(
        stack: Stack, client: httpx.Client, weights: None) -> None:
    job = submit(client, {"model": "transfer", "train_samples": 3000, "test_samples": 500, "epochs": 5,
                          "image_size": 96, "seed": 43})
    wait_job(client, job["id"], timeout=180,
             until=lambda j: j["progress"]["stage"] in ("extracting_features", "training"))

    stack.kill_worker()  # kill -9 of the worker's processes: no chance to record anything
    killed = time.monotonic()
    lost = wait_job(client, job["id"], timeout=150)
    took = time.monotonic() - killed

    assert lost["status"] == "failed"
    assert lost["error"]["type"] == "WorkerLost", lost["error"]
    assert "heartbeat" in lost["error"]["message"]
    assert lost["model_id"] is None
    print(f"job of the killed worker failed {took:.1f} s after the kill (TL_JOB_LOST_SECONDS={LOST_SECONDS})")

    stack.start_worker()
    stack.wait_ready(min_workers=1)
    done = train(client, {**BASELINE_SMALL, "seed": 44})
    assert done["status"] == "succeeded"
