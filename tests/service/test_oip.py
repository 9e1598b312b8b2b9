"""The Open Inference Protocol (KServe v2 / Triton) REST routes with real models: metadata, readiness, infer in
JSON and with the binary tensor data extension both ways, encoded images, classification strings, a model
of another size and class count, and every way a request can break the protocol (`{"error"}`, never
problem+json)."""

from __future__ import annotations

import base64
import gzip
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from protocol_helpers import SMALL_CLASSES, add_small_model, litert_probabilities, resized, small_tflite
from svc_helpers import add_model, cifar_test_images, make_settings, png

from worker.config import Settings
from worker.spec import CLASS_NAMES
from worker.store import TFLITE_FILE

pytestmark = pytest.mark.realdata

MODEL = "m_oip0000000000000"
SMALL = "m_oipsmall00000000"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture
def model(artifact_dir: Path, trained_model: Path) -> str:
    add_model(artifact_dir, trained_model, MODEL)
    return MODEL


@pytest.fixture(scope="module")
def small_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_tflite(tmp_path_factory.mktemp("small"))


@pytest.fixture
def small(artifact_dir: Path, trained_model: Path, small_model_file: Path) -> str:
    add_small_model(artifact_dir, trained_model, small_model_file, SMALL)
    return SMALL


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return cifar_test_images(8, start=2000)[0]


