"""Predict with a real trained model on real CIFAR-10 test images, through every body form, and every way
a predict request can be wrong."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from fastapi.testclient import TestClient
from PIL import Image
from svc_helpers import add_model, assert_problem, cifar_test_images, image_bytes, make_settings, png, raw_png

from worker.config import Settings
from worker.spec import CLASS_NAMES
from worker.store import TFLITE_FILE

pytestmark = pytest.mark.realdata

MODEL = "m_served0000000000"
N_IMAGES = 128  # two full multipart/JSON requests of 64


@pytest.fixture
def model(artifact_dir: Path, trained_model: Path) -> str:
    add_model(artifact_dir, trained_model, MODEL)
    return MODEL


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    return cifar_test_images(N_IMAGES, start=1000)


def labels_of(response: Any) -> list[int]:
    assert response.status_code == 200, response.text
    return [p["class_index"] for p in response.json()["predictions"]]


def predict_multipart(client: TestClient, x: np.ndarray, path: str = f"/v1/models/{MODEL}/predict") -> list[int]:
    out: list[int] = []
    for start in range(0, len(x), 64):
        files = [("file", (f"img{start + i}.png", png(img), "image/png")) for i, img in enumerate(x[start:start + 64])]
        out += labels_of(client.post(path, files=files))
    return out


def predict_b64(client: TestClient, x: np.ndarray) -> list[int]:
    out: list[int] = []
    for start in range(0, len(x), 64):
        instances = [{"b64": base64.b64encode(png(img)).decode()} for img in x[start:start + 64]]
        out += labels_of(client.post(f"/v1/models/{MODEL}/predict", json={"instances": instances}))
    return out


def predict_nested(client: TestClient, x: np.ndarray) -> list[int]:
    out: list[int] = []
    for start in range(0, len(x), 64):
        instances = [img.tolist() for img in x[start:start + 64]]
        out += labels_of(client.post(f"/v1/models/{MODEL}/predict", json={"instances": instances}))
    return out


def predict_raw(client: TestClient, x: np.ndarray, fmt: str) -> list[int]:
    media = {"PNG": "image/png", "JPEG": "image/jpeg"}[fmt]
    out: list[int] = []
    for img in x:
        body = image_bytes(Image.fromarray(img), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        out += labels_of(client.post(f"/v1/models/{MODEL}/predict", content=body, headers={"content-type": media}))
    return out


def direct_tflite(model_dir: Path, x: np.ndarray) -> np.ndarray:
    """The model's own TFLite export, run without the service: what predict must agree with."""
    interpreter = Interpreter(model_path=str(model_dir / TFLITE_FILE))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x.astype(np.float32))
    interpreter.invoke()
    return np.array(interpreter.get_tensor(out["index"]))


def test_every_body_form_classifies_real_images_above_chance_and_agrees(
        client: TestClient, model: str, images: tuple[np.ndarray, np.ndarray], artifact_dir: Path) -> None:
    x, y = images
    multipart = predict_multipart(client, x)
    b64 = predict_b64(client, x)
    nested = predict_nested(client, x)
    raw_png = predict_raw(client, x[:32], "PNG")
    raw_jpeg = predict_raw(client, x[:32], "JPEG")
    expected = direct_tflite(artifact_dir / "models" / model, x).argmax(axis=1).tolist()
    # Lossless forms give exactly what the model gives on the raw pixels.
    assert multipart == b64 == nested == expected
    assert raw_png == expected[:32]
    accuracy = float(np.mean(np.array(multipart) == y))
    print(f"accuracy through the API: {accuracy:.3f} on {len(y)} real CIFAR-10 test images")
    assert accuracy >= 0.2, f"accuracy {accuracy:.3f} on {len(y)} real CIFAR-10 test images"
    jpeg_agreement = float(np.mean(np.array(raw_jpeg) == np.array(expected[:32])))
    assert jpeg_agreement >= 0.75, jpeg_agreement  # JPEG at quality 95 changes a few pixels, rarely the class


