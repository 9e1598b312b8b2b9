"""TensorFlow Serving's REST predict with real models: row and columnar bodies, nested lists and `b64` images,
versions, a model of another size, and its errors (`{"error"}`, never problem+json)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from protocol_helpers import add_small_model, litert_probabilities, resized, small_tflite
from svc_helpers import add_model, assert_problem, cifar_test_images, make_settings, png

from worker.config import Settings

pytestmark = pytest.mark.realdata

MODEL = "m_tfs0000000000000"
SMALL = "m_tfssmall00000000"
PREDICT = f"/v1/models/{MODEL}:predict"


@pytest.fixture
def model(artifact_dir: Path, trained_model: Path) -> str:
    add_model(artifact_dir, trained_model, MODEL)
    return MODEL


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return cifar_test_images(6, start=3000)[0]


def b64(pixels: np.ndarray) -> dict[str, str]:
    return {"b64": base64.b64encode(png(pixels)).decode()}


def v1_probabilities(client: TestClient, x: np.ndarray, model: str = MODEL) -> np.ndarray:
    response = client.post(f"/v1/models/{model}/predict", params={"probabilities": "true"},
                           json={"instances": [b64(img) for img in x]})
    assert response.status_code == 200, response.text
    return np.array([p["probabilities"] for p in response.json()["predictions"]])


def rows(response: Any, key: str = "predictions") -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {key}, body
    return np.array(body[key])


def assert_error(response: Any, status: int, contains: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert set(body) == {"error"} and body["error"], body
    if contains is not None:
        assert contains in body["error"], body["error"]


def test_row_format_nested_lists_and_b64_equal_v1_predict(client: TestClient, model: str,
                                                          images: np.ndarray) -> None:
    expected = v1_probabilities(client, images)
    nested = rows(client.post(PREDICT, json={"instances": images.tolist()}))
    as_b64 = rows(client.post(PREDICT, json={"instances": [b64(img) for img in images]}))
    named = rows(client.post(PREDICT, json={"signature_name": "serving_default",
                                            "instances": [{"image": b64(img)} for img in images]}))
    assert nested.shape == (len(images), 10)
    np.testing.assert_allclose(nested, expected, atol=1e-6)
    np.testing.assert_array_equal(as_b64, nested)
    np.testing.assert_array_equal(named, nested)


def test_columnar_format_answers_outputs(client: TestClient, model: str, images: np.ndarray) -> None:
    expected = rows(client.post(PREDICT, json={"instances": images.tolist()}))
    as_list = rows(client.post(PREDICT, json={"inputs": images.tolist()}), "outputs")
    by_name = rows(client.post(PREDICT, json={"inputs": {"image": [b64(img) for img in images]}}), "outputs")
    np.testing.assert_array_equal(as_list, expected)
    np.testing.assert_array_equal(by_name, expected)


def test_names_versions_and_aliases(client: TestClient, model: str, images: np.ndarray) -> None:
    assert client.put("/v1/aliases/prod", json={"model_id": MODEL}).status_code == 200
    one = {"instances": images[:1].tolist()}
    expected = rows(client.post(PREDICT, json=one))
    for path in ("/v1/models/prod:predict", "/v1/models/latest:predict", f"/v1/models/prod/versions/{MODEL}:predict"):
        np.testing.assert_array_equal(rows(client.post(path, json=one)), expected)
    assert_error(client.post("/v1/models/prod/versions/m_other:predict", json=one), 404, "m_other")
    assert_error(client.post("/v1/models/m_nope:predict", json=one), 404, "m_nope")


def test_the_v1_routes_around_it_are_untouched(client: TestClient, model: str, images: np.ndarray) -> None:
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    one = {"instances": images[:1].tolist()}
    assert client.post(f"/v1/models/{MODEL}/predict", json=one).json()["model_id"] == MODEL
    assert_problem(client.get(PREDICT), 404)  # a GET is the model route's, for a model named "...:predict"


def test_a_model_of_another_size(client: TestClient, artifact_dir: Path, trained_model: Path, images: np.ndarray,
                                 tmp_path: Path) -> None:
    tflite = small_tflite(tmp_path)
    add_small_model(artifact_dir, trained_model, tflite, SMALL)
    at_size = np.stack([resized(img, 96) for img in images]).astype(np.uint8)
    got = rows(client.post(f"/v1/models/{SMALL}:predict", json={"instances": at_size.tolist()}))
    np.testing.assert_allclose(got, litert_probabilities(tflite, at_size), atol=1e-6)
    by_file = rows(client.post(f"/v1/models/{SMALL}:predict", json={"instances": [b64(img) for img in images]}))
    expected = litert_probabilities(tflite, np.stack([resized(img, 96) for img in images]))
    np.testing.assert_allclose(by_file, expected, atol=1e-6)
    assert_error(client.post(f"/v1/models/{SMALL}:predict", json={"instances": images[:1].tolist()}), 400, "96x96x3")


@pytest.mark.parametrize(("body", "contains"), [
    ({"instances": []}, "non-empty"),
    ({}, "exactly one"),
    ({"instances": [[0]], "inputs": [[0]]}, "exactly one"),
    ({"instances": [np.zeros((32, 32)).tolist()]}, "32x32x3"),
    ({"instances": [np.full((32, 32, 3), 300).tolist()]}, "0..255"),
    ({"instances": [{"b64": "%%%"}]}, "base64"),
    ({"instances": [{"b64": base64.b64encode(b"not an image").decode()}]}, "image"),
    ({"instances": ["text"]}, "nested list"),
    ({"instances": [{"pixels": [0]}]}, "b64"),
    ({"inputs": {"a": [0], "b": [0]}}, "one input"),
    ({"instances": [[0]], "signature_name": "other"}, "signature_name"),
    ({"instances": [[0]], "extra": 1}, "extra"),
])
def test_wrong_bodies_are_400(client: TestClient, model: str, body: dict[str, Any], contains: str) -> None:
    assert_error(client.post(PREDICT, json=body), 400, contains)


def test_invalid_json_too_many_images_and_media_type(client: TestClient, model: str) -> None:
    assert_error(client.post(PREDICT, content=b"{", headers={"Content-Type": "application/json"}), 400, "JSON")
    assert_error(client.post(PREDICT, json={"instances": [np.zeros((32, 32, 3)).tolist()] * 65}), 413, "64")
    assert_error(client.post(PREDICT, content=b"x", headers={"Content-Type": "image/png"}), 415)


def test_tfserving_predict_is_counted_and_needs_the_key(redis_url: str, artifact_dir: Path, model: str,
                                                        app_client: Callable[[Settings], TestClient]) -> None:
    client = app_client(make_settings(redis_url, artifact_dir, api_key="s3cret"))
    one = {"instances": [np.zeros((32, 32, 3)).tolist()] * 3}
    assert client.post(PREDICT, json=one).status_code == 401
    assert client.post(PREDICT, json=one, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    metrics = client.get("/metrics").text
    assert "tl_predictions_total 3.0" in metrics
    assert 'route="/v1/models/{name}:predict",status="200"' in metrics


def test_pixel_bombs_and_oversized_json_are_refused_before_decoding(client: TestClient, model: str) -> None:
    from svc_helpers import raw_png

    bomb = {"b64": base64.b64encode(raw_png(6320, 6320, 1, 0, None)).decode()}  # 40 MP declared, a few bytes
    assert_error(client.post(PREDICT, json={"instances": [bomb]}), 413, "TL_MAX_IMAGE_PIXELS")
    several = {"b64": base64.b64encode(raw_png(3000, 3000, 1, 0, None)).decode()}  # 9 MP each: 8 pass 64 MP
    assert_error(client.post(PREDICT, json={"instances": [several] * 8}), 413, "TL_MAX_REQUEST_PIXELS")
    image = np.zeros((32, 32, 3), dtype=int).tolist()
    assert_error(client.post(PREDICT, json={"instances": [image] * 70}), 413, "TL_MAX_BATCH")
