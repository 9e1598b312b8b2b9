"""The S3 artifact store against a real S3 endpoint (SeaweedFS, started by the `s3_server` fixture): publish,
list, verify and delete models; aliases from two threads; a half-uploaded model never listed; a corrupted file
caught on download; a missing bucket named at start-up; a store that cannot be reached is an OSError."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from s3kit import CREDENTIALS, SeaweedS3

from worker.config import Settings
from worker.store import METADATA_FILE, ModelStore, open_model_store
from worker.store.local import ModelGone
from worker.store.s3 import MANIFEST_FILE, S3ModelStore, StoreConfigError, StoreIntegrityError, StoreUnavailable

METRICS = {"train_accuracy": 0.6, "test_accuracy": 0.5, "test_loss": 1.2, "params_total": 10,
           "params_trainable": 10, "params_non_trainable": 0, "train_seconds": 1.0}


def metadata(model_id: str, created_at: str = "2026-01-01T00:00:00.000Z") -> dict[str, Any]:
    return {"id": model_id, "name": None, "kind": "baseline", "job_id": f"j_{model_id}", "created_at": created_at,
            "classes": ["cat", "dog"], "spec": {"model": "baseline"}, "metrics": METRICS}


def publish(store: S3ModelStore, model_id: str, created_at: str = "2026-01-01T00:00:00.000Z",
            payload: bytes = b"weights" * 1000) -> Path:
    with store.staging(model_id) as staging:
        (staging / METADATA_FILE).write_text(json.dumps(metadata(model_id, created_at)))
        (staging / "model.keras").write_bytes(payload)
    return store.publish(staging, model_id)


@pytest.fixture
def prefix() -> str:
    """Each test's own prefix in the module's bucket (a bucket per test would cost SeaweedFS volumes)."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def make_store(bucket: str, prefix: str) -> Callable[..., S3ModelStore]:
    def make(cache: Path, **kwargs: Any) -> S3ModelStore:
        return S3ModelStore(f"s3://{bucket}/{prefix}", cache, **kwargs)
    return make


@pytest.fixture
def worker_store(make_store: Callable[..., S3ModelStore], tmp_path: Path) -> S3ModelStore:
    return make_store(tmp_path / "worker-cache")


@pytest.fixture
def api_store(make_store: Callable[..., S3ModelStore], tmp_path: Path) -> S3ModelStore:
    return make_store(tmp_path / "api-cache", fresh_seconds=0.0)


def test_settings_with_an_artifact_url_open_the_s3_store_else_the_local_one(bucket: str, tmp_path: Path) -> None:
    local = open_model_store(Settings(artifact_dir=tmp_path / "a", artifact_url=None))
    s3 = open_model_store(Settings(artifact_dir=tmp_path / "a", artifact_url=f"s3://{bucket}/p",
                                   cache_dir=tmp_path / "c"), check=True)
    assert type(local) is ModelStore
    assert isinstance(s3, S3ModelStore) and s3.bucket == bucket and s3.prefix == "p/"


def test_a_published_model_is_listed_and_downloaded_verified_on_another_host(
        worker_store: S3ModelStore, api_store: S3ModelStore, tmp_path: Path) -> None:
    publish(worker_store, "m_one", payload=b"x" * 300_000)
    assert api_store.list_ids() == ["m_one"]
    assert api_store.info("m_one") is not None and api_store.info("m_one").kind == "baseline"  # type: ignore[union-attr]
    path = api_store.model_dir("m_one")
    assert path == tmp_path / "api-cache" / "models" / "m_one"
    assert (path / "model.keras").read_bytes() == b"x" * 300_000
    assert api_store.resolve("latest") == "m_one"


def test_models_are_listed_newest_first(worker_store: S3ModelStore, api_store: S3ModelStore) -> None:
    publish(worker_store, "m_old", "2026-01-01T00:00:00.000Z")
    publish(worker_store, "m_new", "2026-02-01T00:00:00.000Z")
    assert api_store.list_ids() == ["m_new", "m_old"]
    assert [m.id for m in api_store.list()] == ["m_new", "m_old"]


def test_a_model_without_its_manifest_is_never_listed_nor_served(
        worker_store: S3ModelStore, api_store: S3ModelStore, s3_server: SeaweedS3, bucket: str, prefix: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key=f"{prefix}/models/m_half/metadata.json", Body=json.dumps(metadata("m_half")))
    client.put_object(Bucket=bucket, Key=f"{prefix}/models/m_half/model.keras", Body=b"partial")
    assert api_store.list_ids() == []
    assert api_store.model_dir("m_half") is None
    assert api_store.resolve("m_half") is None


def test_a_corrupted_file_is_detected_on_download(
        worker_store: S3ModelStore, api_store: S3ModelStore, s3_server: SeaweedS3, bucket: str, prefix: str,
        tmp_path: Path) -> None:
    publish(worker_store, "m_bad")
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/models/m_bad/model.keras", Body=b"weightz" * 1000)
    with pytest.raises(StoreIntegrityError, match="model.keras does not match its manifest"):
        api_store.model_dir("m_bad")
    assert not (tmp_path / "api-cache" / "models" / "m_bad").exists()