def test_prediction_shape_top_k_and_probabilities(client: TestClient, model: str,
                                                  images: tuple[np.ndarray, np.ndarray], artifact_dir: Path) -> None:
    x = images[0][:3]
    body = client.post(f"/v1/models/{MODEL}/predict", params={"top_k": 5, "probabilities": "true"},
                       json={"instances": [img.tolist() for img in x]}).json()
    assert body["model_id"] == MODEL and len(body["predictions"]) == 3
    direct = direct_tflite(artifact_dir / "models" / model, x)
    for prediction, probs in zip(body["predictions"], direct, strict=True):
        assert set(prediction) == {"label", "class_index", "probability", "top_k", "probabilities"}
        assert len(prediction["top_k"]) == 5
        ranked = [entry["probability"] for entry in prediction["top_k"]]
        assert ranked == sorted(ranked, reverse=True)
        assert prediction["top_k"][0] == {k: prediction[k] for k in ("label", "class_index", "probability")}
        assert all(entry["label"] == CLASS_NAMES[entry["class_index"]] for entry in prediction["top_k"])
        assert prediction["class_index"] == int(probs.argmax())
        np.testing.assert_allclose(prediction["probabilities"], probs, atol=1e-5)
        assert abs(sum(prediction["probabilities"]) - 1) < 1e-3
    default = client.post(f"/v1/models/{MODEL}/predict", files=[("file", ("a.png", png(x[0]), "image/png"))]).json()
    assert len(default["predictions"][0]["top_k"]) == 3 and "probabilities" not in default["predictions"][0]


@pytest.mark.parametrize("query", ["top_k=0", "top_k=11", "top_k=x", "probabilities=maybe"])
def test_invalid_query_parameters_are_422(client: TestClient, model: str, query: str) -> None:
    response = client.post(f"/v1/models/{MODEL}/predict?{query}", json={"instances": [np.zeros((32, 32, 3)).tolist()]})
    assert_problem(response, 422)


def test_predict_without_a_ref_uses_default_then_latest(client: TestClient, artifact_dir: Path,
                                                        trained_model: Path) -> None:
    one = [("file", ("a.png", png(np.zeros((32, 32, 3))), "image/png"))]
    add_model(artifact_dir, trained_model, "m_older", created_at="2026-01-01T00:00:00.000Z")
    add_model(artifact_dir, trained_model, "m_newer", created_at="2026-02-01T00:00:00.000Z")
    assert client.post("/v1/predict", files=one).json()["model_id"] == "m_newer"
    client.put("/v1/aliases/default", json={"model_id": "m_older"})
    assert client.post("/v1/predict", files=one).json()["model_id"] == "m_older"
    assert client.post("/v1/models/latest/predict", files=one).json()["model_id"] == "m_newer"


def test_no_model_yet_says_to_train_one(client: TestClient) -> None:
    one = [("file", ("a.png", png(np.zeros((32, 32, 3))), "image/png"))]
    assert_problem(client.post("/v1/predict", files=one), 404, "train one first")
    assert_problem(client.post("/v1/models/latest/predict", files=one), 404, "train one first")


def test_unknown_model_is_404(client: TestClient, model: str) -> None:
    one = [("file", ("a.png", png(np.zeros((32, 32, 3))), "image/png"))]
    assert_problem(client.post("/v1/models/m_unknown/predict", files=one), 404, "m_unknown")
    assert_problem(client.post("/v1/models/..%2F..%2Fetc/predict", files=one), 404)


def test_a_deleted_model_is_evicted_and_predict_answers_404(client: TestClient, model: str) -> None:
    one = [("file", ("a.png", png(np.zeros((32, 32, 3))), "image/png"))]
    assert client.post(f"/v1/models/{MODEL}/predict", files=one).status_code == 200
    cache = client.app.state.services.cache  # type: ignore[attr-defined]
    assert cache.loaded_ids() == [MODEL]
    assert client.delete(f"/v1/models/{MODEL}").status_code == 204
    assert cache.loaded_ids() == []
    assert_problem(client.post(f"/v1/models/{MODEL}/predict", files=one), 404)


def test_models_stay_in_a_small_lru_cache(redis_url: str, artifact_dir: Path, trained_model: Path,
                                          app_client: Callable[[Settings], TestClient]) -> None:
    client = app_client(make_settings(redis_url, artifact_dir, model_cache_size=2))
    for model_id in ("m_a", "m_b", "m_c"):
        add_model(artifact_dir, trained_model, model_id)
    one = [("file", ("a.png", png(np.zeros((32, 32, 3))), "image/png"))]
    cache = client.app.state.services.cache  # type: ignore[attr-defined]
    for model_id in ("m_a", "m_b", "m_a", "m_c"):
        assert client.post(f"/v1/models/{model_id}/predict", files=one).status_code == 200
    assert cache.loaded_ids() == ["m_a", "m_c"]  # m_b was least recently used
    loads = client.get("/metrics").text
    assert 'tl_model_load_seconds_count{backend="tflite"} 3.0' in loads  # m_a loaded once, not per request


