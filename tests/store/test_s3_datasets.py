"""Datasets in the S3 artifact store (a real SeaweedFS, `s3_server`), with each "host" a store of its own over
its own cache directory, sharing only the bucket: an upload received by the API is processed by the dataset
worker of another host and read, verified, by a training worker on a third; a dataset is ready only with its
manifest; a damaged file is caught; a delete leaves nothing behind, and other hosts drop their copies; the
sweep removes what killed processes left in the bucket."""

from __future__ import annotations

import io
import secrets
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import testkit
from PIL import Image
from s3kit import SeaweedS3

from worker.config import Settings
from worker.dataset_tasks import process_dataset_now
from worker.jobstore import utc_now
from worker.store import DatasetStore, open_dataset_store
from worker.store.datasets import DatasetRecord, new_dataset_id
from worker.store.s3 import MANIFEST_FILE, StoreIntegrityError
from worker.store.s3_datasets import S3DatasetStore

pytestmark = pytest.mark.realdata

CLASSES = {"planes": 0, "frogs": 6}


@pytest.fixture
def url(bucket: str) -> str:
    return f"s3://{bucket}/t{secrets.token_hex(4)}"


@pytest.fixture
def host(url: str, tmp_path: Path) -> Callable[..., Settings]:
    """The settings of one "host": the shared bucket, its own artifact and cache directories."""
    def make(name: str) -> Settings:
        return Settings(artifact_dir=tmp_path / name / "artifacts", cache_dir=tmp_path / name / "cache",
                        artifact_url=url)
    return make


@pytest.fixture(scope="module")
def archive() -> bytes:
    """A zip of class folders: 40 real CIFAR-10 test images per class, as PNG."""
    if testkit.data_dir() is None:
        pytest.skip("CIFAR-10 is not here (TL_DATA_DIR)")
    with np.load(testkit.cifar10_npz("test")) as data:
        x, y = data["x"], data["y"].reshape(-1)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, label in CLASSES.items():
            for i, index in enumerate(np.flatnonzero(y == label)[:40]):
                png = io.BytesIO()
                Image.fromarray(x[index]).save(png, format="PNG")
                archive.writestr(f"{name}/{i}.png", png.getvalue())
    return out.getvalue()


def upload(settings: Settings, archive: bytes) -> str:
    """What the API does with an upload: the archive into the store, then the `processing` record."""
    store = open_dataset_store(settings)
    dataset_id = new_dataset_id()
    with store.receiving(dataset_id) as path:
        path.write_bytes(archive)
    store.put(DatasetRecord(id=dataset_id, name="two", status="processing", created_at=utc_now()))
    return dataset_id


def keys(s3_server: SeaweedS3, url: str) -> set[str]:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    listing: dict[str, Any] = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
    return {o["Key"][len(prefix) + 1:] for o in listing.get("Contents", [])}


def test_settings_with_an_artifact_url_open_the_s3_dataset_store(host: Callable[..., Settings],
                                                                 tmp_path: Path) -> None:
    assert isinstance(open_dataset_store(host("a")), S3DatasetStore)
    assert isinstance(open_dataset_store(Settings(artifact_dir=tmp_path, artifact_url=None)), DatasetStore)


