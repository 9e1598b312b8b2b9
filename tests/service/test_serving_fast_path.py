"""The lone request's short path (issue 14, item 3): refs resolved without a thread while the store's catalog
version holds, small images decoded on the event loop, and a lone request run on the event loop; none of it
may change what is answered, nor let a model deleted or published by another process go unseen."""

from __future__ import annotations

import asyncio
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from svc_helpers import add_model, assert_problem, cifar_test_images, png

from service.serving.batching import INLINE_MAX_IMAGES, MicroBatcher
from service.serving.runners import TFLiteRunner
from worker.store import TFLITE_FILE, ModelStore

pytestmark = pytest.mark.realdata

ONE = [("file", ("a.png", png(np.zeros((32, 32, 3))), "image/png"))]


def predicted(client: TestClient, ref: str) -> str:
    response = client.post(f"/v1/models/{ref}/predict", files=ONE)
    assert response.status_code == 200, response.text
    model_id: str = response.json()["model_id"]
    return model_id


def test_models_published_or_deleted_on_disk_are_seen_by_the_next_request(
        client: TestClient, artifact_dir: Path, trained_model: Path) -> None:
    add_model(artifact_dir, trained_model, "m_first", created_at="2026-01-01T00:00:00.000Z")
    assert predicted(client, "latest") == "m_first"
    assert predicted(client, "latest") == "m_first"  # kept
    add_model(artifact_dir, trained_model, "m_second", created_at="2026-02-01T00:00:00.000Z")  # another process
    assert predicted(client, "latest") == "m_second"
    assert predicted(client, "m_second") == "m_second"
    shutil.rmtree(artifact_dir / "models" / "m_second")
    assert predicted(client, "latest") == "m_first"
    assert_problem(client.post("/v1/models/m_second/predict", files=ONE), 404, "m_second")


def test_aliases_written_by_another_process_are_seen_by_the_next_request(
        client: TestClient, artifact_dir: Path, trained_model: Path) -> None:
    add_model(artifact_dir, trained_model, "m_first", created_at="2026-01-01T00:00:00.000Z")
    add_model(artifact_dir, trained_model, "m_second", created_at="2026-02-01T00:00:00.000Z")
    other = ModelStore(artifact_dir)  # another process's view of the same store
    other.set_alias("prod", "m_first")
    assert predicted(client, "prod") == "m_first"
    other.set_alias("prod", "m_second")
    assert predicted(client, "prod") == "m_second"
    other.delete_alias("prod")
    assert_problem(client.post("/v1/models/prod/predict", files=ONE), 404)
    assert predicted(client, "latest") == "m_second"


def test_the_catalog_version_changes_with_every_kind_of_change(artifact_dir: Path, trained_model: Path) -> None:
    store = ModelStore(artifact_dir)
    assert store.catalog_version() is None  # no models/ yet
    add_model(artifact_dir, trained_model, "m_first")
    seen = [store.catalog_version()]
    add_model(artifact_dir, trained_model, "m_second")
    seen.append(store.catalog_version())
    store.set_alias("prod", "m_first")
    seen.append(store.catalog_version())
    store.set_alias("prod", "m_second")
    seen.append(store.catalog_version())
    assert store.delete("m_first")
    seen.append(store.catalog_version())
    assert None not in seen and len(set(seen)) == len(seen)
    assert store.catalog_version() == seen[-1]  # and stays put while nothing changes


class ThreadRecorder:
    """A runner that records the thread each batch ran on."""

    def __init__(self, runner: TFLiteRunner, inline: bool = True) -> None:
        self.runner = runner
        self.input_shape = runner.input_shape
        self.backend = runner.backend
        self.inline = inline
        self.threads: list[str] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return self.runner.predict(batch)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return cifar_test_images(8, start=100)[0].astype(np.float32)


def run_batcher(runner: ThreadRecorder, alone: bool, calls: list[np.ndarray]) -> list[np.ndarray]:
    async def go() -> list[np.ndarray]:
        with ThreadPoolExecutor(1, thread_name_prefix="infer") as pool:
            batcher = MicroBatcher(runner, pool, 64, 0.02, alone=lambda: alone)
            return list(await asyncio.gather(*(batcher.predict(images) for images in calls)))

    return asyncio.run(asyncio.wait_for(go(), 60))


def test_a_lone_small_request_runs_on_the_event_loop(trained_model: Path, images: np.ndarray) -> None:
    runner = ThreadRecorder(TFLiteRunner(trained_model / TFLITE_FILE, threads=1))
    (probs,) = run_batcher(runner, True, [images[:1]])
    np.testing.assert_allclose(probs, runner.runner.predict(images[:1]), atol=1e-6)
    assert runner.threads == [threading.main_thread().name]


def test_everything_else_runs_in_the_inference_thread(trained_model: Path, images: np.ndarray) -> None:
    litert = TFLiteRunner(trained_model / TFLITE_FILE, threads=1)
    for runner, alone, calls in [
        (ThreadRecorder(litert), False, [images[:1]]),  # another predict request is being answered
        (ThreadRecorder(litert), True, [images[:INLINE_MAX_IMAGES + 1]]),  # too many images for the loop
        (ThreadRecorder(litert, inline=False), True, [images[:1]]),  # a runner that never runs there (Keras)
    ]:
        run_batcher(runner, alone, calls)
        assert runner.threads == ["infer_0"], runner.threads
    together = ThreadRecorder(litert)  # arriving in the same turn of the loop: one batch, not three lone runs
    results = run_batcher(together, True, [images[:1], images[1:2], images[2:3]])
    assert together.threads == ["infer_0"] and [len(r) for r in results] == [1, 1, 1]


def test_a_lone_request_cancelled_while_it_waits_to_run_leaves_nothing_queued(trained_model: Path,
                                                                              images: np.ndarray) -> None:
    runner = ThreadRecorder(TFLiteRunner(trained_model / TFLITE_FILE, threads=1))

    async def go() -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="infer") as pool:
            batcher = MicroBatcher(runner, pool, 64, 0.02, alone=lambda: True)
            task = asyncio.create_task(batcher.predict(images[:1]))
            await asyncio.sleep(0)  # it is waiting for its turns of the loop
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(await batcher.predict(images[:1])) == 1  # alone again: on the loop

    asyncio.run(asyncio.wait_for(go(), 60))
    assert runner.threads == [threading.main_thread().name]
