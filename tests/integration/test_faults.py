"""Faults with real processes: Redis stopping and losing its data, the API restarting mid-job, the disk
filling up while a model is saved, a model deleted under in-flight predictions, and a burst of jobs.

These tests run on a stack of their own (`FaultStack`): its Redis is always a private redis-server (so it
can be stopped and restarted without touching anyone else's), and its worker can be replaced by one with
a file-size limit.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import testkit

from service.launcher import Child, local_redis_argv, redis_answers, uvicorn_argv

from .harness import (
    BASELINE_SMALL,
    Stack,
    cifar10_test_images,
    png_bytes,
    submit,
    train,
    wait_for,
    wait_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.realdata]

PROBLEM = "application/problem+json"


class FaultStack(Stack):
    """A Stack whose Redis is always a private server that tests may stop, restart and wipe."""

    def __init__(self) -> None:
        super().__init__(private_redis=True)

    @property
    def redis_port(self) -> int:
        return int(self.redis_url.rsplit(":", 1)[1].split("/")[0])

    def stop_redis(self) -> None:
        assert self.redis_child is not None
        self.redis_child.stop(grace=2)

    def restart_redis(self) -> None:
        self.redis_child = Child("redis", local_redis_argv(self.redis_port, self.tmp), die_with_parent=True)
        self.redis_child.start(log_file=self.logs / "redis.log")
        wait_for(lambda: redis_answers(self.redis_url, timeout=0.5), 15, what="redis to restart")

    def restart_api(self) -> None:
        assert self.api is not None
        port = int(self.base_url.rsplit(":", 1)[1])
        self.api.stop(grace=10)
        self.api = self._spawn("api", uvicorn_argv("127.0.0.1", port, "info"))
        self.wait_ready(min_workers=1)

    def replace_worker(self, argv_prefix: list[str]) -> None:
        """Stop the current worker and start one whose command starts with `argv_prefix` (e.g. a ulimit)."""
        from service.launcher import celery_worker_argv

        self.worker.stop(grace=10)
        index = len(self.workers) + 1
        argv = [*argv_prefix, *celery_worker_argv(f"fault{index}@%h")]
        self.workers.append(self._spawn(f"worker{index}", argv))
        self.wait_ready(min_workers=1)


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultStack]:
    testkit.require_data()
    stack = FaultStack().start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def api(faults: FaultStack) -> Iterator[httpx.Client]:
    with faults.client(timeout=30) as client:
        yield client


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"], body
    return dict(body)


def test_redis_stop_answers_503_and_recovers(faults: FaultStack, api: httpx.Client) -> None:
    model = train(api, {**BASELINE_SMALL, "seed": 11})["model_id"]
    faults.stop_redis()
    try:
        start = time.monotonic()
        ready = api.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["redis"] == "error"
        _problem(api.get("/v1/jobs"), 503)
        _problem(api.get("/v1/jobs/j_0123456789abcdef"), 503)
        _problem(api.post("/v1/jobs", json=BASELINE_SMALL), 503)
        took = time.monotonic() - start
        assert took < 20, f"five requests with Redis down took {took:.1f} s"
        # The artifact store is the source of truth: models and predict need no Redis.
        assert api.get(f"/v1/models/{model}").status_code == 200
        image = png_bytes(cifar10_test_images(1)[0][0])
        assert api.post(f"/v1/models/{model}/predict", content=image,
                        headers={"Content-Type": "image/png"}).status_code == 200
    finally:
        faults.restart_redis()
    wait_for(lambda: api.get("/readyz").status_code == 200, 30, what="/readyz to recover")
    wait_for(lambda: api.get("/v1/jobs").status_code == 200, 30, what="job endpoints to recover")
    # The worker reconnects by itself and takes new work.
    faults.wait_ready(min_workers=1, timeout=60)
    assert train(api, {**BASELINE_SMALL, "seed": 12})["status"] == "succeeded"


def test_redis_losing_everything_keeps_every_model(faults: FaultStack, api: httpx.Client) -> None:
    job = train(api, {**BASELINE_SMALL, "seed": 13, "name": "survivor"})
    model = job["model_id"]
    assert api.put("/v1/aliases/keeper", json={"model_id": model}).status_code == 200

    faults.redis().flushall()

    listed = api.get("/v1/models").json()["items"]
    assert model in [m["id"] for m in listed]
    info = api.get("/v1/models/keeper").json()
    assert info["id"] == model and info["name"] == "survivor" and info["metrics"] == job["metrics"]
    image = png_bytes(cifar10_test_images(1)[0][0])
    assert api.post(f"/v1/models/{model}/predict", content=image,
                    headers={"Content-Type": "image/png"}).status_code == 200
    weights = api.get(f"/v1/models/{model}/weights")
    assert weights.status_code == 200 and len(weights.content) > 10_000
    assert api.get(f"/v1/models/{model}/curves.png").headers["content-type"] == "image/png"
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 404  # the job record itself was in Redis
    # New jobs still reach the worker after the wipe (the queue is declared again).
    assert train(api, {**BASELINE_SMALL, "seed": 14})["status"] == "succeeded"


def test_api_restart_mid_job_loses_nothing(faults: FaultStack, api: httpx.Client) -> None:
    body = {"model": "baseline", "train_samples": 3000, "test_samples": 300, "epochs": 6, "seed": 15}
    job = submit(api, body)
    wait_job(api, job["id"], timeout=120, until=lambda j: j["status"] == "running" and j["progress"]["epoch"] >= 1)

    faults.restart_api()

    events: list[dict[str, Any]] = []
    with faults.client(timeout=300) as fresh, fresh.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events, "the re-opened stream sent nothing"
    final = events[-1]
    assert final["status"] == "succeeded", final
    assert [h["epoch"] for h in final["history"]] == list(range(1, body["epochs"] + 1))
    assert api.get(f"/v1/models/{final['model_id']}").status_code == 200


def test_disk_full_while_saving_fails_the_job_and_lists_nothing(faults: FaultStack, api: httpx.Client) -> None:
    models_before = {m["id"] for m in api.get("/v1/models").json()["items"]}
    # RLIMIT_FSIZE: every write past 256 KiB fails with EFBIG, as on a full disk (Python ignores SIGXFSZ).
    faults.replace_worker(["bash", "-c", 'ulimit -f 256 && exec "$@"', "worker-with-full-disk"])
    try:
        failed = wait_job(api, submit(api, {**BASELINE_SMALL, "seed": 16})["id"], timeout=300)
    finally:
        faults.replace_worker([])
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"] == "ArtifactWriteError", failed["error"]
    assert "too large" in failed["error"]["message"].lower() or "space" in failed["error"]["message"].lower()
    assert failed["model_id"] is None
    assert {m["id"] for m in api.get("/v1/models").json()["items"]} == models_before
    staging = faults.artifact_dir / "models" / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    complete = {p.name for p in (faults.artifact_dir / "models").iterdir() if not p.name.startswith(".")}
    assert complete == models_before


def test_model_deleted_under_inflight_predictions_never_500(faults: FaultStack, api: httpx.Client) -> None:
    model = train(api, {**BASELINE_SMALL, "seed": 17})["model_id"]
    images = [png_bytes(image) for image in cifar10_test_images(8)[0]]
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with faults.client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                files = [("file", (f"{k}.png", images[(i + k) % len(images)], "image/png")) for k in range(4)]
                statuses.append(client.post(f"/v1/models/{model}/predict", files=files).status_code)
                i += 1

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: statuses.count(200) >= 8, 60, interval=0.05, what="predictions to flow")
    assert api.delete(f"/v1/models/{model}").status_code == 204
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert set(statuses) <= {200, 404}, sorted(set(statuses))
    assert 404 in statuses
    assert api.post(f"/v1/models/{model}/predict", content=images[0],
                    headers={"Content-Type": "image/png"}).status_code == 404


#: Jobs sent at once: each costs its worker a fresh pool child (a TensorFlow import, about 9 s here), so twenty
#: (three minutes) show what fifty did: none lost, none run twice, one model each.
JOBS = 20


@pytest.mark.slow
def test_twenty_jobs_at_once_all_finish_and_none_runs_twice(faults: FaultStack, api: httpx.Client) -> None:
    models_before = {m["id"] for m in api.get("/v1/models").json()["items"]}
    tiny = {"model": "baseline", "train_samples": 100, "test_samples": 100, "epochs": 1, "batch_size": 64}
    results: list[httpx.Response] = []

    def post(seed: int) -> None:
        with faults.client(timeout=30) as client:
            results.append(client.post("/v1/jobs", json={**tiny, "seed": seed}))

    threads = [threading.Thread(target=post, args=(seed,)) for seed in range(100, 100 + JOBS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [202] * JOBS
    ids = [r.json()["id"] for r in results]
    assert len(set(ids)) == JOBS

    start = time.monotonic()
    finished = [wait_job(api, job_id, timeout=1500) for job_id in ids]
    print(f"{JOBS} jobs finished in {time.monotonic() - start:.0f} s")
    assert {j["status"] for j in finished} == {"succeeded"}, {j["id"]: j["error"] for j in finished}
    new_models = {m["id"] for m in api.get("/v1/models").json()["items"]} - models_before
    assert new_models == {j["model_id"] for j in finished}
    assert len(new_models) == JOBS
    for job in finished:
        assert job["started_at"] is not None and [h["epoch"] for h in job["history"]] == [1]