def test_an_upload_is_processed_on_another_host_and_read_verified_on_a_third(
        host: Callable[..., Settings], archive: bytes, s3_server: SeaweedS3, url: str) -> None:
    api, processor, trainer = host("api"), host("datasets"), host("trainer")
    dataset_id = upload(api, archive)
    assert not list((api.cache_dir).rglob("*.bin")), "the API keeps no copy of the archive"
    assert f"uploads/{dataset_id}.bin" in keys(s3_server, url)

    assert process_dataset_now(dataset_id, processor) == "ready"
    stored = keys(s3_server, url)
    assert f"uploads/{dataset_id}.bin" not in stored, "the archive goes once processed"
    assert {f"datasets/{dataset_id}.json", f"datasets/{dataset_id}/{MANIFEST_FILE}",
            f"datasets/{dataset_id}/x_train.npy"} <= stored

    record = open_dataset_store(api).get(dataset_id)
    assert record is not None and record.status == "ready" and record.classes == sorted(CLASSES)
    assert record.split_size("train") + record.split_size("test") == 80
    assert [r.id for r in open_dataset_store(api).list()] == [dataset_id]

    data_dir = open_dataset_store(trainer).data_dir(dataset_id)
    assert data_dir is not None and data_dir.is_relative_to(trainer.cache_dir)
    processed = processor.cache_dir / "datasets" / dataset_id
    for name in ("x_train.npy", "y_train.npy", "x_test.npy", "summary.json", "preview.png"):
        assert (data_dir / name).read_bytes() == (processed / name).read_bytes()
    assert not any(p.is_file() for p in api.artifact_dir.rglob("*")), "nothing under TL_ARTIFACT_DIR"


def test_a_dataset_without_its_manifest_is_not_read_and_a_damaged_file_is_caught(
        host: Callable[..., Settings], archive: bytes, s3_server: SeaweedS3, url: str) -> None:
    dataset_id = upload(host("api"), archive)
    assert process_dataset_now(dataset_id, host("datasets")) == "ready"
    bucket, prefix = url[len("s3://"):].split("/", 1)
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key=f"{prefix}/datasets/{dataset_id}/x_train.npy", Body=b"tampered")
    with pytest.raises(StoreIntegrityError, match="x_train.npy does not match its manifest"):
        open_dataset_store(host("reader")).data_dir(dataset_id)
    client.delete_object(Bucket=bucket, Key=f"{prefix}/datasets/{dataset_id}/{MANIFEST_FILE}")
    assert open_dataset_store(host("other")).data_dir(dataset_id) is None


def test_a_delete_leaves_nothing_and_other_hosts_drop_their_copies(
        host: Callable[..., Settings], archive: bytes, s3_server: SeaweedS3, url: str) -> None:
    dataset_id = upload(host("api"), archive)
    assert process_dataset_now(dataset_id, host("datasets")) == "ready"
    trainer = S3DatasetStore(url, host("trainer").cache_dir, fresh_seconds=0.0)
    copy = trainer.data_dir(dataset_id)
    assert copy is not None and copy.is_dir()

    assert open_dataset_store(host("api")).delete(dataset_id)
    assert keys(s3_server, url) == set()
    assert trainer.get(dataset_id) is None and trainer.data_dir(dataset_id) is None
    assert not copy.exists(), "the trainer's copy goes once the manifest is gone"
    assert not open_dataset_store(host("api")).delete(dataset_id)


def test_a_failed_dataset_keeps_no_archive(host: Callable[..., Settings], s3_server: SeaweedS3, url: str) -> None:
    dataset_id = upload(host("api"), b"this is not an archive at all" * 10)
    assert process_dataset_now(dataset_id, host("datasets")) == "failed"
    record = open_dataset_store(host("api")).get(dataset_id)
    assert record is not None and record.error is not None and record.error.type == "InvalidDataset"
    assert keys(s3_server, url) == {f"datasets/{dataset_id}.json"}


def test_sweep_removes_unmanifested_files_and_uploads_no_record_awaits(
        host: Callable[..., Settings], s3_server: SeaweedS3, url: str) -> None:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    client = s3_server.client()
    awaited = upload(host("api"), b"an archive a worker will read")
    client.put_object(Bucket=bucket, Key=f"{prefix}/datasets/ds_killed/x_train.npy", Body=b"partial")
    client.put_object(Bucket=bucket, Key=f"{prefix}/uploads/ds_orphan.bin", Body=b"no record")
    time.sleep(1.1)
    open_dataset_store(host("worker")).sweep(max_age_seconds=1.0)
    assert keys(s3_server, url) == {f"datasets/{awaited}.json", f"uploads/{awaited}.bin"}
