"""The model registry over a real artifact store: models, refs, delete, weights, curves and aliases."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from fastapi.testclient import TestClient
from PIL import Image
from svc_helpers import add_model, assert_problem

from worker.spec import CLASS_NAMES
from worker.store import KERAS_FILE, TFLITE_FILE

pytestmark = pytest.mark.realdata

OLD, NEW = "m_old0000000000000", "m_new0000000000000"


@pytest.fixture
def two_models(artifact_dir: Path, trained_model: Path) -> tuple[str, str]:
    add_model(artifact_dir, trained_model, OLD, created_at="2026-01-01T00:00:00.000Z", name="old")
    add_model(artifact_dir, trained_model, NEW, created_at="2026-06-01T00:00:00.000Z", name="new")
    return OLD, NEW


def test_no_models_is_an_empty_list(client: TestClient) -> None:
    assert client.get("/v1/models").json() == {"items": []}
    assert_problem(client.get("/v1/models/latest"), 404)


def test_models_are_listed_newest_first_with_the_api_fields(client: TestClient, two_models: tuple[str, str]) -> None:
    items = client.get("/v1/models").json()["items"]
    assert [m["id"] for m in items] == [NEW, OLD]
    model = items[0]
    assert set(model) == {"id", "name", "kind", "job_id", "created_at", "classes", "input_shape", "dataset", "spec",
                          "metrics", "aliases", "exports", "export_failures"}
    assert {"keras", "tflite"} <= set(model["exports"]) and model["exports"]["tflite"]["bytes"] > 0
    assert set(model["exports"]) | set(model["export_failures"]) == {"keras", "tflite", "tflite-float16",
                                                                     "tflite-int8", "savedmodel"}
    assert model["dataset"]["id"] == "cifar10" and model["dataset"]["name"] == "CIFAR-10"
    assert model["name"] == "new" and model["kind"] == "baseline" and model["job_id"] == "j_servicetests"
    assert model["classes"] == list(CLASS_NAMES) and model["input_shape"] == [32, 32, 3]
    assert model["spec"]["model"] == "baseline" and model["spec"]["epochs"] == 6
    assert set(model["metrics"]) == {"train_accuracy", "test_accuracy", "test_loss", "params_total",
                                     "params_trainable", "params_non_trainable", "train_seconds", "macro_f1",
                                     "per_class", "confusion_matrix"}
    assert model["aliases"] == []


def test_a_model_is_read_by_id_alias_or_latest(client: TestClient, two_models: tuple[str, str]) -> None:
    assert client.get(f"/v1/models/{OLD}").json()["id"] == OLD
    assert client.get("/v1/models/latest").json()["id"] == NEW
    client.put("/v1/aliases/prod", json={"model_id": OLD})
    by_alias = client.get("/v1/models/prod").json()
    assert by_alias["id"] == OLD and by_alias["aliases"] == ["prod"]


@pytest.mark.parametrize("ref", ["m_missing", "..", "..%2F..%2Fetc", "a" * 65, "m.x", ".staging", "%2Fetc%2Fpasswd"])
def test_unknown_or_invalid_refs_are_404(client: TestClient, two_models: tuple[str, str], ref: str) -> None:
    for path in (f"/v1/models/{ref}", f"/v1/models/{ref}/weights", f"/v1/models/{ref}/curves.png"):
        assert_problem(client.get(path), 404)
    assert_problem(client.delete(f"/v1/models/{ref}"), 404)


def test_delete_removes_the_model_and_its_aliases(client: TestClient, two_models: tuple[str, str],
                                                  artifact_dir: Path) -> None:
    client.put("/v1/aliases/prod", json={"model_id": NEW})
    client.put("/v1/aliases/keep", json={"model_id": OLD})
    response = client.delete(f"/v1/models/{NEW}")
    assert response.status_code == 204 and response.content == b""
    assert not (artifact_dir / "models" / NEW).exists()
    assert_problem(client.get(f"/v1/models/{NEW}"), 404)
    assert client.get("/v1/aliases").json() == {"items": [{"alias": "keep", "model_id": OLD}]}
    assert client.get("/v1/models/latest").json()["id"] == OLD
    assert_problem(client.delete(f"/v1/models/{NEW}"), 404)


def test_weights_download_the_keras_file_by_default(client: TestClient, two_models: tuple[str, str],
                                                    artifact_dir: Path) -> None:
    response = client.get(f"/v1/models/{OLD}/weights")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert f'filename="{OLD}.keras"' in response.headers["content-disposition"]
    assert response.content == (artifact_dir / "models" / OLD / KERAS_FILE).read_bytes()
    assert "config.json" in zipfile.ZipFile(io.BytesIO(response.content)).namelist()  # a Keras v3 archive


def test_weights_as_tflite_load_in_litert(client: TestClient, two_models: tuple[str, str]) -> None:
    response = client.get("/v1/models/latest/weights", params={"format": "tflite"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert f'filename="{NEW}.tflite"' in response.headers["content-disposition"]
    interpreter = Interpreter(model_content=response.content)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.set_tensor(inp["index"], np.full((1, 32, 32, 3), 128, dtype=np.float32))
    interpreter.invoke()
    probs = interpreter.get_tensor(out["index"])
    assert probs.shape == (1, 10) and abs(float(probs.sum()) - 1) < 1e-3


def test_tflite_of_a_model_without_one_is_404(client: TestClient, artifact_dir: Path, trained_model: Path) -> None:
    add_model(artifact_dir, trained_model, "m_kerasonly", tflite=False)
    assert (artifact_dir / "models" / "m_kerasonly" / TFLITE_FILE).exists() is False
    assert_problem(client.get("/v1/models/m_kerasonly/weights?format=tflite"), 404, "TensorFlow Lite")
    assert client.get("/v1/models/m_kerasonly/weights").status_code == 200


def test_unknown_weights_format_is_422(client: TestClient, two_models: tuple[str, str]) -> None:
    assert_problem(client.get(f"/v1/models/{OLD}/weights?format=onnx"), 422)


def test_curves_are_a_png(client: TestClient, two_models: tuple[str, str]) -> None:
    response = client.get(f"/v1/models/{OLD}/curves.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.width > 100


# ----- aliases -----


def test_set_list_move_and_delete_an_alias(client: TestClient, two_models: tuple[str, str]) -> None:
    response = client.put("/v1/aliases/default", json={"model_id": OLD})
    assert response.status_code == 200 and response.json() == {"alias": "default", "model_id": OLD}
    client.put("/v1/aliases/b-2_x", json={"model_id": OLD})
    assert client.get("/v1/aliases").json() == {"items": [{"alias": "b-2_x", "model_id": OLD},
                                                         {"alias": "default", "model_id": OLD}]}
    assert client.get(f"/v1/models/{OLD}").json()["aliases"] == ["b-2_x", "default"]
    assert client.put("/v1/aliases/default", json={"model_id": NEW}).json() == {"alias": "default", "model_id": NEW}
    assert client.get("/v1/models/default").json()["id"] == NEW
    assert client.delete("/v1/aliases/default").status_code == 204
    assert_problem(client.get("/v1/models/default"), 404)
    assert_problem(client.delete("/v1/aliases/default"), 404)
    assert client.get(f"/v1/models/{NEW}").status_code == 200  # the model stays


@pytest.mark.parametrize("alias", ["latest", "Default", "1abc", "a" * 33, "_x", "a.b", "caf%C3%A9"])
def test_invalid_alias_names_are_422(client: TestClient, two_models: tuple[str, str], alias: str) -> None:
    problem = assert_problem(client.put(f"/v1/aliases/{alias}", json={"model_id": OLD}), 422)
    assert problem["errors"][0]["loc"] == ["path", "alias"]


def test_alias_to_an_unknown_model_is_404(client: TestClient, two_models: tuple[str, str]) -> None:
    assert_problem(client.put("/v1/aliases/prod", json={"model_id": "m_nothere"}), 404, "m_nothere")
    assert_problem(client.put("/v1/aliases/prod", json={"model_id": "../../etc"}), 404)
    assert client.get("/v1/aliases").json() == {"items": []}


@pytest.mark.parametrize("body, status", [({}, 422), ({"model_id": OLD, "x": 1}, 422), ({"model_id": 5}, 422),
                                          (None, 422)])
def test_invalid_alias_bodies(client: TestClient, two_models: tuple[str, str], body: object, status: int) -> None:
    assert_problem(client.put("/v1/aliases/prod", json=body), status)


def test_alias_body_must_be_json(client: TestClient, two_models: tuple[str, str]) -> None:
    assert_problem(client.put("/v1/aliases/prod", content=b"{", headers={"content-type": "application/json"}), 400)
    assert_problem(client.put("/v1/aliases/prod", content=OLD.encode(), headers={"content-type": "text/plain"}), 415)
