"""The Datasets API against a real Redis and artifact store: upload forms, limits, processing, listing, deletion.

Processing is run by calling the dataset task's function (`process_dataset_now`), as the dataset worker would;
the integration tests run it through a real worker process.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import testkit
from fastapi.testclient import TestClient
from PIL import Image
from svc_helpers import assert_problem

from worker.config import Settings
from worker.dataset_tasks import process_dataset_now
from worker.jobstore import JobStore
from worker.spec import JobCreate
from worker.store.datasets import DatasetStore

CLASSES = ("cat", "ship", "truck")
CIFAR_INDEX = {"cat": 3, "ship": 8, "truck": 9}


@pytest.fixture(scope="module")
def images() -> dict[str, list[np.ndarray]]:
    """A dozen real CIFAR-10 test images of each of three classes."""
    with np.load(testkit.cifar10_npz("test")) as data:
        x, y = data["x"], data["y"].reshape(-1)
    return {name: [x[i] for i in np.flatnonzero(y == index)[:12]] for name, index in CIFAR_INDEX.items()}


def _png(pixels: np.ndarray, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(images: dict[str, list[np.ndarray]], extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, pixels in images.items():
            for i, image in enumerate(pixels):
                archive.writestr(f"pets/{name}/{i:03d}.png", _png(image, 48 + i))
        for path, data in (extra or {}).items():
            archive.writestr(path, data)
    return buffer.getvalue()


def _process(settings: Settings, dataset_id: str) -> str:
    return process_dataset_now(dataset_id, settings)


def test_cifar10_is_always_listed_and_ready(client: TestClient) -> None:
    items = client.get("/v1/datasets").json()["items"]
    assert [d["id"] for d in items] == ["cifar10"]
    cifar = client.get("/v1/datasets/cifar10").json()
    assert cifar["status"] == "ready" and cifar["classes"][3] == "cat" and cifar["image_shape"] == [32, 32, 3]
    assert sum(cifar["counts"]["train"].values()) == 50000 and sum(cifar["counts"]["test"].values()) == 10000
    assert_problem(client.delete("/v1/datasets/cifar10"), 409)


def test_a_raw_zip_upload_is_processed_into_a_ready_dataset(client: TestClient, settings: Settings,
                                                            images: dict[str, list[np.ndarray]]) -> None:
    body = _zip(images, {"pets/cat/notes.txt": b"not an image"})
    response = client.post("/v1/datasets?name=pets&test_fraction=0.25&seed=3", content=body,
                           headers={"Content-Type": "application/zip"})
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["status"] == "processing" and created["name"] == "pets"
    assert response.headers["Location"] == f"/v1/datasets/{created['id']}"
    assert_problem(client.get(f"/v1/datasets/{created['id']}/preview.png"), 409)

    assert _process(settings, created["id"]) == "ready"
    ready = client.get(f"/v1/datasets/{created['id']}").json()
    assert ready["status"] == "ready" and ready["classes"] == list(CLASSES) and ready["error"] is None
    assert ready["image_shape"] == [128, 128, 3]
    assert {c: ready["counts"]["train"][c] + ready["counts"]["test"][c] for c in CLASSES} == dict.fromkeys(CLASSES, 12)
    assert all(ready["counts"]["test"][c] == 3 for c in CLASSES)
    assert ready["skipped_count"] == 1 and ready["skipped"][0]["path"].endswith("notes.txt")
    assert len(ready["sha256"]) == 64 and ready["bytes"] > 0
    preview = client.get(f"/v1/datasets/{created['id']}/preview.png")
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")
    assert [d["id"] for d in client.get("/v1/datasets").json()["items"]] == [created["id"], "cifar10"]
    # the upload itself is gone once processed; only the dataset directory and its record remain
    assert not list((settings.artifact_dir / "datasets" / ".uploads").iterdir())


def test_a_multipart_upload_takes_its_options_from_form_fields(client: TestClient, settings: Settings,
                                                              images: dict[str, list[np.ndarray]]) -> None:
    response = client.post("/v1/datasets", files={"file": ("my-pets.zip", _zip(images), "application/zip")},
                           data={"test_fraction": "0.5", "seed": "9"})
    assert response.status_code == 202, response.text
    dataset_id = response.json()["id"]
    assert response.json()["name"] == "my-pets"
    assert _process(settings, dataset_id) == "ready"
    ready = client.get(f"/v1/datasets/{dataset_id}").json()
    assert all(ready["counts"]["test"][c] == 6 for c in CLASSES)


@pytest.mark.parametrize(("form", "field"), [({"test_fraction": "0.9"}, "test_fraction"),
                                             ({"seed": "-1"}, "seed"), ({"colour": "red"}, "colour")])
def test_bad_multipart_options_are_422(client: TestClient, form: dict[str, str], field: str) -> None:
    response = client.post("/v1/datasets", files={"file": ("a.zip", b"PK", "application/zip")}, data=form)
    body = assert_problem(response, 422)
    assert body["errors"][0]["loc"] == ["body", field]


def test_an_archive_that_is_not_one_ends_failed_with_a_message(client: TestClient, settings: Settings) -> None:
    response = client.post("/v1/datasets", content=b"hello, not an archive",
                           headers={"Content-Type": "application/octet-stream"})
    dataset_id = response.json()["id"]
    assert _process(settings, dataset_id) == "failed"
    failed = client.get(f"/v1/datasets/{dataset_id}").json()
    assert failed["status"] == "failed" and failed["error"]["type"] == "InvalidDataset"
    assert "not a zip, tar, tar.gz or npz" in failed["error"]["message"]


def test_uploads_are_refused_with_clear_4xx(client: TestClient) -> None:
    assert_problem(client.post("/v1/datasets", content=b"x", headers={"Content-Type": "text/plain"}), 415)
    assert_problem(client.post("/v1/datasets", content=b"", headers={"Content-Type": "application/zip"}), 422)
    assert_problem(client.post("/v1/datasets", files={"other": ("a.zip", b"PK")}), 400)
    assert_problem(client.get("/v1/datasets/ds_nope"), 404)
    assert_problem(client.get("/v1/datasets/..%2Fetc"), 404)
    assert_problem(client.delete("/v1/datasets/ds_nope"), 404)


def test_an_upload_over_the_limit_is_413_and_leaves_nothing(settings: Settings,
                                                           app_client: Callable[[Settings], TestClient]) -> None:
    client = app_client(settings.model_copy(update={"max_dataset_bytes": 4096}))
    declared = client.post("/v1/datasets", content=b"\0" * 5000, headers={"Content-Type": "application/zip"})
    assert_problem(declared, 413, "TL_MAX_DATASET_BYTES")

    def chunks() -> Any:  # no Content-Length: counted as it streams, cut off at the limit
        for _ in range(10):
            yield b"\0" * 1000

    streamed = client.post("/v1/datasets", content=chunks(), headers={"Content-Type": "application/zip"})
    assert_problem(streamed, 413, "TL_MAX_DATASET_BYTES")
    uploads = settings.artifact_dir / "datasets" / ".uploads"
    assert not uploads.exists() or not list(uploads.iterdir())
    assert [d["id"] for d in client.get("/v1/datasets").json()["items"]] == ["cifar10"]
    # predict keeps its own, smaller limit
    assert client.post("/v1/predict", content=b"\0" * 5000, headers={"Content-Type": "image/png"}).status_code != 413


def test_jobs_must_name_a_ready_dataset(client: TestClient, settings: Settings,
                                        images: dict[str, list[np.ndarray]]) -> None:
    body = assert_problem(client.post("/v1/jobs", json={"model": "baseline", "dataset": "ds_nope"}), 422)
    assert body["errors"][0]["loc"] == ["body", "dataset"]
    dataset_id = client.post("/v1/datasets", content=_zip(images),
                             headers={"Content-Type": "application/zip"}).json()["id"]
    assert_problem(client.post("/v1/jobs", json={"model": "baseline", "dataset": dataset_id}), 409, "processing")
    _process(settings, dataset_id)
    too_many = client.post("/v1/jobs", json={"model": "baseline", "dataset": dataset_id, "train_samples": 500})
    assert assert_problem(too_many, 422)["errors"][0]["loc"] == ["body", "train_samples"]
    job = client.post("/v1/jobs", json={"model": "baseline", "dataset": dataset_id, "train_samples": 6})
    assert job.status_code == 202, job.text
    spec = job.json()["spec"]
    assert spec["dataset"] == dataset_id and spec["train_samples"] == 6 and spec["test_samples"] is None
    assert_problem(client.delete(f"/v1/datasets/{dataset_id}"), 409, job.json()["id"])


def test_a_dataset_no_job_uses_is_deleted_whole(client: TestClient, settings: Settings, job_store: JobStore,
                                               images: dict[str, list[np.ndarray]]) -> None:
    dataset_id = client.post("/v1/datasets", content=_zip(images),
                             headers={"Content-Type": "application/zip"}).json()["id"]
    _process(settings, dataset_id)
    finished = job_store.create(JobCreate(model="baseline", dataset=dataset_id))
    job_store.update(finished.id, {"status": "failed"})
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert_problem(client.get(f"/v1/datasets/{dataset_id}"), 404)
    root: Path = settings.artifact_dir / "datasets"
    assert not (root / dataset_id).exists() and not (root / f"{dataset_id}.json").exists()


def test_a_dataset_whose_worker_died_becomes_failed(settings: Settings,
                                                    app_client: Callable[[Settings], TestClient],
                                                    images: dict[str, list[np.ndarray]]) -> None:
    client = app_client(settings.model_copy(update={"job_lost_seconds": 0.5}))
    dataset_id = client.post("/v1/datasets", content=_zip(images),
                             headers={"Content-Type": "application/zip"}).json()["id"]
    store = DatasetStore(settings.artifact_dir)
    record = store.get(dataset_id)
    assert record is not None
    record.started_at = 1.0  # taken by a worker that then went silent
    store.put(record)
    time.sleep(0.6)
    lost = client.get(f"/v1/datasets/{dataset_id}").json()
    assert lost["status"] == "failed" and lost["error"]["type"] == "WorkerLost"