def assert_error(response: Any, status: int, contains: str | None = None) -> str:
    """The protocol's error: `{"error": "..."}` as application/json."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    if contains is not None:
        assert contains in body["error"], body["error"]
    return str(body["error"])


def image_tensor(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"name": "image", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist(), **extra}


def outputs_of(response: Any) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def v1_predictions(client: TestClient, x: np.ndarray, model: str = MODEL, top_k: int = 3) -> list[dict[str, Any]]:
    """What `/v1` predict answers for the same images (as lossless PNG files)."""
    files = [("file", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(x)]
    response = client.post(f"/v1/models/{model}/predict", params={"probabilities": "true", "top_k": top_k},
                           files=files)
    assert response.status_code == 200, response.text
    return list(response.json()["predictions"])


def binary_request(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(chunks), {"Inference-Header-Content-Length": str(len(text)),
                                     "Content-Type": "application/octet-stream"}


def split_binary(response: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A binary response: its JSON header and each binary output's bytes, by name."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    offset, blobs = length, {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            blobs[output["name"]] = response.content[offset:offset + size]
            offset += size
    assert offset == len(response.content)
    return header, blobs


def bytes_elements(data: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        out.append(data[offset + 4:offset + 4 + length])
        offset += 4 + length
    return out


def serialized(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# ----- health, metadata, readiness -----

def test_health_live_and_ready(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_ready_is_503_when_the_artifact_store_cannot_be_read(redis_url: str, tmp_path: Path,
                                                            app_client: Callable[[Settings], TestClient]) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    (tmp_path / "store").mkdir()
    client = app_client(make_settings(redis_url, tmp_path / "store"))
    client.app.state.services.registry.store.models_dir = not_a_directory / "models"  # type: ignore[attr-defined]
    assert client.get("/v2/health/live").status_code == 200
    assert_error(client.get("/v2/health/ready"), 503, "artifact store")


def test_server_metadata_names_the_extensions(client: TestClient) -> None:
    body = client.get("/v2").json()
    assert body["name"] and body["version"] == client.app.version  # type: ignore[attr-defined]
    assert {"classification", "binary_tensor_data"} <= set(body["extensions"])


def test_model_metadata_by_id_alias_and_latest(client: TestClient, model: str) -> None:
    assert client.put("/v1/aliases/prod", json={"model_id": MODEL}).status_code == 200
    for name in (MODEL, "prod", "latest"):
        body = client.get(f"/v2/models/{name}").json()
        assert body == {
            "name": name, "versions": [MODEL], "platform": "tensorflow_lite",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}],
        }
    assert client.get(f"/v2/models/prod/versions/{MODEL}").json()["versions"] == [MODEL]


def test_metadata_follows_the_models_own_input_shape_and_classes(client: TestClient, small: str) -> None:
    body = client.get(f"/v2/models/{SMALL}").json()
    assert body["inputs"][0]["shape"] == [-1, 96, 96, 3]
    assert body["outputs"][0]["shape"] == [-1, len(SMALL_CLASSES)]


def test_model_ready(client: TestClient, model: str) -> None:
    assert client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert client.get(f"/v2/models/latest/versions/{MODEL}/ready").json() == {"name": "latest", "ready": True}


def test_unknown_models_and_versions_are_404(client: TestClient, model: str) -> None:
    assert_error(client.get("/v2/models/m_nope"), 404, "m_nope")
    assert_error(client.get("/v2/models/m_nope/ready"), 404)
    assert_error(client.get(f"/v2/models/{MODEL}/versions/m_other"), 404, "m_other")
    assert_error(client.post("/v2/models/m_nope/infer", json={"inputs": []}), 404)
    assert_error(client.post(f"/v2/models/{MODEL}/versions/3/infer", json={"inputs": []}), 404)


def test_no_model_yet_is_404_saying_to_train_one(client: TestClient) -> None:
    assert_error(client.get("/v2/models/latest"), 404, "train one first")


def test_unknown_paths_and_methods_answer_the_protocols_error(client: TestClient, model: str) -> None:
    assert_error(client.get(f"/v2/models/{MODEL}/config/extra"), 404, "no route")
    assert_error(client.get(f"/v2/models/{MODEL}/infer"), 405)
    assert_error(client.delete("/v2/health/live"), 405)


# ----- infer -----

def test_infer_json_equals_v1_predict(client: TestClient, model: str, images: np.ndarray) -> None:
    out = outputs_of(client.post(INFER, json={"id": "req-1", "inputs": [image_tensor(images)]}))
    expected = v1_predictions(client, images)
    assert out["probabilities"]["datatype"] == "FP32" and out["probabilities"]["shape"] == [len(images), 10]
    probs = np.array(out["probabilities"]["data"]).reshape(len(images), 10)
    np.testing.assert_allclose(probs, [p["probabilities"] for p in expected], atol=1e-6)
    assert out["label"] == {"name": "label", "datatype": "BYTES", "shape": [len(images)],
                            "data": [p["label"] for p in expected]}
    body = client.post(INFER, json={"id": "req-1", "inputs": [image_tensor(images)]}).json()
    assert body["model_name"] == MODEL and body["model_version"] == MODEL and body["id"] == "req-1"


def test_nested_json_data_is_accepted(client: TestClient, model: str, images: np.ndarray) -> None:
    flat = outputs_of(client.post(INFER, json={"inputs": [image_tensor(images[:2])]}))
    nested = outputs_of(client.post(INFER, json={"inputs": [{**image_tensor(images[:2]),
                                                             "data": images[:2].tolist()}]}))
    assert flat == nested


def test_images_of_any_size_are_resized_like_predict(client: TestClient, model: str, images: np.ndarray) -> None:
    from PIL import Image

    big = np.stack([np.asarray(Image.fromarray(img).resize((57, 45), Image.Resampling.BICUBIC)) for img in images])
    out = outputs_of(client.post(INFER, json={"inputs": [image_tensor(big)]}))
    expected = v1_predictions(client, big)  # the same 57x45 pixels as PNG files, resized by /v1
    probs = np.array(out["probabilities"]["data"]).reshape(len(big), 10)
    np.testing.assert_allclose(probs, [p["probabilities"] for p in expected], atol=1e-6)


def test_binary_tensors_both_ways(client: TestClient, model: str, images: np.ndarray) -> None:
    header = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                          "parameters": {"binary_data_size": images.nbytes}}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                          {"name": "label", "parameters": {"binary_data": True}}]}
    body, headers = binary_request(header, images.tobytes())
    response_header, blobs = split_binary(client.post(INFER, content=body, headers=headers))
    probs = np.frombuffer(blobs["probabilities"], dtype="<f4").reshape(len(images), 10)
    json_probs = outputs_of(client.post(INFER, json={"inputs": [image_tensor(images)]}))["probabilities"]["data"]
    np.testing.assert_array_equal(probs.ravel(), np.array(json_probs, dtype=np.float32))
    expected = v1_predictions(client, images)
    assert [b.decode() for b in bytes_elements(blobs["label"])] == [p["label"] for p in expected]
    assert all("data" not in o for o in response_header["outputs"])


def test_binary_input_with_json_outputs_and_binary_data_output(client: TestClient, model: str,
                                                              images: np.ndarray) -> None:
    header: dict[str, Any] = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                                          "parameters": {"binary_data_size": images.nbytes}}]}
    body, headers = binary_request(header, images.tobytes())
    as_json = client.post(INFER, content=body, headers=headers)
    assert as_json.headers["content-type"] == "application/json" and "data" in as_json.json()["outputs"][0]
    body, headers = binary_request({**header, "parameters": {"binary_data_output": True}}, images.tobytes())
    _, blobs = split_binary(client.post(INFER, content=body, headers=headers))
    assert set(blobs) == {"probabilities", "label"}


def test_image_bytes_binary_and_base64(client: TestClient, model: str, images: np.ndarray) -> None:
    files = [png(img) for img in images[:4]]
    header = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [4],
                          "parameters": {"binary_data_size": len(serialized(files))}}]}
    body, headers = binary_request(header, serialized(files))
    binary = outputs_of(client.post(INFER, content=body, headers=headers))
    as_b64 = outputs_of(client.post(INFER, json={"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [4],
                                                             "data": [base64.b64encode(f).decode() for f in files]}]}))
    assert binary == as_b64
    assert as_b64["label"]["data"] == [p["label"] for p in v1_predictions(client, images[:4])]


def test_classification_strings_are_tritons(client: TestClient, model: str, images: np.ndarray) -> None:
    request = {"inputs": [image_tensor(images)],
               "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}
    out = outputs_of(client.post(INFER, json=request))
    assert set(out) == {"probabilities"}
    assert out["probabilities"]["datatype"] == "BYTES" and out["probabilities"]["shape"] == [len(images), 3]
    expected = v1_predictions(client, images)
    strings = np.array(out["probabilities"]["data"]).reshape(len(images), 3)
    for row, prediction in zip(strings, expected, strict=True):
        assert list(row) == [f"{c['probability']:.6f}:{c['class_index']}:{c['label']}" for c in prediction["top_k"]]
        score, index, label = row[0].split(":")
        assert len(score.split(".")[1]) == 6 and CLASS_NAMES[int(index)] == label


def test_only_the_requested_outputs_are_answered(client: TestClient, model: str, images: np.ndarray) -> None:
    out = outputs_of(client.post(INFER, json={"inputs": [image_tensor(images[:1])], "outputs": [{"name": "label"}]}))
    assert set(out) == {"label"}


def test_a_model_of_another_size_and_class_count(client: TestClient, small: str, small_model_file: Path,
                                                 images: np.ndarray, artifact_dir: Path) -> None:
    assert (artifact_dir / "models" / SMALL / TFLITE_FILE).read_bytes() == small_model_file.read_bytes()
    request = {"inputs": [image_tensor(images)],
               "outputs": [{"name": "probabilities"}, {"name": "label"},]}
    out = outputs_of(client.post(f"/v2/models/{SMALL}/infer", json=request))
    expected = litert_probabilities(small_model_file, np.stack([resized(img, 96) for img in images]))
    probs = np.array(out["probabilities"]["data"]).reshape(len(images), 3)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert out["label"]["data"] == [SMALL_CLASSES[i] for i in expected.argmax(axis=1)]
    top = outputs_of(client.post(f"/v2/models/{SMALL}/infer", json={
        "inputs": [image_tensor(images)], "outputs": [{"name": "probabilities", "parameters": {"classification": 5}}]}))
    assert top["probabilities"]["shape"] == [len(images), 3]  # bounded by the 3 classes
    at_size = np.stack([resized(img, 96).astype(np.uint8) for img in images[:2]])
    same = outputs_of(client.post(f"/v2/models/{SMALL}/infer", json={"inputs": [image_tensor(at_size)]}))
    np.testing.assert_allclose(np.array(same["probabilities"]["data"]).reshape(2, 3), expected[:2], atol=1e-6)


def test_a_gzip_body_is_inflated(client: TestClient, model: str, images: np.ndarray) -> None:
    request = json.dumps({"inputs": [image_tensor(images[:2])]}).encode()
    plain = outputs_of(client.post(INFER, content=request, headers={"Content-Type": "application/json"}))
    zipped = client.post(INFER, content=gzip.compress(request),
                         headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert outputs_of(zipped) == plain
    assert_error(client.post(INFER, content=b"not gzip", headers={"Content-Encoding": "gzip"}), 400, "gzip")
    assert_error(client.post(INFER, content=request, headers={"Content-Encoding": "br"}), 415)


def test_infer_is_counted_and_micro_batched(client: TestClient, model: str, images: np.ndarray) -> None:
    assert client.post(INFER, json={"inputs": [image_tensor(images[:5])]}).status_code == 200
    metrics = client.get("/metrics").text
    assert "tl_predictions_total 5.0" in metrics
    assert "tl_predict_batch_images_count 1.0" in metrics  # the model's batcher ran it
    assert 'route="/v2/models/{name}/infer",status="200"' in metrics


# ----- errors -----

ZEROS = np.zeros((1, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize(("tensor", "contains"), [
    ({"name": "input_1", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": ZEROS.ravel().tolist()}, "input_1"),
    ({"name": "image", "datatype": "FP32", "shape": [1, 32, 32, 3], "data": ZEROS.ravel().tolist()}, "UINT8"),
    ({"name": "image", "datatype": "UINT4", "shape": [1, 32, 32, 3], "data": [0]}, "datatype"),
    ({"name": "image", "datatype": "UINT8", "shape": [32, 32, 3], "data": ZEROS.ravel().tolist()}, "[N, H, W, 3]"),
    ({"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 4], "data": [0] * 4096}, "[N, H, W, 3]"),
    ({"name": "image", "datatype": "UINT8", "shape": [2, 32, 32, 3], "data": ZEROS.ravel().tolist()}, "elements"),
    ({"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [256] * 3072}, "0..255"),
    ({"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0.5] * 3072}, "integers"),
    ({"name": "image", "datatype": "UINT8", "shape": [0, 32, 32, 3], "data": []}, "at least one"),
    ({"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3]}, "neither"),
    ({"name": "image", "datatype": "UINT8", "shape": "1x32x32x3", "data": [0]}, "shape"),
    ({"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]}, "image 0"),
    ({"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}, "base64"),
    ({"name": "image_bytes", "datatype": "UINT8", "shape": [1], "data": [0]}, "BYTES"),
    ({"name": "image_bytes", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}, "elements"),
])
def test_wrong_inputs_are_400(client: TestClient, model: str, tensor: dict[str, Any], contains: str) -> None:
    assert_error(client.post(INFER, json={"inputs": [tensor]}), 400, contains)


@pytest.mark.parametrize(("request_body", "contains"), [
    ({"inputs": []}, "inputs"),
    ({}, "inputs"),
    ([1, 2], "object"),
    ({"inputs": [image_tensor(ZEROS), image_tensor(ZEROS)]}, "one input"),
    ({"inputs": [image_tensor(ZEROS)], "outputs": [{"name": "logits"}]}, "logits"),
    ({"inputs": [image_tensor(ZEROS)], "outputs": [{"name": "label", "parameters": {"classification": 2}}]},
     "classification"),
    ({"inputs": [image_tensor(ZEROS)], "outputs": [{"name": "probabilities", "parameters": {"binary_data": 1}}]},
     "binary_data"),
    ({"inputs": [image_tensor(ZEROS)], "id": 7}, "id"),
])
def test_wrong_requests_are_400(client: TestClient, model: str, request_body: Any, contains: str) -> None:
    assert_error(client.post(INFER, json=request_body), 400, contains)


def test_broken_bodies_are_400(client: TestClient, model: str) -> None:
    assert_error(client.post(INFER, content=b"{not json", headers={"Content-Type": "application/json"}), 400, "JSON")
    header = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                          "parameters": {"binary_data_size": 3072}}]}
    body, headers = binary_request(header, b"\0" * 3000)
    assert_error(client.post(INFER, content=body, headers=headers), 400, "binary_data_size")
    body, headers = binary_request({**header, "inputs": [{**header["inputs"][0], "parameters": {
        "binary_data_size": 3000}}]}, b"\0" * 3000)
    assert_error(client.post(INFER, content=body, headers=headers), 400, "3072 bytes")
    assert_error(client.post(INFER, content=body, headers={"Inference-Header-Content-Length": "99999"}), 400)
    assert_error(client.post(INFER, content=body, headers={"Inference-Header-Content-Length": "x"}), 400)
    files = serialized([png(ZEROS[0])])[:-5]
    body, headers = binary_request({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                                "parameters": {"binary_data_size": len(files)}}]}, files)
    assert_error(client.post(INFER, content=body, headers=headers), 400, "past the end")


def test_too_many_images_is_413_and_a_wrong_media_type_415(client: TestClient, model: str) -> None:
    many = {"name": "image", "datatype": "UINT8", "shape": [65, 1, 1, 3], "data": [0] * 195}
    assert_error(client.post(INFER, json={"inputs": [many]}), 413, "at most 64")
    assert_error(client.post(INFER, content=b"x", headers={"Content-Type": "text/plain"}), 415)
    huge = {"name": "image", "datatype": "UINT8", "shape": [1, 10000, 10000, 3], "parameters": {"binary_data_size": 0}}
    body, headers = binary_request({"inputs": [huge]})
    assert_error(client.post(INFER, content=body, headers=headers), 413, "pixels")


def test_the_bearer_key_guards_v2_but_not_its_health_probes(redis_url: str, artifact_dir: Path, model: str,
                                                            app_client: Callable[[Settings], TestClient]) -> None:
    client = app_client(make_settings(redis_url, artifact_dir, api_key="s3cret"))
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    for path in ("/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready"):
        assert client.get(path).status_code == 401
    assert client.post(INFER, json={"inputs": [image_tensor(ZEROS)]}).status_code == 401
    authorized = client.post(INFER, json={"inputs": [image_tensor(ZEROS)]}, headers={"Authorization": "Bearer s3cret"})
    assert authorized.status_code == 200


def test_oip_image_files_are_bounded_by_their_headers(client: TestClient, model: str) -> None:
    import base64 as b64module

    from svc_helpers import raw_png

    bomb = b64module.b64encode(raw_png(6320, 6320, 1, 0, None)).decode()
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [bomb]}]}
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 413, response.text
    assert "TL_MAX_IMAGE_PIXELS" in response.json()["error"]


def test_the_guards_refusals_on_protocol_routes_are_the_protocols_error_json(
        settings: Settings, app_client: Callable[[Settings], TestClient]) -> None:
    client = app_client(settings.model_copy(update={"api_key": "k", "max_upload_bytes": 2048}))
    for path in ("/v2/models/latest/infer", "/v1/models/latest:predict"):
        unauthorised = client.post(path, json={})
        assert unauthorised.status_code == 401 and unauthorised.json().keys() == {"error"}, unauthorised.text
        assert unauthorised.headers["content-type"] == "application/json"
        too_large = client.post(path, content=b"x" * 4096, headers={"Authorization": "Bearer k",
                                                                    "Content-Type": "application/json"})
        assert too_large.status_code == 413 and "TL_MAX_UPLOAD_BYTES" in too_large.json()["error"]
    assert client.get("/v1/jobs").headers["content-type"] == "application/problem+json"  # /v1 keeps its own
