"""The dataset service: receive an upload (streamed to disk), queue its processing, list, read, preview, delete.

The records and files live in the artifact store (`worker.store.datasets`); processing runs on the dataset
worker (`worker.dataset_tasks`), sent by task name. Routes only translate HTTP.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery
from starlette.concurrency import run_in_threadpool

from service.errors import Conflict, InvalidInput, NotFound, QueueUnavailable
from service.registry import store_call
from worker.jobstore import AsyncJobStore, utc_now
from worker.queue import DATASET_TASK, DATASETS_QUEUE
from worker.spec import CIFAR10, CLASS_NAMES
from worker.store import AnyDatasetStore, valid_id
from worker.store.datasets import (
    LOST_MESSAGE,
    PREVIEW_FILE,
    Dataset,
    DatasetError,
    DatasetRecord,
    new_dataset_id,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

ENQUEUE_TIMEOUT_SECONDS = 5.0
ENQUEUE_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
#: The archive is written to disk in pieces of this size.
COPY_CHUNK_BYTES = 1024 * 1024

#: The built-in dataset, always listed and ready (CIFAR-10's standard split: 5,000 / 1,000 images per class).
CIFAR10_DATASET = Dataset(
    id=CIFAR10, name="CIFAR-10", status="ready", created_at="2009-04-08T00:00:00Z", classes=list(CLASS_NAMES),
    image_shape=[32, 32, 3],
    counts={"train": dict.fromkeys(CLASS_NAMES, 5000), "test": dict.fromkeys(CLASS_NAMES, 1000)},
    bytes=(50000 + 10000) * 32 * 32 * 3, progress=1.0,
)


class DatasetNotFound(NotFound):
    def __init__(self, dataset_id: str) -> None:
        super().__init__(f"dataset {dataset_id!r} not found")


class DatasetService:
    """Datasets as the API sees them, over the dataset store, the job store and the Celery broker."""

    def __init__(self, store: AnyDatasetStore, jobs: AsyncJobStore, celery: Celery, lost_seconds: float) -> None:
        self.store = store
        self._jobs = jobs
        self.celery = celery
        self._lost_seconds = lost_seconds

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        return await store_call(func, *args)

    # ----- upload -----

    async def receive(self, chunks: AsyncIterator[bytes], *, name: str | None, test_fraction: float,
                      seed: int) -> Dataset:
        """Write the archive streamed in `chunks` to the store, record a `processing` dataset and queue it."""
        dataset_id = new_dataset_id()
        path = await self._call(self.store.new_upload, dataset_id)
        stored = False
        try:
            received = await self._write(path, chunks)
            if received == 0:
                raise InvalidInput.at(["body"], "the archive is empty (0 bytes): send a zip, tar, tar.gz or npz file")
            await self._call(self.store.keep_upload, dataset_id, path)  # S3: sent to the bucket
            stored = True
            # The record only once its archive is stored: a `processing` record always has one.
            record = DatasetRecord(id=dataset_id, name=name, status="processing", created_at=utc_now(),
                                   test_fraction=test_fraction, seed=seed, bytes=0)
            await self._call(self.store.put, record)
        except BaseException:
            path.unlink(missing_ok=True)
            if stored:  # else nothing is stored; a stored archive left here is swept later (no record)
                with contextlib.suppress(Exception):
                    await self._call(self.store.discard_upload, dataset_id)
            raise
        try:
            await asyncio.wait_for(asyncio.to_thread(self._send_task, dataset_id), ENQUEUE_TIMEOUT_SECONDS)
        except Exception as exc:
            log.error("could not enqueue dataset %s: %s", dataset_id, exc)
            message = f"the job queue (Celery broker at TL_REDIS_URL) refused the dataset: {exc or type(exc).__name__}"
            record.status, record.error = "failed", DatasetError(type="QueueUnavailable", message=message)
            await self._call(self.store.put, record)
            await self._call(self.store.discard_upload, dataset_id)
            raise QueueUnavailable(f"{message}; dataset {dataset_id} was marked failed, upload it again later") from exc
        return record.public()

    async def _write(self, path: Path, chunks: AsyncIterator[bytes]) -> int:
        received = 0
        with open(path, "wb") as out:  # each chunk is written in a thread below
            async for chunk in chunks:
                if chunk:
                    received += len(chunk)
                    await self._call(out.write, chunk)
        return received

    async def receive_file(self, source: Any, *, name: str | None, test_fraction: float, seed: int) -> Dataset:
        """Like `receive`, from a spooled file (a multipart upload that Starlette already wrote to disk)."""

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                chunk = await run_in_threadpool(source.read, COPY_CHUNK_BYTES)
                if not chunk:
                    return
                yield chunk

        return await self.receive(chunks(), name=name, test_fraction=test_fraction, seed=seed)

    def _send_task(self, dataset_id: str) -> None:
        self.celery.send_task(DATASET_TASK, args=[dataset_id], task_id=dataset_id, queue=DATASETS_QUEUE,
                              ignore_result=True, retry=True, retry_policy=ENQUEUE_RETRY_POLICY)

    # ----- reading -----

    async def get(self, dataset_id: str) -> Dataset:
        """The dataset (the built-in `cifar10` included), or 404; a dataset whose worker died becomes failed."""
        return (await self.record(dataset_id)).public() if dataset_id != CIFAR10 else CIFAR10_DATASET

    async def record(self, dataset_id: str) -> DatasetRecord:
        record = await self._call(self.store.get, dataset_id) if valid_id(dataset_id) else None
        if record is None:
            raise DatasetNotFound(dataset_id)
        if record.lost(time.time(), self._lost_seconds):
            record.status, record.error = "failed", DatasetError(type="WorkerLost", message=LOST_MESSAGE)
            await self._call(self.store.put, record)
        return record

    async def list(self) -> builtins.list[Dataset]:
        """Every dataset, newest first; the built-in `cifar10` last."""
        records = await self._call(self.store.list)
        return [record.public() for record in records] + [CIFAR10_DATASET]

    async def preview(self, dataset_id: str) -> Path:
        """The path of a ready dataset's preview grid; 409 while processing."""
        if dataset_id == CIFAR10:
            raise NotFound("the built-in cifar10 dataset has no preview image")
        record = await self.record(dataset_id)
        if record.status == "processing":
            raise Conflict(f"dataset {dataset_id!r} is still processing; its preview exists once it is ready")
        data_dir = await self._call(self.store.data_dir, dataset_id)
        if record.status != "ready" or data_dir is None or not (data_dir / PREVIEW_FILE).is_file():
            raise NotFound(f"dataset {dataset_id!r} has no preview ({record.status})")
        return data_dir / PREVIEW_FILE

    async def delete(self, dataset_id: str) -> None:
        """Delete an uploaded dataset; 409 for `cifar10` or while a queued or running job uses it."""
        if dataset_id == CIFAR10:
            raise Conflict("the built-in cifar10 dataset cannot be deleted")
        await self.record(dataset_id)
        users = await self._jobs.active_job_ids(dataset=dataset_id)
        if users:
            raise Conflict(f"dataset {dataset_id!r} is used by {len(users)} queued or running job(s) "
                           f"({', '.join(users[:5])}); cancel them or wait until they end")
        if not await self._call(self.store.delete, dataset_id):
            raise DatasetNotFound(dataset_id)

    async def require_ready(self, dataset_id: str) -> Dataset:
        """The dataset a job names: 422 when unknown, 409 when not ready."""
        if dataset_id == CIFAR10:
            return CIFAR10_DATASET
        try:
            record = await self.record(dataset_id)
        except DatasetNotFound:
            raise InvalidInput.at(["body", "dataset"], f"no dataset {dataset_id!r}: upload one (POST /v1/datasets) "
                                  "or use 'cifar10'") from None
        if record.status != "ready":
            detail = f"dataset {dataset_id!r} is {record.status}" + (
                ": wait until it is ready" if record.status == "processing" else
                f" ({record.error.message if record.error else 'see GET /v1/datasets/' + dataset_id})")
            raise Conflict(detail)
        return record.public()

