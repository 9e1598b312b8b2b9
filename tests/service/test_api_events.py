"""GET /v1/jobs/{id}/events: Server-Sent Events over Redis pub/sub, until the job ends."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from svc_helpers import assert_problem

from service.jobs import JobService
from worker.jobstore import AsyncJobStore, EpochRecord, JobStore, Metrics, Progress, utc_now
from worker.spec import JobCreate

SMALL = {"model": "baseline", "train_samples": 100, "test_samples": 100, "epochs": 2}


def _history(epoch: int) -> list[EpochRecord]:
    return [EpochRecord(epoch=e, loss=2.0 / e, accuracy=0.2 * e, val_loss=2.1 / e, val_accuracy=0.2 * e, seconds=1.0)
            for e in range(1, epoch + 1)]


def worker_steps(job_store: JobStore, job_id: str) -> list[Any]:
    """What a worker writes, one change at a time (each must become one event)."""
    def running() -> None:
        job_store.update(job_id, {"status": "running", "started_at": utc_now(), "heartbeat_at": f"{time.time():.3f}",
                                  "progress": Progress(stage="loading_data", epochs=2)}, from_statuses=["queued"])

    def epoch(n: int) -> Any:
        return lambda: job_store.update(job_id, {"progress": Progress(stage="training", epoch=n, epochs=2,
                                                                      fraction=n / 2), "history": _history(n)})

    def succeeded() -> None:
        metrics = Metrics(train_accuracy=0.5, test_accuracy=0.4, test_loss=1.7, params_total=10, params_trainable=10,
                          params_non_trainable=0, train_seconds=3.0)
        job_store.update(job_id, {"status": "succeeded", "finished_at": utc_now(), "metrics": metrics,
                                  "model_id": "m_0123456789abcdef",
                                  "progress": Progress(stage="done", epoch=2, epochs=2, fraction=1.0)})

    return [running, epoch(1), epoch(2), succeeded]


def read_events(lines: Any, on_event: Any = None) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    name = None
    for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name or "message", json.loads(line.split(":", 1)[1])))
            if on_event is not None:
                on_event(events[-1][1])
    return events


@pytest.mark.timeout(60)
def test_events_follow_a_job_from_queued_to_succeeded(client: TestClient, job_store: JobStore) -> None:
    job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    steps = worker_steps(job_store, job_id)

    def advance(_: dict[str, Any]) -> None:  # the next change only after the previous one was seen
        if steps:
            steps.pop(0)()

    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response.iter_lines(), advance)
    assert [name for name, _ in events] == ["job"] * 5
    seen = [(job["status"], job["progress"]["stage"], job["progress"]["epoch"]) for _, job in events]
    assert seen == [("queued", "queued", 0), ("running", "loading_data", 0), ("running", "training", 1),
                    ("running", "training", 2), ("succeeded", "done", 2)]
    final = events[-1][1]
    assert final["id"] == job_id and final["model_id"] == "m_0123456789abcdef"
    assert final["metrics"]["test_accuracy"] == 0.4 and len(final["history"]) == 2


@pytest.mark.timeout(60)
def test_a_cancelled_job_ends_the_stream(client: TestClient, job_store: JobStore) -> None:
    job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    cancelled = []

    def cancel(_: dict[str, Any]) -> None:
        if not cancelled:
            cancelled.append(client.post(f"/v1/jobs/{job_id}/cancel").json()["status"])

    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = read_events(response.iter_lines(), cancel)
    assert cancelled == ["cancelled"]
    assert [job["status"] for _, job in events] == ["queued", "cancelled"]


def test_a_finished_job_sends_one_event_and_closes(client: TestClient, job_store: JobStore) -> None:
    job_id = client.post("/v1/jobs", json=SMALL).json()["id"]
    job_store.update(job_id, {"status": "failed", "finished_at": utc_now()})
    response = client.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200
    events = read_events(response.text.splitlines())
    assert len(events) == 1 and events[0][1]["status"] == "failed"


def test_events_of_an_unknown_job_are_404(client: TestClient) -> None:
    assert_problem(client.get("/v1/jobs/j_nope/events"), 404)


@pytest.mark.timeout(60)
def test_the_stream_sends_keep_alive_comments_and_polls_without_notices(redis_url: str, job_store: JobStore) -> None:
    created = job_store.create(JobCreate(**SMALL))

    async def collect() -> list[bytes]:
        store = AsyncJobStore(aioredis.Redis.from_url(redis_url, decode_responses=True))
        chunks: list[bytes] = []
        try:
            jobs = JobService(store, celery=None, lost_seconds=45, datasets=None)  # type: ignore[arg-type]  # unused here
            stream = jobs.events(created, poll_seconds=0.1, heartbeat_seconds=0.3)
            async for chunk in stream:
                chunks.append(chunk)
                if chunk.startswith(b":") and len(chunks) == 2:
                    # A change written without a pub/sub notice: the poll must still find it.
                    job_store.redis.hset(f"tl:job:{created.id}", mapping={"status": "cancelled"})
        finally:
            await store.redis.aclose()
        return chunks

    chunks = asyncio.run(asyncio.wait_for(collect(), 30))
    assert chunks[0].startswith(b"event: job\ndata: ") and chunks[0].endswith(b"\n\n")
    assert chunks[1] == b": keep-alive\n\n"
    assert json.loads(chunks[-1].split(b"data: ", 1)[1])["status"] == "cancelled"