def test_delete_removes_the_manifest_first_and_every_file_and_alias(
        worker_store: S3ModelStore, api_store: S3ModelStore, s3_server: SeaweedS3, bucket: str, prefix: str) -> None:
    publish(worker_store, "m_gone")
    api_store.set_alias("prod", "m_gone")
    assert api_store.model_dir("m_gone") is not None
    assert worker_store.delete("m_gone") is True
    assert api_store.list_ids() == [] and api_store.model_dir("m_gone") is None
    assert api_store.read_aliases() == {}
    assert s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("KeyCount") == 0
    assert worker_store.delete("m_gone") is False


def test_a_model_deleted_elsewhere_stops_resolving_within_the_freshness_window(
        make_store: Callable[..., S3ModelStore], worker_store: S3ModelStore, tmp_path: Path) -> None:
    api = make_store(tmp_path / "api2", fresh_seconds=0.2)
    publish(worker_store, "m_x")
    assert api.resolve("m_x") == "m_x" and api.model_dir("m_x") is not None
    worker_store.delete("m_x")
    time.sleep(0.3)
    assert api.resolve("m_x") is None
    assert not (tmp_path / "api2" / "models" / "m_x").exists()


def test_aliases_set_from_two_threads_never_clobber_each_other(
        worker_store: S3ModelStore, make_store: Callable[..., S3ModelStore], tmp_path: Path) -> None:
    publish(worker_store, "m_a")
    publish(worker_store, "m_b")
    stores = [make_store(tmp_path / f"api{i}", fresh_seconds=0.0) for i in range(2)]
    errors: list[BaseException] = []

    def setter(store: S3ModelStore, prefix: str, model_id: str) -> None:
        try:
            for i in range(15):
                store.set_alias(f"{prefix}{i}", model_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=setter, args=(stores[0], "a", "m_a")),
               threading.Thread(target=setter, args=(stores[1], "b", "m_b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    aliases = stores[0].read_aliases()
    assert aliases == {**{f"a{i}": "m_a" for i in range(15)}, **{f"b{i}": "m_b" for i in range(15)}}
    assert stores[1].delete_alias("a3") is True and stores[1].delete_alias("a3") is False


def test_set_alias_on_a_missing_model_is_model_gone(api_store: S3ModelStore) -> None:
    with pytest.raises(ModelGone):
        api_store.set_alias("prod", "m_none")
    assert api_store.read_aliases() == {}


def test_sweep_removes_the_files_of_an_upload_that_never_got_its_manifest(
        worker_store: S3ModelStore, s3_server: SeaweedS3, bucket: str, prefix: str) -> None:
    publish(worker_store, "m_kept")
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/models/m_killed/model.keras", Body=b"partial")
    worker_store.sweep(max_age_seconds=0.0)
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]}
    assert keys == {f"{prefix}/models/m_kept/metadata.json", f"{prefix}/models/m_kept/model.keras",
                    f"{prefix}/models/m_kept/{MANIFEST_FILE}"}


def test_a_missing_bucket_is_a_start_up_error_that_names_it(s3_server: SeaweedS3, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(artifact_dir=tmp_path, artifact_url="s3://tl-no-such-bucket/x", cache_dir=tmp_path / "c")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreConfigError, match="'tl-no-such-bucket'") as caught:
        open_model_store(settings, check=True)
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in str(caught.value)
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in caplog.text


def test_an_unreachable_store_is_an_oserror_without_credentials(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                          aws_access_key_id="k", aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                          config=Config(connect_timeout=0.5, retries={"max_attempts": 1}))
    store = S3ModelStore("s3://tl-any/x", tmp_path, client=client)
    with pytest.raises(StoreUnavailable) as caught:
        store.list_ids()
    assert isinstance(caught.value, OSError) and "tl-any" in str(caught.value)
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in str(caught.value)


def test_engine_caches_move_to_the_cache_dir_only_with_an_s3_store(tmp_path: Path) -> None:
    local = Settings(artifact_dir=tmp_path / "a", cache_dir=tmp_path / "c", artifact_url=None)
    s3 = Settings(artifact_dir=tmp_path / "a", cache_dir=tmp_path / "c", artifact_url="s3://tl-any/x")
    assert (local.feature_cache_dir, local.data_cache_dir, local.export_template_dir) == (
        tmp_path / "a" / "feature-cache", tmp_path / "a" / "data-cache", tmp_path / "a" / "export-templates")
    assert (s3.feature_cache_dir, s3.data_cache_dir, s3.export_template_dir) == (
        tmp_path / "c" / "feature-cache", tmp_path / "c" / "data-cache", tmp_path / "c" / "export-templates")


def test_downloaded_copies_stay_within_their_bound_least_recently_used_first(
        worker_store: S3ModelStore, make_store: Callable[..., S3ModelStore], tmp_path: Path) -> None:
    payload = b"w" * 40_000
    for model_id in ("m_one", "m_two", "m_three"):
        publish(worker_store, model_id, payload=payload)
    api = make_store(tmp_path / "bounded-cache", max_bytes=100_000)  # two copies fit, not three
    first = api.model_dir("m_one")
    assert first is not None
    time.sleep(0.05)
    assert api.model_dir("m_two") is not None
    time.sleep(0.05)
    assert api.model_dir("m_one") == first  # used again: now m_two is the least recently used
    time.sleep(0.05)
    assert api.model_dir("m_three") is not None
    cached = sorted(p.name for p in api.models_dir.iterdir())
    assert cached == ["m_one", "m_three"]
    again = api.model_dir("m_two")  # evicted copies come back, verified
    assert again is not None and (again / "model.keras").read_bytes() == payload
    assert len(list(api.models_dir.iterdir())) == 2
