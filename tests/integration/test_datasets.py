"""Bring your own images, through the real stack: upload (multipart and raw), processing by the dataset worker,
training on it, every predict form answering with the dataset's class names; hostile archives refused."""

from __future__ import annotations

import base64
import io
import socket
import tarfile
import zipfile
from typing import Any

import httpx
import numpy as np
import pytest
import testkit
from PIL import Image

from .harness import API_KEY, Stack, train, wait_for

pytestmark = pytest.mark.integration

#: User class names over three CIFAR-10 classes (automobile, horse, ship).
CLASSES = {"cars": 1, "horses": 7, "boats": 8}


def _image_file(pixels: np.ndarray, i: int) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if i % 3 == 0:
        image.resize((200, 150), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        return ".jpg", buffer.getvalue()
    image.resize((96, 96), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return ".png", buffer.getvalue()


@pytest.fixture(scope="module")
def cifar_test() -> tuple[np.ndarray, np.ndarray]:
    with np.load(testkit.cifar10_npz("test")) as data:
        return data["x"], data["y"].reshape(-1)


def _wait_dataset(client: httpx.Client, dataset_id: str, timeout: float = 120.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(f"/v1/datasets/{dataset_id}").json()
        return body if body["status"] != "processing" else None

    return dict(wait_for(done, timeout, what=f"dataset {dataset_id}"))


@pytest.fixture(scope="module")
def dataset(stack: Stack, realdata: None, cifar_test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """A tar.gz of class folders with a given train/test split, uploaded as multipart."""
    x, y = cifar_test
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, label in CLASSES.items():
            for i, index in enumerate(np.flatnonzero(y == label)[:50]):
                split = "test" if i < 12 else "train"
                suffix, data = _image_file(x[index], i)
                info = tarfile.TarInfo(f"{split}/{name}/{i:03d}{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    with stack.client() as client:
        response = client.post("/v1/datasets", files={"file": ("vehicles.tar.gz", buffer.getvalue())},
                               data={"seed": "5"})
        assert response.status_code == 202, response.text
        ready = _wait_dataset(client, response.json()["id"])
    assert ready["status"] == "ready", ready
    return ready


def test_an_uploaded_dataset_is_ready_with_its_counts(dataset: dict[str, Any], client: httpx.Client) -> None:
    assert dataset["name"] == "vehicles" and dataset["classes"] == sorted(CLASSES)
    assert dataset["counts"]["train"] == dict.fromkeys(sorted(CLASSES), 38)
    assert dataset["counts"]["test"] == dict.fromkeys(sorted(CLASSES), 12)
    preview = client.get(f"/v1/datasets/{dataset['id']}/preview.png")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    assert dataset["id"] in [d["id"] for d in client.get("/v1/datasets").json()["items"]]


@pytest.fixture(scope="module")
def trained(stack: Stack, dataset: dict[str, Any], weights: None) -> dict[str, Any]:
    with stack.client() as client:
        return train(client, {"model": "transfer", "dataset": dataset["id"], "epochs": 4, "image_size": 96,
                              "seed": 2, "augment": ["flip"], "name": "vehicles"})


def test_the_model_classifies_new_images_by_the_dataset_names(trained: dict[str, Any], client: httpx.Client,
                                                              cifar_test: tuple[np.ndarray, np.ndarray]) -> None:
    model = client.get(f"/v1/models/{trained['model_id']}").json()
    assert model["classes"] == sorted(CLASSES) and model["input_shape"] == [96, 96, 3]
    assert model["dataset"]["name"] == "vehicles" and model["dataset"]["id"] == trained["spec"]["dataset"]
    metrics = trained["metrics"]
    assert len(metrics["per_class"]) == 3 and sum(map(sum, metrics["confusion_matrix"])) == 36
    assert [row["support"] for row in metrics["per_class"]] == [12, 12, 12]
    assert client.get(f"/v1/models/{trained['model_id']}/confusion.png").status_code == 200

    # Images that were not in the archive, each form of predict body.
    x, y = cifar_test
    order = sorted(CLASSES)
    picked = [(index, order.index(name)) for name, label in CLASSES.items()
              for index in np.flatnonzero(y == label)[300:310]]
    files = [("file", (f"{i}.png", _image_file(x[i], 1)[1], "image/png")) for i, _ in picked]
    response = client.post(f"/v1/models/{trained['model_id']}/predict?top_k=5", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert all(len(p["top_k"]) == 3 for p in predictions)  # bounded by the 3 classes
    assert {p["label"] for p in predictions} <= set(CLASSES)
    accuracy = np.mean([p["class_index"] == label for p, (_, label) in zip(predictions, picked, strict=True)])
    assert accuracy > 0.6, predictions

    first = _image_file(x[picked[0][0]], 1)[1]
    by_json = client.post(f"/v1/models/{trained['model_id']}/predict",
                          json={"instances": [{"b64": base64.b64encode(first).decode()}]})
    raw = client.post(f"/v1/models/{trained['model_id']}/predict", content=first,
                      headers={"Content-Type": "image/png"})
    assert by_json.json()["predictions"][0] == raw.json()["predictions"][0] == predictions[0]
    nested = np.asarray(Image.open(io.BytesIO(first)).convert("RGB").resize((96, 96))).tolist()
    listed = client.post(f"/v1/models/{trained['model_id']}/predict", json={"instances": [nested]})
    assert listed.status_code == 200, listed.text
    wrong = client.post(f"/v1/models/{trained['model_id']}/predict", json={"instances": [x[0].tolist()]})
    assert wrong.status_code == 422 and "96x96x3" in wrong.json()["detail"]


def test_a_dataset_in_use_cannot_be_deleted_and_its_models_survive_deletion(
        stack: Stack, dataset: dict[str, Any], trained: dict[str, Any], client: httpx.Client) -> None:
    job = client.post("/v1/jobs", json={"model": "baseline", "dataset": dataset["id"], "epochs": 50}).json()
    refused = client.delete(f"/v1/datasets/{dataset['id']}")
    assert refused.status_code == 409 and job["id"] in refused.json()["detail"]
    client.post(f"/v1/jobs/{job['id']}/cancel")
    wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled", 120, what="cancel")
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    retry = client.post("/v1/jobs", json={"model": "baseline", "dataset": dataset["id"]})
    assert retry.status_code == 422
    still = client.post(f"/v1/models/{trained['model_id']}/predict", content=_image_file(np.zeros((32, 32, 3),
                        dtype=np.uint8), 1)[1], headers={"Content-Type": "image/png"})
    assert still.status_code == 200


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(("body", "message"), [
    (b"this is not an archive", "not a zip, tar, tar.gz or npz"),
    ("traversal", "outside the archive"),
    ("one-class", "at least 2"),
])
def test_hostile_or_wrong_archives_end_failed_with_a_message(stack: Stack, client: httpx.Client, body: Any,
                                                            message: str) -> None:
    image = _image_file(np.full((32, 32, 3), 120, dtype=np.uint8), 1)[1]
    if body == "traversal":
        body = _zip({"cats/a.png": image, "../../evil/x.png": image, "dogs/b.png": image})
    elif body == "one-class":
        body = _zip({f"cats/{i}.png": image for i in range(5)})
    response = client.post("/v1/datasets", content=body, headers={"Content-Type": "application/zip"})
    assert response.status_code == 202, response.text
    failed = _wait_dataset(client, response.json()["id"])
    assert failed["status"] == "failed" and message in failed["error"]["message"], failed
    assert not (stack.artifact_dir.parent / "evil").exists()
    assert client.get("/healthz").status_code == 200


def test_a_huge_declared_upload_is_413_before_any_byte_is_read(stack: Stack) -> None:
    host, port = stack.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST /v1/datasets HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                     f"Content-Type: application/zip\r\nContent-Length: {50 * 1024**3}\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):  # answered without a byte of the body sent, then closed
            answer += chunk
    text = answer.decode(errors="replace")
    assert text.startswith("HTTP/1.1 413"), text
    assert "TL_MAX_DATASET_BYTES" in text
