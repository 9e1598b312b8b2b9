"""The standard inference protocols against the real stack, with the clients other services already have: the
official `tritonclient.http` (binary tensors by default, and `binary_data=False`), plain KServe v2 JSON, and a
TF Serving style JSON client, on a model trained through the API; every answer equals `/v1` predict on the
same images, and every wrong request gets the protocol's 4xx."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from .harness import API_KEY, Stack, cifar10_test_images, png_bytes

pytestmark = [pytest.mark.integration, pytest.mark.realdata]



def auth() -> dict[str, str]:
    """The key, in a new dict per call: `tritonclient` adds its Inference-Header-Content-Length to the dict given."""
    return {"Authorization": f"Bearer {API_KEY}"}

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return cifar10_test_images(16, seed=77)[0]


@pytest.fixture
def triton_client(stack: Stack) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(stack.base_url.removeprefix("http://"), connection_timeout=30,
                                          network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def model_id(baseline_job: dict[str, Any], stack: Stack) -> Iterator[str]:
    """The session's baseline model, also named by the alias `ALIAS` for this module (other tests' models may
    be newer, so `latest` is not it)."""
    model = str(baseline_job["model_id"])
    with stack.client() as client:
        assert client.put(f"/v1/aliases/{ALIAS}", json={"model_id": model}).status_code == 200
        yield model
        client.delete(f"/v1/aliases/{ALIAS}")


ALIAS = "protocols"


def v1_predictions(client: httpx.Client, model_id: str, x: np.ndarray) -> list[dict[str, Any]]:
    files = [("file", (f"{i}.png", png_bytes(img), "image/png")) for i, img in enumerate(x)]
    response = client.post(f"/v1/models/{model_id}/predict", params={"probabilities": "true", "top_k": 3},
                           files=files)
    assert response.status_code == 200, response.text
    return list(response.json()["predictions"])


def image_input(x: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def assert_status(exc: pytest.ExceptionInfo[InferenceServerException], status: int, contains: str = "") -> None:
    assert exc.value.status() == str(status), exc.value
    assert contains in exc.value.message(), exc.value.message()


def test_server_and_model_metadata(triton_client: triton.InferenceServerClient, model_id: str) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    server = triton_client.get_server_metadata(headers=auth())
    assert {"classification", "binary_tensor_data"} <= set(server["extensions"])
    metadata = triton_client.get_model_metadata(ALIAS, headers=auth())
    assert metadata["versions"] == [model_id] and metadata["platform"] == "tensorflow_lite"
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert metadata["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    assert triton_client.is_model_ready(model_id, headers=auth())
    assert triton_client.is_model_ready(ALIAS, model_version=model_id, headers=auth())
    assert not triton_client.is_model_ready(ALIAS, model_version="m_other", headers=auth())
    assert not triton_client.is_model_ready("m_missing", headers=auth())


def test_infer_with_binary_tensors_equals_v1_predict(triton_client: triton.InferenceServerClient, model_id: str,
                                                     client: httpx.Client, images: np.ndarray) -> None:
    result = triton_client.infer(model_id, [image_input(images)], headers=auth())  # default: binary both ways
    expected = v1_predictions(client, model_id, images)
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(images), 10)
    np.testing.assert_allclose(probs, [p["probabilities"] for p in expected], atol=1e-6)
    assert [label.decode() for label in result.as_numpy("label")] == [p["label"] for p in expected]
    assert result.get_response()["model_version"] == model_id


def test_infer_with_json_tensors(triton_client: triton.InferenceServerClient, model_id: str,
                                 images: np.ndarray) -> None:
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=False),
               triton.InferRequestedOutput("label", binary_data=False)]
    as_json = triton_client.infer(model_id, [image_input(images, binary=False)], outputs=outputs, headers=auth())
    binary = triton_client.infer(model_id, [image_input(images)], headers=auth())
    response = as_json.get_response()
    assert all("data" in output for output in response["outputs"])
    np.testing.assert_allclose(as_json.as_numpy("probabilities"), binary.as_numpy("probabilities"), atol=1e-7)
    # BYTES come back as str from JSON and as bytes from binary data (tritonclient's own decoding)
    assert list(as_json.as_numpy("label")) == [label.decode() for label in binary.as_numpy("label")]


def test_infer_with_encoded_images(triton_client: triton.InferenceServerClient, model_id: str,
                                   client: httpx.Client, images: np.ndarray) -> None:
    files = triton.InferInput("image_bytes", [len(images)], "BYTES")
    files.set_data_from_numpy(np.array([png_bytes(img) for img in images], dtype=np.object_))
    result = triton_client.infer(model_id, [files], headers=auth())
    expected = v1_predictions(client, model_id, images)
    np.testing.assert_allclose(result.as_numpy("probabilities"), [p["probabilities"] for p in expected], atol=1e-6)


def test_classification_strings(triton_client: triton.InferenceServerClient, model_id: str, client: httpx.Client,
                                images: np.ndarray) -> None:
    outputs = [triton.InferRequestedOutput("probabilities", class_count=3)]
    result = triton_client.infer(model_id, [image_input(images)], outputs=outputs, headers=auth())
    strings = result.as_numpy("probabilities")
    assert strings.shape == (len(images), 3)
    expected = v1_predictions(client, model_id, images)
    for row, prediction in zip(strings, expected, strict=True):
        assert [s.decode() for s in row] == [f"{c['probability']:.6f}:{c['class_index']}:{c['label']}"
                                             for c in prediction["top_k"]]


def test_plain_kserve_v2_json(client: httpx.Client, model_id: str, images: np.ndarray) -> None:
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 32, 32, 3],
                        "data": images[:2].ravel().tolist()}]}
    response = client.post(f"/v2/models/{model_id}/infer", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json", response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["data"] == [p["label"] for p in v1_predictions(client, model_id, images[:2])]


def test_tf_serving_style_client(client: httpx.Client, model_id: str, images: np.ndarray) -> None:
    expected = np.array([p["probabilities"] for p in v1_predictions(client, model_id, images)])
    rows = client.post(f"/v1/models/{model_id}:predict", json={"instances": images.tolist()})
    assert rows.status_code == 200, rows.text
    np.testing.assert_allclose(rows.json()["predictions"], expected, atol=1e-6)
    columnar = client.post(f"/v1/models/{ALIAS}/versions/{model_id}:predict",
                           json={"inputs": {"image": [{"b64": base64.b64encode(png_bytes(img)).decode()}
                                                      for img in images]}})
    assert columnar.status_code == 200, columnar.text
    np.testing.assert_allclose(columnar.json()["outputs"], expected, atol=1e-6)
    wrong = client.post(f"/v1/models/{model_id}:predict", json={"instances": [[[0, 0, 0]]]})
    assert wrong.status_code == 400 and "32x32x3" in wrong.json()["error"]


@pytest.mark.parametrize(("make_input", "status", "contains"), [
    (lambda: image_input(np.zeros((1, 32, 32), dtype=np.uint8)), 400, "[N, H, W, 3]"),
    (lambda: _typed("image", np.zeros((1, 32, 32, 3), dtype=np.float32), "FP32"), 400, "UINT8"),
    (lambda: _typed("pixels", np.zeros((1, 32, 32, 3), dtype=np.uint8), "UINT8"), 400, "pixels"),
    (lambda: image_input(np.zeros((65, 2, 2, 3), dtype=np.uint8)), 413, "at most"),
    (lambda: _typed("image_bytes", np.array([b"not an image"], dtype=np.object_), "BYTES"), 400, "image 0"),
])
def test_wrong_requests_get_the_protocols_4xx(triton_client: triton.InferenceServerClient, model_id: str,
                                             make_input: Any, status: int, contains: str) -> None:
    with pytest.raises(InferenceServerException) as exc:
        triton_client.infer(model_id, [make_input()], headers=auth())
    assert_status(exc, status, contains)


def test_wrong_sizes_outputs_names_and_keys(triton_client: triton.InferenceServerClient, model_id: str,
                                            client: httpx.Client) -> None:
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 32, 32, 3],
                                     "parameters": {"binary_data_size": 3072}}]}).encode()
    short = client.post(f"/v2/models/{model_id}/infer", content=header + bytes(3072),  # 1 image for a shape of 2
                        headers={"Inference-Header-Content-Length": str(len(header))})
    assert short.status_code == 400 and "6144 bytes" in short.json()["error"], short.text
    with pytest.raises(InferenceServerException) as exc:
        triton_client.infer(model_id, [image_input(np.zeros((1, 8, 8, 3), dtype=np.uint8))],
                            outputs=[triton.InferRequestedOutput("logits")], headers=auth())
    assert_status(exc, 400, "logits")
    with pytest.raises(InferenceServerException) as exc:
        triton_client.infer("m_missing", [image_input(np.zeros((1, 8, 8, 3), dtype=np.uint8))], headers=auth())
    assert_status(exc, 404, "m_missing")
    with pytest.raises(InferenceServerException) as exc:
        triton_client.infer(model_id, [image_input(np.zeros((1, 8, 8, 3), dtype=np.uint8))])
    assert exc.value.status() == "401"


def _typed(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor
