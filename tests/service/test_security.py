"""What the service refuses to do with files: run code hidden in a model file, or write an upload under a
name the client chose."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from svc_helpers import add_model, assert_problem, png

from worker.store import KERAS_FILE

pytestmark = pytest.mark.realdata


def test_a_keras_file_with_code_in_it_is_never_run(client: TestClient, artifact_dir: Path, trained_model: Path,
                                                   tmp_path: Path) -> None:
    import keras

    marker = tmp_path / "code-ran"

    def touch(x):  # type: ignore[no-untyped-def]  # the payload: leaves a mark whenever it runs
        marker.touch()
        return x

    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(keras.layers.Lambda(touch)(inputs)))
    target = add_model(artifact_dir, trained_model, "m_lambda0000000000", tflite=False)
    keras.Model(inputs, outputs).save(target / KERAS_FILE)
    marker.unlink(missing_ok=True)  # building the model ran it once; loading must not

    response = client.post("/v1/models/m_lambda0000000000/predict", content=png(np.full((32, 32, 3), 7)),
                           headers={"Content-Type": "image/png"})

    assert_problem(response, 500, "could not be loaded")
    assert not marker.exists(), "the service deserialized and ran code from a model file"


def test_uploads_are_never_written_under_the_client_name(client: TestClient, artifact_dir: Path,
                                                         trained_model: Path) -> None:
    add_model(artifact_dir, trained_model, "m_upload0000000000")
    chosen = Path("/tmp") / f"tl-upload-{uuid.uuid4().hex}.png"
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)  # ~1.5 MB: spooled, not kept
    body = png(noise)
    assert len(body) > 1024 * 1024

    response = client.post("/v1/models/m_upload0000000000/predict",
                           files=[("file", (f"../../../../..{chosen}", body, "image/png")),
                                  ("file", (str(chosen), body, "image/png"))])

    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 2
    assert not chosen.exists()
    written = {p.name for p in (artifact_dir / "models").iterdir()}
    assert written == {"m_upload0000000000"}
