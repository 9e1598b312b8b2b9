"""Uploaded datasets in S3-compatible object storage (`TL_ARTIFACT_URL=s3://bucket/prefix`): `DatasetStore`'s
interface over the bucket, so the API, the dataset worker and every training worker may run on different hosts.

Layout under `s3://bucket/prefix/`:
    datasets/{id}.json                 the Dataset record (rewritten as processing moves along)
    datasets/{id}/{file}               the processed arrays, summary.json, preview.png
    datasets/{id}/manifest.json        written LAST, with every file's size and sha256
    uploads/{id}.bin                   the archive as uploaded, until it has been processed

(No key has a part that starts with a dot: SeaweedFS leaves such "hidden" objects out of its listings.)

As with models, processed data exists only once its manifest does; a host reads it through `data_dir`, which
downloads it once into `TL_CACHE_DIR/datasets/{id}/`, checking every file against the manifest (training
memory-maps the arrays from there). An upload is streamed to `TL_CACHE_DIR` first and sent to the bucket before
its record is written, so a `processing` record always has its archive in the store. A delete removes the
record first (no longer listed or usable), then the manifest, the files and this host's copy; other hosts drop
theirs when they next find the manifest gone.
"""

from __future__ import annotations

import builtins
import contextlib
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.errors import ArtifactWriteError
from worker.store.datasets import CIFAR10_ID, DATASETS_DIR, DatasetRecord, receiving_upload
from worker.store.local import SWEEP_MAX_AGE_SECONDS, sweep_entries, valid_id
from worker.store.s3 import FRESH_SECONDS, CopyCache, S3Bucket

UPLOADS_DIR = "uploads"