def test_predictions_served_are_counted(client: TestClient, model: str) -> None:
    instances = [np.zeros((32, 32, 3)).tolist()] * 5
    assert client.post(f"/v1/models/{MODEL}/predict", json={"instances": instances}).status_code == 200
    assert "tl_predictions_total 5.0" in client.get("/metrics").text


def test_keras_fallback_without_a_tflite_export(client: TestClient, artifact_dir: Path, trained_model: Path,
                                                images: tuple[np.ndarray, np.ndarray]) -> None:
    add_model(artifact_dir, trained_model, "m_kerasonly", tflite=False)
    x = images[0][:40]
    instances = [img.tolist() for img in x]
    first = client.post("/v1/models/m_kerasonly/predict", json={"instances": instances}, params={"probabilities": 1})
    assert first.status_code == 200, first.text
    entry = client.app.state.services.cache._entries["m_kerasonly"]  # type: ignore[attr-defined]
    assert entry.backend == "keras"
    for size in (1, 7, 40):  # other batch sizes reuse the one traced function
        assert client.post("/v1/models/m_kerasonly/predict", json={"instances": instances[:size]}).status_code == 200
    assert entry.batcher.runner._call.experimental_get_tracing_count() == 1
    keras_probs = np.array([p["probabilities"] for p in first.json()["predictions"]])
    np.testing.assert_allclose(keras_probs, direct_tflite(trained_model, x), atol=1e-4)


# ----- bad bodies -----


def one_png() -> bytes:
    return png(np.full((32, 32, 3), 100))


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", "image/tiff",
                                          "application/x-www-form-urlencoded", ""])
def test_unsupported_content_types_are_415(client: TestClient, model: str, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(f"/v1/models/{MODEL}/predict", content=one_png(), headers=headers)
    assert_problem(response, 415, "multipart/form-data")


@pytest.mark.parametrize("body, status, detail", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[]", 422, "instances"),
    (b'{"inputs": []}', 422, "instances"),
    (b'{"instances": []}', 422, "non-empty"),
    (b'{"instances": {"b64": "x"}}', 422, "non-empty list"),
    (b'{"instances": [{"b64": ""}]}', 400, "image 0"),
    (b'{"instances": [{"b64": "bm90IGFuIGltYWdl"}]}', 400, "image 0"),
    (b'{"instances": [{"b64": "%%%"}]}', 400, "base64"),
    (b'{"instances": [{"b64": 5}]}', 422, "image 0"),
    (b'{"instances": [{"url": "http://x"}]}', 422, "image 0"),
    (b'{"instances": [7]}', 422, "image 0"),
    (b'{"instances": [[1, 2, 3]]}', 422, "32x32x3"),
    (b'{"instances": [[[[1, 2, 3]]]], "top_k": 3}', 422, "unknown"),
    (b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "not valid JSON"),
    (b'{"instances": [' + b"[" * 300 + b"]" * 300 + b"]}", 422, "32x32x3"),
    (b'{"instances": [' + json.dumps([[[1e400, 0, 0]] * 32] * 32).encode() + b"]}", 422, "outside 0..255"),
    (b'{"instances": [' + json.dumps([[[10**30, 0, 0]] * 32] * 32).encode() + b"]}", 422, "32x32x3"),
    (b'{"instances": [' + json.dumps([[[None, 0, 0]] * 32] * 32).encode() + b"]}", 422, "32x32x3"),
])
def test_bad_json_bodies(client: TestClient, model: str, body: bytes, status: int, detail: str) -> None:
    response = client.post(f"/v1/models/{MODEL}/predict", content=body, headers={"content-type": "application/json"})
    assert_problem(response, status, detail)


def test_invalid_instances_name_their_index(client: TestClient, model: str) -> None:
    instances: list[Any] = [np.zeros((32, 32, 3)).tolist(), np.full((32, 32, 3), 300).tolist()]
    problem = assert_problem(client.post(f"/v1/models/{MODEL}/predict", json={"instances": instances}), 422,
                             "image 1")
    assert problem["errors"][0]["loc"] == ["body", "instances", 1]


def test_too_many_images_is_413(client: TestClient, model: str) -> None:
    instances = [np.zeros((32, 32, 3), dtype=int).tolist()] * 65
    assert_problem(client.post(f"/v1/models/{MODEL}/predict", json={"instances": instances}), 413, "at most 64")
    files = [("file", (f"{i}.png", one_png(), "image/png")) for i in range(65)]
    assert_problem(client.post(f"/v1/models/{MODEL}/predict", files=files), 413, "at most 64")


