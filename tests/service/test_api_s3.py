"""The API over the S3 artifact store (a real SeaweedFS, `s3_server`): it lists and serves a model that a
"worker" on another host published (another store with its own cache dir), downloads it once into its own
TL_CACHE_DIR, stops serving it within seconds of its deletion elsewhere, answers 503 when the store is
unreachable, and refuses to start on a bucket that does not exist, naming it."""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from s3kit import CREDENTIALS, SeaweedS3
from svc_helpers import assert_problem, make_settings, png

from worker.config import Settings
from worker.store import METADATA_FILE
from worker.store.s3 import FRESH_SECONDS, S3ModelStore, StoreConfigError

MODEL = "m_s3served000000000"


@pytest.fixture
def url(bucket: str) -> str:
    return f"s3://{bucket}/t{secrets.token_hex(4)}"


@pytest.fixture
def s3_settings(settings: Settings, url: str, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"artifact_url": url, "cache_dir": tmp_path / "api-cache"})


def publish_from_worker(url: str, cache: Path, source: Path, model_id: str) -> S3ModelStore:
    """Publish a copy of a trained model as a worker on another host would (its own cache dir)."""
    store = S3ModelStore(url, cache)
    with store.staging(model_id) as staging:
        for child in source.iterdir():
            if child.is_file():
                shutil.copy2(child, staging / child.name)
        meta = json.loads((staging / METADATA_FILE).read_text())
        (staging / METADATA_FILE).write_text(json.dumps({**meta, "id": model_id}))
    store.publish(staging, model_id)
    return store


def predict(client: TestClient, ref: str) -> object:
    image = png(np.zeros((32, 32, 3), dtype=np.uint8))
    return client.post(f"/v1/models/{ref}/predict", files=[("file", ("a.png", image, "image/png"))])


def test_the_api_lists_and_serves_a_model_a_worker_published(
        s3_settings: Settings, url: str, trained_model: Path, tmp_path: Path,
        app_client: Callable[[Settings], TestClient]) -> None:
    publish_from_worker(url, tmp_path / "worker-cache", trained_model, MODEL)
    client = app_client(s3_settings)
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == [MODEL]
    response = predict(client, MODEL)
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    assert response.json()["model_id"] == MODEL  # type: ignore[attr-defined]
    assert (tmp_path / "api-cache" / "models" / MODEL / "model.tflite").is_file()
    download = client.get(f"/v1/models/{MODEL}/weights", params={"format": "tflite"})
    assert download.status_code == 200
    assert download.content == (trained_model / "model.tflite").read_bytes()
    assert not (s3_settings.artifact_dir / "models").exists()  # nothing in the local store


def test_a_model_deleted_elsewhere_stops_being_served_within_seconds(
        s3_settings: Settings, url: str, trained_model: Path, tmp_path: Path,
        app_client: Callable[[Settings], TestClient]) -> None:
    worker = publish_from_worker(url, tmp_path / "worker-cache", trained_model, MODEL)
    client = app_client(s3_settings)
    assert predict(client, MODEL).status_code == 200  # type: ignore[attr-defined]
    worker.delete(MODEL)
    time.sleep(FRESH_SECONDS + 0.5)
    assert_problem(predict(client, MODEL), 404)
    assert client.get("/v1/models").json()["items"] == []


def test_an_unreachable_store_answers_503_on_listing(
        s3_settings: Settings, app_client: Callable[[Settings], TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    client = app_client(s3_settings)
    store = client.app.state.services.registry.store  # type: ignore[attr-defined]
    monkeypatch.setattr(store._bucket, "client", _unreachable_client())
    response = client.get("/v1/models")
    assert_problem(response, 503)
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in response.text


def _unreachable_client() -> object:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                        aws_access_key_id="k", aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        config=Config(connect_timeout=0.5, retries={"max_attempts": 1}))


def test_the_api_does_not_start_on_a_missing_bucket_and_names_it(
        settings: Settings, s3_server: SeaweedS3, tmp_path: Path,
        app_client: Callable[[Settings], TestClient]) -> None:
    missing = settings.model_copy(update={"artifact_url": "s3://tl-missing-bucket/x", "cache_dir": tmp_path / "c"})
    with pytest.raises(StoreConfigError, match="'tl-missing-bucket'") as caught:
        app_client(missing)
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in str(caught.value)


def test_make_settings_leaves_the_local_store(tmp_path: Path) -> None:
    assert make_settings("redis://127.0.0.1:6379/0", tmp_path).artifact_url is None
