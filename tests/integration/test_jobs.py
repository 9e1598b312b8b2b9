"""Training jobs through HTTP only: real uvicorn, real Redis, a real Celery worker process."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from .harness import BASELINE_SMALL, Stack, submit

pytestmark = pytest.mark.integration

METRIC_FIELDS = {"train_accuracy", "test_accuracy", "test_loss", "params_total", "params_trainable",
                 "params_non_trainable", "train_seconds"}


@pytest.mark.realdata
def test_baseline_job_succeeds_with_a_model(client: httpx.Client, baseline_job: dict[str, Any]) -> None:
    job = baseline_job
    assert set(job["metrics"]) >= METRIC_FIELDS
    assert job["metrics"]["params_non_trainable"] == job["metrics"]["params_total"] - job["metrics"]["params_trainable"]
    assert [epoch["epoch"] for epoch in job["history"]] == [1]
    assert job["progress"] == {"stage": "done", "epoch": 1, "epochs": 1, "fraction": 1.0}
    assert job["error"] is None

    model = client.get(f"/v1/models/{job['model_id']}")
    assert model.status_code == 200
    assert model.json()["kind"] == "baseline" and model.json()["job_id"] == job["id"]
    assert model.json()["name"] == "it-baseline"


@pytest.mark.realdata
def test_transfer_job_succeeds_with_a_frozen_base(client: httpx.Client, transfer_job: dict[str, Any]) -> None:
    metrics = transfer_job["metrics"]
    assert metrics["params_trainable"] < metrics["params_total"] / 2  # the MobileNetV2 base stays frozen
    assert metrics["test_accuracy"] > 0.3  # chance is 0.1
    assert len(transfer_job["history"]) == transfer_job["spec"]["epochs"] == 3

    model = client.get(f"/v1/models/{transfer_job['model_id']}").json()
    assert model["kind"] == "transfer" and model["spec"]["image_size"] == 96
    assert model["metrics"] == metrics


def read_events(client: httpx.Client, job_id: str, timeout: float = 300) -> list[tuple[str, dict[str, Any]]]:
    """Every SSE event of a job until the server closes the stream."""
    events: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    name, data = "message", []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(30, read=timeout)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < deadline, "the event stream did not close after the job ended"
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data.append(line.split(":", 1)[1].strip())
            elif line == "" and data:
                events.append((name, json.loads("\n".join(data))))
                name, data = "message", []
    return events


@pytest.mark.realdata
def test_events_follow_a_job_in_order_and_close_after_the_end(client: httpx.Client, realdata: None) -> None:
    job = submit(client, {**BASELINE_SMALL, "epochs": 2, "seed": 5})

    events = read_events(client, job["id"])

    assert events, "no event"
    assert {name for name, _ in events} == {"job"}
    jobs = [data for _, data in events]
    assert all(data["id"] == job["id"] for data in jobs)
    order = ["queued", "running", "succeeded"]
    statuses = [data["status"] for data in jobs]
    assert statuses[-1] == "succeeded"
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)
    assert "running" in statuses
    epochs = [data["progress"]["epoch"] for data in jobs]
    assert epochs == sorted(epochs) and epochs[-1] == 2
    assert 1 in epochs  # the end of epoch 1 was an event of its own
    assert statuses.count("succeeded") == 1


@pytest.mark.realdata
def test_list_jobs_is_newest_first_with_a_cursor(client: httpx.Client, realdata: None) -> None:
    ids = [submit(client, {**BASELINE_SMALL, "seed": 100 + i})["id"] for i in range(3)]
    for job_id in ids:  # leave the worker free for the next tests
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (202, 409)

    first = client.get("/v1/jobs", params={"limit": 2})
    assert first.status_code == 200
    page = first.json()
    assert [job["id"] for job in page["items"]] == ids[::-1][:2]
    assert page["next_cursor"]
    second = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert second["items"][0]["id"] == ids[0]


def test_unknown_job_is_a_problem_404(client: httpx.Client) -> None:
    response = client.get("/v1/jobs/j_doesnotexist")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 404


def test_v1_needs_the_api_key(stack: Stack) -> None:
    anonymous = httpx.get(f"{stack.base_url}/v1/jobs", timeout=10)
    assert anonymous.status_code == 401
    assert httpx.get(f"{stack.base_url}/readyz", timeout=10).status_code == 200


def test_invalid_job_is_refused_and_nothing_is_queued(client: httpx.Client) -> None:
    before = client.get("/v1/jobs", params={"limit": 1}).json()["items"]
    response = client.post("/v1/jobs", json={"model": "baseline", "alpha": 0.5})
    assert response.status_code == 422
    assert response.json()["errors"]
    after = client.get("/v1/jobs", params={"limit": 1}).json()["items"]
    assert [j["id"] for j in after] == [j["id"] for j in before]