def test_exactly_max_batch_images_is_fine(client: TestClient, model: str) -> None:
    files = [("file", (f"{i}.png", one_png(), "image/png")) for i in range(64)]
    assert len(labels_of(client.post(f"/v1/models/{MODEL}/predict", files=files))) == 64


def test_multipart_without_file_parts_is_400(client: TestClient, model: str) -> None:
    assert_problem(client.post(f"/v1/models/{MODEL}/predict", data={"x": "1"}, files=[("image", ("a.png", one_png()))]),
                   400, "named 'file'")
    assert_problem(client.post(f"/v1/models/{MODEL}/predict", data={"file": "not a file"},
                               files=[("other", ("a.png", one_png()))]), 400, "not a file")


def test_malformed_multipart_is_400(client: TestClient, model: str) -> None:
    response = client.post(f"/v1/models/{MODEL}/predict", content=b"--xx\r\nrubbish",
                           headers={"content-type": "multipart/form-data"})
    assert_problem(response, 400, "multipart")


def hostile_files() -> dict[str, bytes]:
    good = one_png()
    return {"truncated": good[: len(good) // 2], "magic": b"\x00\x01\x02\x03" + good[4:], "empty": b"",
            "bomb": raw_png(100_000, 100_000, 8, 2, None)}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("kind, status, detail", [
    ("truncated", 400, "could not be decoded"), ("magic", 400, "is not a PNG"), ("empty", 400, "empty"),
    ("bomb", 413, "too large"),
])
def test_hostile_images_name_the_part_that_failed(client: TestClient, model: str, kind: str, status: int,
                                                  detail: str) -> None:
    files = [("file", ("fine.png", one_png(), "image/png")), ("file", ("evil.png", hostile_files()[kind], "image/png"))]
    problem = assert_problem(client.post(f"/v1/models/{MODEL}/predict", files=files), status, detail)
    assert "image 1 (part 'file' #1, 'evil.png')" in problem["detail"]
    raw = client.post(f"/v1/models/{MODEL}/predict", content=hostile_files()[kind],
                      headers={"content-type": "image/png"})
    assert_problem(raw, status, "image 0 (the request body)")
    b64 = base64.b64encode(hostile_files()[kind]).decode()
    assert_problem(client.post(f"/v1/models/{MODEL}/predict", json={"instances": [{"b64": b64}]}), status,
                   "image 0 (instances[0])")


def test_unusual_but_valid_images_are_classified(client: TestClient, model: str) -> None:
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    palette = Image.new("P", (40, 40))
    palette.putpalette([0, 128, 255] * 256)
    values = np.full((32, 32), 40000, dtype=">u2")
    files = {
        "anim.gif": image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "grey16.png": raw_png(32, 32, 16, 0, b"".join(b"\x00" + row.tobytes() for row in values)),
        "palette.png": image_bytes(palette),
        "cmyk.jpg": image_bytes(Image.new("CMYK", (50, 70), (10, 200, 30, 5)), "JPEG"),
        "rgba.webp": image_bytes(Image.new("RGBA", (64, 64), (1, 2, 3, 128)), "WEBP"),
        "big.bmp": image_bytes(Image.new("RGB", (1000, 800), (50, 60, 70)), "BMP"),
    }
    response = client.post(f"/v1/models/{MODEL}/predict", files=[("file", (n, d)) for n, d in files.items()])
    assert len(labels_of(response)) == len(files)


def test_predictions_keep_request_order(client: TestClient, model: str, images: tuple[np.ndarray, np.ndarray],
                                        artifact_dir: Path) -> None:
    x = images[0][:10][::-1]
    expected = direct_tflite(artifact_dir / "models" / model, x).argmax(axis=1).tolist()
    assert predict_multipart(client, x) == expected
    body = json.dumps({"instances": [img.tolist() for img in x]})
    response = client.post(f"/v1/models/{MODEL}/predict", content=body, headers={"content-type": "application/json"})
    assert labels_of(response) == expected


def test_settings_can_be_overridden_per_app(client: TestClient, model: str, settings: Settings) -> None:
    from service.deps import get_app_settings

    overrides = client.app.dependency_overrides  # type: ignore[attr-defined]
    overrides[get_app_settings] = lambda: settings.model_copy(update={"max_batch": 2})
    instances = [np.zeros((32, 32, 3)).tolist()] * 3
    assert_problem(client.post(f"/v1/models/{MODEL}/predict", json={"instances": instances}), 413, "at most 2")
    overrides.clear()
    assert client.post(f"/v1/models/{MODEL}/predict", json={"instances": instances}).status_code == 200
