"""Uploaded datasets in the artifact store: one record per dataset, and its arrays written completely or not at all.

Layout under `TL_ARTIFACT_DIR`:
    datasets/{id}.json           the Dataset record (status processing | ready | failed, counts, error ...)
    datasets/{id}/               the processed arrays (x_train.npy ... summary.json, preview.png), present only
                                 once complete (renamed from staging), before the record says `ready`
    datasets/.uploads/{id}.bin   the archive as uploaded, until it has been processed
    datasets/.staging/, .trash/  directories being written or removed

The record is the truth for listing; a dataset is listed `ready` only when its directory is complete. A
delete removes the record first (so the dataset is no longer listed or usable), then the directory.
`DatasetStore.sweep` removes what a killed process left: old staging directories, trash, uploads no record
waits for, and crashed temporary files.
No TensorFlow here: the API reads datasets through this module.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from worker.errors import ArtifactWriteError
from worker.store.local import (
    SWEEP_MAX_AGE_SECONDS,
    publish_directory,
    sweep_entries,
    sweep_temp_files,
    valid_id,
    write_json_atomic,
)

DatasetStatus = Literal["processing", "ready", "failed"]

CIFAR10_ID = "cifar10"
DATASETS_DIR = "datasets"
_UPLOADS = ".uploads"
_STAGING = ".staging"
_TRASH = ".trash"
PREVIEW_FILE = "preview.png"
LOST_MESSAGE = ("the worker processing this dataset stopped (killed, out of memory or its machine lost); "
                "upload it again")


class DatasetError(BaseModel):
    type: str
    message: str


class DatasetDuplicates(BaseModel):
    within_split: int = 0
    train_test: int = 0


class SkippedFile(BaseModel):
    path: str
    reason: str


class Dataset(BaseModel):
    """The Dataset object of shared/API.md."""

    id: str
    name: str | None = None
    status: DatasetStatus
    created_at: str
    classes: list[str] = Field(default_factory=list)
    image_shape: list[int] | None = None
    counts: dict[str, dict[str, int]] = Field(default_factory=lambda: {"train": dict[str, int](), "test": {}})
    skipped: list[SkippedFile] = Field(default_factory=list)
    skipped_count: int = 0
    duplicates: DatasetDuplicates = Field(default_factory=DatasetDuplicates)
    bytes: int = 0
    sha256: str | None = None
    error: DatasetError | None = None
    #: Our own: how far processing got (0..1) while `processing`.
    progress: float = 0.0

    def split_size(self, split: str) -> int:
        return sum(self.counts.get(split, {}).values())


class DatasetRecord(Dataset):
    """The stored record: the Dataset plus what only the service needs (upload options, processing clock)."""

    test_fraction: float = 0.2
    seed: int = 42
    started_at: float | None = None  # unix seconds when a worker took it
    updated_at: float | None = None  # unix seconds of its last progress write

    def lost(self, now: float, lost_seconds: float) -> bool:
        """Processing started and its heartbeat went silent for `lost_seconds` (its worker died)."""
        return (self.status == "processing" and self.started_at is not None
                and (self.updated_at or 0.0) < now - lost_seconds)

    def public(self) -> Dataset:
        return Dataset.model_validate(self.model_dump(include=set(Dataset.model_fields)))


@contextlib.contextmanager
def receiving_upload(store: Any, dataset_id: str) -> Iterator[Path]:
    """Either dataset store's `receiving`: `store.new_upload`'s path, kept (`store.keep_upload`: left in place, or
    sent to the bucket) when the block ends without error, removed otherwise. Write the record after the block,
    so a `processing` record always has its archive."""
    path = store.new_upload(dataset_id)
    try:
        yield path
        store.keep_upload(dataset_id, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def new_dataset_id() -> str:
    return f"ds_{secrets.token_hex(8)}"


class DatasetStore:
    """Reads and writes dataset records, uploads and processed directories under one artifact directory."""

    def __init__(self, artifact_dir: Path) -> None:
        self.root = Path(artifact_dir) / DATASETS_DIR

    @property
    def location(self) -> str:
        """Where the datasets are, for messages."""
        return str(self.root)

    # ----- paths -----

    def _record_path(self, dataset_id: str) -> Path:
        return self.root / f"{dataset_id}.json"

    def upload_path(self, dataset_id: str) -> Path:
        return self.root / _UPLOADS / f"{dataset_id}.bin"

    def data_dir(self, dataset_id: str) -> Path | None:
        """The directory of a complete, ready dataset, or None."""
        if not valid_id(dataset_id) or dataset_id.startswith("."):
            return None
        path = self.root / dataset_id
        return path if (path / "summary.json").is_file() else None

    # ----- records -----

    def get(self, dataset_id: str) -> DatasetRecord | None:
        if not valid_id(dataset_id) or dataset_id == CIFAR10_ID:
            return None
        try:
            return DatasetRecord.model_validate_json(self._record_path(dataset_id).read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, ValidationError, OSError):
            return None  # a damaged record is not listed; it never breaks a listing

    def put(self, record: DatasetRecord) -> None:
        """Write the record atomically (and durably)."""
        self.root.mkdir(parents=True, exist_ok=True)
        record.updated_at = time.time()
        write_json_atomic(self._record_path(record.id), record.model_dump(mode="json"))

    def list(self) -> list[DatasetRecord]:
        """Every uploaded dataset, newest first."""
        try:
            names = [e.name for e in os.scandir(self.root) if e.is_file() and e.name.endswith(".json")]
        except FileNotFoundError:
            return []
        records = [r for r in (self.get(name[:-5]) for name in names) if r is not None]
        records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return records

    # ----- uploads -----

    def new_upload(self, dataset_id: str) -> Path:
        """A local path to write an uploaded archive to; `keep_upload` stores it (here: it stays where it is)."""
        path = self.upload_path(dataset_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def keep_upload(self, dataset_id: str, path: Path) -> None:
        """Store the archive written to `new_upload`'s path (it already is, in this store)."""

    receiving = receiving_upload

    @contextlib.contextmanager
    def fetched_upload(self, dataset_id: str) -> Iterator[Path | None]:
        """The uploaded archive as a local file, or None when it is gone."""
        path = self.upload_path(dataset_id)
        yield path if path.is_file() else None

    def discard_upload(self, dataset_id: str) -> None:
        self.upload_path(dataset_id).unlink(missing_ok=True)

    # ----- processed data -----

    @contextlib.contextmanager
    def staging(self, dataset_id: str) -> Iterator[Path]:
        """A path (not yet created) to write the processed dataset into; removed on any error."""
        parent = self.root / _STAGING
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactWriteError(f"cannot create a dataset directory under {self.root}: {exc.strerror or exc}; "
                                     "check that TL_ARTIFACT_DIR is writable and has free space") from exc
        staging = parent / f"{dataset_id}-{secrets.token_hex(4)}"
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def publish(self, staging: Path, dataset_id: str) -> Path:
        """Publish a complete staging directory as `datasets/{id}` (`publish_directory`)."""
        return publish_directory(staging, self.root / dataset_id, f"dataset {dataset_id}")

    def delete(self, dataset_id: str) -> bool:
        """Remove a dataset: its record first (no longer listed or usable), then its files."""
        record = self._record_path(dataset_id)
        if not valid_id(dataset_id) or not record.is_file():
            return False
        record.unlink(missing_ok=True)
        self.discard_upload(dataset_id)
        path = self.root / dataset_id
        if path.is_dir():
            trash = self.root / _TRASH / f"{dataset_id}-{secrets.token_hex(4)}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return True

    def sweep(self, max_age_seconds: float = SWEEP_MAX_AGE_SECONDS) -> builtins.list[Path]:
        """Remove what killed processes left: staging directories untouched for `max_age_seconds`, every
        trash directory, uploaded archives as old whose record is gone or no longer `processing` (a crash
        between receiving and the record, or after processing), and `write_atomic` temporaries of records.
        The paths removed."""
        now = time.time()
        removed = sweep_entries(self.root / _STAGING, max_age_seconds, now)
        removed += sweep_entries(self.root / _TRASH, 0.0, now)
        removed += sweep_entries(self.root / _UPLOADS, max_age_seconds, now, keep=self._upload_awaited)
        removed += sweep_temp_files(self.root, max_age_seconds, now)
        return removed

    def _upload_awaited(self, upload: Path) -> bool:
        """An upload whose record still says `processing`: a dataset worker will (or does) read it."""
        if not upload.name.endswith(".bin"):
            return False
        record = self.get(upload.name[:-4])
        return record is not None and record.status == "processing"


def read_summary(data_dir: Path) -> dict[str, Any]:
    """The processing summary written beside a dataset's arrays."""
    data: dict[str, Any] = json.loads((data_dir / "summary.json").read_text(encoding="utf-8"))
    return data
