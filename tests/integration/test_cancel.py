"""Cancelling jobs through HTTP: a queued job never starts; a running one stops within seconds, keeps no model."""

from __future__ import annotations

import time

import httpx
import pytest
from celery.exceptions import TaskRevokedError

from worker.config import Settings
from worker.queue import make_celery

from .harness import BASELINE_SMALL, Stack, submit, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.realdata]

#: Long enough to be cancelled while it trains (minutes if left alone on 2 cores).
LONG_JOB = {"model": "baseline", "train_samples": 5000, "test_samples": 500, "epochs": 30, "seed": 21}


def model_dirs(stack: Stack) -> set[str]:
    models = stack.artifact_dir / "models"
    return {p.name for p in models.iterdir() if not p.name.startswith(".")} if models.is_dir() else set()


def test_cancel_a_queued_job_then_a_running_one(stack: Stack, client: httpx.Client, realdata: None) -> None:
    models_before = model_dirs(stack)
    running = submit(client, LONG_JOB)
    wait_job(client, running["id"], timeout=120,
             until=lambda job: job["status"] == "running" and job["progress"]["stage"] == "training")
    queued = submit(client, {**BASELINE_SMALL, "seed": 22})  # the only worker is busy: this one waits

    # A queued job is cancelled at once and never starts.
    response = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"

    # A running one stops within seconds and keeps no model.
    asked = time.monotonic()
    response = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] in ("cancelling", "cancelled")
    stopped = wait_job(client, running["id"], timeout=30)
    took = time.monotonic() - asked
    assert stopped["status"] == "cancelled", stopped
    assert stopped["model_id"] is None and stopped["metrics"] is None
    assert stopped["finished_at"] is not None
    assert took < 30
    print(f"running job cancelled in {took:.1f} s")

    # Terminal jobs refuse a second cancel.
    again = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")

    # The worker then gets the cancelled job's message and drops it (revoked by the API) or skips it (no
    # longer queued): either way nothing runs.
    broker = make_celery(Settings(redis_url=stack.redis_url))
    try:
        outcome = broker.AsyncResult(queued["id"]).get(timeout=180)
    except TaskRevokedError:
        outcome = "revoked"
    assert outcome in ("revoked", {"job_id": queued["id"], "status": "skipped"})
    final = client.get(f"/v1/jobs/{queued['id']}").json()
    assert final["status"] == "cancelled" and final["started_at"] is None
    assert model_dirs(stack) == models_before
