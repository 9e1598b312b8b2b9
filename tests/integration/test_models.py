"""Models through HTTP: predict with every body form, aliases, weights download, curves, delete."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from .harness import BASELINE_SMALL, Stack, cifar10_test_images, png_bytes, train

pytestmark = [pytest.mark.integration, pytest.mark.realdata]

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def labels(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [p["class_index"] for p in response.json()["predictions"]]


def probabilities(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([p["probabilities"] for p in response.json()["predictions"]], dtype=np.float64)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    return cifar10_test_images(64, seed=123)


def test_predict_every_body_form_agrees_and_beats_chance(client: httpx.Client, transfer_job: dict[str, Any],
                                                         images: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = images
    url = f"/v1/models/{transfer_job['model_id']}/predict"
    pngs = [png_bytes(image) for image in x]

    multipart = client.post(url, files=[("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)])
    b64 = client.post(url, json={"instances": [{"b64": base64.b64encode(data).decode()} for data in pngs]})
    nested = client.post(url, json={"instances": x.tolist()})
    raw = [client.post(url, content=pngs[i], headers={"Content-Type": "image/png"}) for i in range(4)]

    predicted = labels(multipart)
    assert len(predicted) == len(x)
    assert labels(b64) == predicted
    assert labels(nested) == predicted
    assert [labels(r)[0] for r in raw] == predicted[:4]
    first = multipart.json()
    assert first["model_id"] == transfer_job["model_id"]
    top = first["predictions"][0]
    assert top["label"] == CLASSES[top["class_index"]]
    assert len(top["top_k"]) == 3 and top["top_k"][0]["class_index"] == top["class_index"]
    accuracy = float(np.mean(np.array(predicted) == y))
    print(f"accuracy on {len(x)} real CIFAR-10 test images: {accuracy:.3f}")
    assert accuracy > 0.3  # chance is 0.1


def test_predict_top_k_and_probabilities(client: httpx.Client, transfer_job: dict[str, Any],
                                         images: tuple[np.ndarray, np.ndarray]) -> None:
    response = client.post(f"/v1/models/{transfer_job['model_id']}/predict", params={"top_k": 5, "probabilities": True},
                           json={"instances": images[0][:3].tolist()})
    probs = probabilities(response)
    assert probs.shape == (3, 10)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    for prediction, row in zip(response.json()["predictions"], probs, strict=True):
        assert [k["class_index"] for k in prediction["top_k"]] == list(np.argsort(-row)[:5])


def test_alias_default_is_used_by_v1_predict(client: httpx.Client, transfer_job: dict[str, Any],
                                             baseline_job: dict[str, Any],
                                             images: tuple[np.ndarray, np.ndarray]) -> None:
    body = {"instances": images[0][:2].tolist()}
    for model_id in (baseline_job["model_id"], transfer_job["model_id"]):
        response = client.put("/v1/aliases/default", json={"model_id": model_id})
        assert response.status_code == 200
        assert response.json() == {"alias": "default", "model_id": model_id}
        assert client.post("/v1/predict", json=body).json()["model_id"] == model_id
        assert client.get("/v1/models/default").json()["id"] == model_id

    assert {"alias": "default", "model_id": transfer_job["model_id"]} in client.get("/v1/aliases").json()["items"]
    assert "default" in client.get(f"/v1/models/{transfer_job['model_id']}").json()["aliases"]
    assert client.put("/v1/aliases/latest", json={"model_id": transfer_job["model_id"]}).status_code in (400, 409, 422)
    assert client.delete("/v1/aliases/default").status_code == 204
    # Without `default`, /v1/predict serves the newest model.
    newest = client.get("/v1/models/latest").json()["id"]
    assert client.post("/v1/predict", json=body).json()["model_id"] == newest


def test_downloaded_weights_predict_like_the_service(client: httpx.Client, transfer_job: dict[str, Any],
                                                     images: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    model_id = transfer_job["model_id"]
    x = images[0][:16]
    served = probabilities(client.post(f"/v1/models/{model_id}/predict", params={"probabilities": True},
                                       json={"instances": x.tolist()}))

    keras_file = client.get(f"/v1/models/{model_id}/weights")
    assert keras_file.status_code == 200
    assert keras_file.headers["content-type"] == "application/octet-stream"
    assert ".keras" in keras_file.headers["content-disposition"]
    (tmp_path / "model.keras").write_bytes(keras_file.content)
    tflite_file = client.get(f"/v1/models/{model_id}/weights", params={"format": "tflite"})
    assert tflite_file.status_code == 200
    assert ".tflite" in tflite_file.headers["content-disposition"]
    (tmp_path / "model.tflite").write_bytes(tflite_file.content)

    import keras  # the test process loads the files as a user would

    model = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True, compile=False)
    from_keras = np.asarray(model.predict(x.astype("float32"), verbose=0), dtype=np.float64)

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tmp_path / "model.tflite"))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, [len(x), 32, 32, 3])
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x.astype("float32"))
    interpreter.invoke()
    from_tflite = interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).astype(np.float64)

    assert np.abs(from_tflite - served).max() < 1e-4  # the service serves this very file
    assert np.abs(from_keras - served).max() < 0.02
    assert (from_keras.argmax(axis=1) == served.argmax(axis=1)).mean() >= 0.9


def test_curves_png(client: httpx.Client, transfer_job: dict[str, Any]) -> None:
    response = client.get(f"/v1/models/{transfer_job['model_id']}/curves.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_deleted_model_is_gone_everywhere(stack: Stack, client: httpx.Client,
                                          images: tuple[np.ndarray, np.ndarray]) -> None:
    job = train(client, {**BASELINE_SMALL, "train_samples": 100, "seed": 31})
    model_id = job["model_id"]
    assert client.put("/v1/aliases/doomed", json={"model_id": model_id}).status_code == 200

    assert client.delete(f"/v1/models/{model_id}").status_code == 204

    assert client.get(f"/v1/models/{model_id}").status_code == 404
    predict = client.post(f"/v1/models/{model_id}/predict", json={"instances": images[0][:1].tolist()})
    assert predict.status_code == 404
    assert predict.headers["content-type"].startswith("application/problem+json")
    assert client.get(f"/v1/models/{model_id}/weights").status_code == 404
    assert client.get("/v1/models/doomed").status_code == 404
    assert "doomed" not in {a["alias"] for a in client.get("/v1/aliases").json()["items"]}
    assert model_id not in {m["id"] for m in client.get("/v1/models").json()["items"]}
    assert not (stack.artifact_dir / "models" / model_id).exists()
