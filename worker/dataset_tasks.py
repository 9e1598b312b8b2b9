"""The Celery side of dataset processing: the `tl.process_dataset` task, on a queue and worker of its own.

`celery -A worker.dataset_tasks:app worker -Q datasets` runs it. It imports no TensorFlow, so this worker
starts in a second and never competes with training for the GPU. The work itself is
`worker.datasets.process_archive`; this module moves the Dataset record along
(processing -> ready | failed) and publishes the processed directory atomically before `ready`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.signals import worker_init, worker_ready
from celery.worker.request import Request

from worker.config import Settings, get_settings
from worker.errors import ArtifactWriteError
from worker.queue import DATASET_TASK, make_celery
from worker.store import AnyDatasetStore, open_dataset_store, require_artifact_store
from worker.store.datasets import LOST_MESSAGE, DatasetError, DatasetRecord

log = logging.getLogger(__name__)

app = make_celery(get_settings())



@contextmanager
def _heartbeat(store: AnyDatasetStore, record: DatasetRecord, interval: float) -> Iterator[None]:
    """Rewrite the record (its progress and `updated_at`) every `interval` seconds while processing runs,
    so a dataset whose worker died is recognised as lost (`DatasetRecord.lost`)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                if store.get(record.id) is not None:  # not deleted meanwhile
                    store.put(record)
            except OSError:
                log.warning("dataset %s: could not record progress", record.id, exc_info=True)

    thread = threading.Thread(target=beat, name=f"heartbeat-{record.id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _fail(store: AnyDatasetStore, record: DatasetRecord, error_type: str, message: str) -> str:
    record.status = "failed"
    record.error = DatasetError(type=error_type, message=message)
    store.put(record)
    store.discard_upload(record.id)
    log.warning("dataset %s: failed: %s: %s", record.id, error_type, message)
    return "failed"


def process_dataset_now(dataset_id: str, settings: Settings | None = None) -> str:
    """Process the uploaded archive of `dataset_id` and record the outcome; returns the final status."""
    settings = settings or get_settings()
    store = open_dataset_store(settings)
    record = store.get(dataset_id)
    if record is None or record.status != "processing":
        log.info("dataset %s: nothing to process (%s)", dataset_id, record.status if record else "no record")
        return "skipped"
    try:
        summary = _process(store, record, settings)
    except _Failed as failed:
        return _fail(store, record, failed.error_type, failed.message)
    except OSError as exc:  # the artifact store (a bucket) failed meanwhile
        log.warning("dataset %s: the artifact store failed: %s", dataset_id, exc)
        try:
            return _fail(store, record, "StoreUnavailable", f"the artifact store failed while the dataset was "
                                                           f"processed ({exc}); upload it again")
        except OSError:
            raise exc from None  # the record stays `processing` until it is found lost
    if store.get(dataset_id) is None:  # deleted while it was processed
        store.delete(dataset_id)
        return "deleted"
    record = DatasetRecord.model_validate({**record.model_dump(), **summary, "status": "ready",
                                           "progress": 1.0, "error": None})
    store.put(record)
    store.discard_upload(dataset_id)
    log.info("dataset %s: ready: %d classes, %d train / %d test images", dataset_id, len(record.classes),
             record.split_size("train"), record.split_size("test"))
    return "ready"


class _Failed(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type, self.message = error_type, message


def _process(store: AnyDatasetStore, record: DatasetRecord, settings: Settings) -> dict[str, Any]:
    """Fetch the upload, process it and publish the result; the summary's fields. _Failed for the dataset's
    own problems (the record says what to fix)."""
    from worker import datasets

    with store.fetched_upload(record.id) as upload:
        if upload is None:
            raise _Failed("UploadMissing", "the uploaded archive is gone; upload it again")
        record.started_at = time.time()
        store.put(record)
        running = record

        def progress(fraction: float) -> None:
            running.progress = round(min(max(fraction, 0.0), 1.0), 4)

        try:
            with _heartbeat(store, record, settings.job_heartbeat_seconds), store.staging(record.id) as staging:
                summary = datasets.process_archive(upload, staging, test_fraction=record.test_fraction,
                                                   seed=record.seed, progress=progress)
                store.publish(staging, record.id)
        except datasets.DatasetError as exc:
            raise _Failed("InvalidDataset", str(exc)) from None
        except ArtifactWriteError as exc:
            raise _Failed("ArtifactWriteError", str(exc)) from None
    return summary.model_dump()


class DatasetRequest(Request):
    """Records the dataset as failed when the pool child processing it dies (killed, out of memory)."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if not isinstance(exc, WorkerLostError | TimeLimitExceeded):
            return
        dataset_id = self.args[0] if self.args else self.id
        try:
            store = open_dataset_store(get_settings())
            record = store.get(dataset_id)
            if record is not None and record.status == "processing":
                _fail(store, record, "WorkerLost", f"the process handling this dataset died ({exc}); if it ran out "
                                                   "of memory, upload fewer or smaller images, then try again")
        except Exception:
            log.exception("dataset %s: could not record the lost worker", dataset_id)


class DatasetTask(Task):
    Request = DatasetRequest


@app.task(name=DATASET_TASK, base=DatasetTask)
def process_dataset(dataset_id: str) -> dict[str, str]:
    """Check and normalise one uploaded dataset (`dataset_id` of a `processing` record)."""
    return {"dataset_id": dataset_id, "status": process_dataset_now(dataset_id)}


@worker_init.connect
def check_artifact_store(**_: Any) -> None:
    """Before the pool starts: a missing or unusable bucket (TL_ARTIFACT_URL) stops the worker, naming it."""
    require_artifact_store(get_settings())


@worker_ready.connect
def fail_lost(**_: Any) -> None:
    """On start: fail datasets whose processing stopped sending heartbeats (a crash before this start)."""
    settings = get_settings()
    store = open_dataset_store(settings)
    for record in store.list():
        if record.lost(time.time(), settings.job_lost_seconds):
            _fail(store, record, "WorkerLost", LOST_MESSAGE)