class S3DatasetStore:
    """Dataset records, uploads and processed data in a bucket; this host's copies in `cache_dir`."""

    def __init__(self, url: str, cache_dir: Path, *, client: Any = None, fresh_seconds: float = FRESH_SECONDS,
                 max_bytes: int | None = None) -> None:
        self._bucket = S3Bucket(url, client)
        self.url = url
        #: The disk bound of this host's downloaded datasets (None: none).
        self.max_bytes = max_bytes
        #: Where this host keeps its copies (for messages, like the local store's `root`).
        self.root = Path(cache_dir) / DATASETS_DIR
        self._uploads = Path(cache_dir) / "dataset-uploads"
        self._staging_dir = Path(cache_dir) / "datasets-staging"
        self._copies = CopyCache(self._bucket, self._key(""), self.root, "dataset", fresh_seconds, max_bytes)

    @property
    def location(self) -> str:
        return f"{self.url.rstrip('/')}/{DATASETS_DIR}"

    def _key(self, *parts: str) -> str:
        return self._bucket.key(DATASETS_DIR, *parts)

    def _upload_key(self, dataset_id: str) -> str:
        return self._bucket.key(UPLOADS_DIR, f"{dataset_id}.bin")

    def check(self) -> None:
        self._bucket.check()

    # ----- records -----

    def get(self, dataset_id: str) -> DatasetRecord | None:
        if not valid_id(dataset_id) or dataset_id == CIFAR10_ID or dataset_id.startswith("."):
            return None
        raw = self._bucket.get(self._key(f"{dataset_id}.json"))
        if raw is None:
            return None
        try:
            return DatasetRecord.model_validate_json(raw)
        except (ValueError, ValidationError):
            return None  # a damaged record is not listed; it never breaks a listing

    def put(self, record: DatasetRecord) -> None:
        record.updated_at = time.time()
        self._bucket.put(self._key(f"{record.id}.json"), record.model_dump_json().encode("utf-8"),
                         "application/json")

    def list(self) -> builtins.list[DatasetRecord]:
        """Every uploaded dataset, newest first."""
        prefix = self._key("")
        names = [obj["Key"][len(prefix):] for obj in self._bucket.keys(prefix, delimiter="/")]
        records = [r for r in (self.get(n[:-5]) for n in names if n.endswith(".json")) if r is not None]
        records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return records

    # ----- uploads -----

    def upload_path(self, dataset_id: str) -> Path:
        """Where this host keeps an archive while it is received or processed."""
        return self._uploads / f"{dataset_id}.bin"

    def new_upload(self, dataset_id: str) -> Path:
        """A local path to write an uploaded archive to; `keep_upload` sends it to the bucket."""
        path = self.upload_path(dataset_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def keep_upload(self, dataset_id: str, path: Path) -> None:
        """Send the archive at `path` to the bucket (StoreUnavailable when it cannot be); the local file is
        removed either way."""
        try:
            self._bucket.upload_file(path, self._upload_key(dataset_id))
        finally:
            path.unlink(missing_ok=True)

    receiving = receiving_upload

    @contextlib.contextmanager
    def fetched_upload(self, dataset_id: str) -> Iterator[Path | None]:
        """The uploaded archive as a local file (downloaded from the bucket), or None when it is gone; the
        local copy is removed when the block ends."""
        path = self.upload_path(dataset_id).with_suffix(f".{secrets.token_hex(4)}.bin")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                self._bucket.download_file(self._upload_key(dataset_id), path)
            except OSError as exc:
                if _missing(exc):
                    yield None
                    return
                raise
            yield path
        finally:
            path.unlink(missing_ok=True)

    def discard_upload(self, dataset_id: str) -> None:
        self._bucket.delete(self._upload_key(dataset_id))

    # ----- processed data -----

    @contextlib.contextmanager
    def staging(self, dataset_id: str) -> Iterator[Path]:
        """A local path (not yet created) to write the processed dataset into; removed on any error."""
        try:
            self._staging_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactWriteError(f"cannot create a dataset directory under {self._staging_dir}: "
                                     f"{exc.strerror or exc}; check TL_CACHE_DIR") from exc
        staging = self._staging_dir / f"{dataset_id}-{secrets.token_hex(4)}"
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def publish(self, staging: Path, dataset_id: str) -> Path:
        """Upload the processed files, then their manifest (last); the staging directory becomes this host's
        copy. ArtifactWriteError when the store cannot take them (nothing of them is then ever read)."""
        try:
            manifest = self._bucket.upload_tree(staging, self._key(dataset_id, ""), {"id": dataset_id})
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ArtifactWriteError(f"cannot write dataset {dataset_id} to {self.url}: {exc}") from exc
        self._copies.remember(dataset_id, manifest)
        return self._copies.place(staging, dataset_id)

    def data_dir(self, dataset_id: str) -> Path | None:
        """This host's verified copy of a complete dataset (downloaded on first use), or None."""
        if not valid_id(dataset_id) or dataset_id.startswith("."):
            return None
        return self._copies.local_copy(dataset_id)

    def delete(self, dataset_id: str) -> bool:
        """Remove a dataset: its record first (no longer listed or usable), then its data and upload."""
        if self.get(dataset_id) is None:
            return False
        self._bucket.delete(self._key(f"{dataset_id}.json"))
        with contextlib.suppress(OSError):  # what is left is swept (no record, no manifest)
            self._bucket.delete(self._key(dataset_id, "manifest.json"))
            self.discard_upload(dataset_id)
        self._bucket.remove_prefix(self._key(dataset_id, ""))
        self._copies.remember(dataset_id, None)
        self._copies.drop(dataset_id)
        return True

    def sweep(self, max_age_seconds: float = SWEEP_MAX_AGE_SECONDS) -> builtins.list[Path]:
        """This host's staging and upload leftovers untouched for `max_age_seconds`; in the bucket, processed
        files that never got a manifest and uploads no `processing` record waits for, once as old."""
        removed = sweep_entries(self._staging_dir, max_age_seconds)
        removed += sweep_entries(self._uploads, max_age_seconds)
        self._bucket.sweep_unmanifested(self._key(""), max_age_seconds, "dataset")
        cutoff = time.time() - max_age_seconds
        prefix = self._bucket.key(UPLOADS_DIR, "")
        for obj in builtins.list(self._bucket.keys(prefix)):
            name = obj["Key"][len(prefix):]
            if obj["LastModified"].timestamp() >= cutoff or not name.endswith(".bin"):
                continue
            record = self.get(name[:-4])
            if record is None or record.status != "processing":
                self._bucket.delete(obj["Key"])
        return removed


def _missing(exc: OSError) -> bool:
    """The StoreUnavailable of a GET/download of an object that does not exist."""
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    return isinstance(response, dict) and str(response.get("Error", {}).get("Code")) in ("404", "NoSuchKey",
                                                                                        "NotFound")
