"""The job service: create + enqueue + compensate, read, list, cancel and follow jobs (routes stay thin).

The job record in Redis (`worker.jobstore`) is the job table: this object reads and writes only it and
sends the Celery task by name, so the API never imports the worker's code or TensorFlow, and Celery's own
task states (PENDING for unknown ids ...) never show.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import time
from collections.abc import AsyncIterator

from celery import Celery

from service.datasets import DatasetService
from service.errors import IdempotencyKeyReused, InvalidInput, JobFinished, JobNotFound, QueueUnavailable
from service.events import ChangeFeed, EventStream, StreamSlots
from service.watch import RedisWatch
from worker.jobstore import (
    INDEX_KEY,
    NOW,
    REDIS_ERRORS,
    TERMINAL,
    AsyncJobStore,
    Job,
    Published,
    decode_job,
    failure,
    job_key,
    utc_now,
)
from worker.queue import TRAIN_TASK, TRAINING_QUEUE
from worker.spec import JobCreate
from worker.store import valid_id

log = logging.getLogger(__name__)

#: Publishing to the broker must not hold a request for long when it is down.
ENQUEUE_TIMEOUT_SECONDS = 5.0
ENQUEUE_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
SSE_POLL_SECONDS = 2.0
SSE_HEARTBEAT_SECONDS = 15.0
#: Sent before a stream ends at its time limit: EventSource reconnects after this many milliseconds.
SSE_RECONNECT_MS = 1000
#: A filtered job listing reads at most this many records per page (in chunks of LIST_SCAN_CHUNK): a page that
#: found fewer matches still has a `next_cursor` to go on from, so no request walks the whole history.
LIST_SCAN_LIMIT = 1000
LIST_SCAN_CHUNK = 250
#: A cancel re-reads the status this many times when it moves underneath (queued -> running).
CANCEL_ATTEMPTS = 5


class JobService:
    """Jobs as the API sees them, over the job store and the Celery broker."""

    def __init__(self, store: AsyncJobStore, celery: Celery, lost_seconds: float, datasets: DatasetService,
                 watch: RedisWatch | None = None, published: Published | None = None, *,
                 feed: ChangeFeed | None = None, max_streams: int = 64,
                 stream_max_seconds: float | None = None) -> None:
        self.store = store
        self.celery = celery
        self._lost_seconds = lost_seconds
        self._datasets = datasets
        #: Whether Redis has answered long enough for a silent heartbeat to mean a lost worker.
        self.watch = watch or RedisWatch(lost_seconds)
        #: Finds a model a lost job's worker had published (its metadata), so that job is recorded `succeeded`.
        self.published = published
        #: One pub/sub subscription for every event stream (None: each stream subscribes on the store's client).
        self.feed = feed
        self._streams = StreamSlots(max_streams)
        self._stream_max_seconds = stream_max_seconds

    async def create(self, spec: JobCreate, idempotency: str | None = None) -> tuple[Job, bool]:
        """Record a queued job and send its task; returns the job and whether it is new (False: the job an
        earlier request with the same Idempotency-Key and the same spec created; another spec with that key is
        a 422). If the broker refuses, the job is failed,
        the key released, and `QueueUnavailable` raised. The dataset must exist (422) and be ready (409), and
        hold the subsets asked for (422)."""
        dataset = await self._datasets.require_ready(spec.dataset)
        if spec.uploaded:
            for field, split in (("train_samples", "train"), ("test_samples", "test")):
                wanted, held = getattr(spec, field), dataset.split_size(split)
                if wanted is not None and wanted > held:
                    raise InvalidInput.at(["body", field], f"{field}: {wanted} asked for, but dataset "
                                          f"{dataset.id!r} holds {held} {split} images")
        job, created = await self.store.create(spec, idempotency)
        if not created:
            if idempotency is not None and job.spec != spec.public():  # the key is bound to the body it came with
                raise IdempotencyKeyReused(idempotency, job.id)
            return job, False
        try:
            await asyncio.wait_for(asyncio.to_thread(self._send_task, job.id), ENQUEUE_TIMEOUT_SECONDS)
        except Exception as exc:
            log.error("could not enqueue job %s: %s", job.id, exc)
            message = f"the job queue (Celery broker at TL_REDIS_URL) refused the job: {exc or type(exc).__name__}"
            await self.store.update(job.id, failure("QueueUnavailable", message), from_statuses=["queued"])
            if idempotency is not None:  # let the client's retry create a fresh job
                await self.store.release_idempotency(idempotency)
            raise QueueUnavailable(f"{message}; job {job.id} was marked failed, retry later") from exc
        return job, True

    def _send_task(self, job_id: str) -> None:
        # ignore_result: the job record is where outcomes live; subscribing to Celery's result backend would
        # also make a send to an unreachable Redis hang for ~20 s in the backend's reconnect loop.
        self.celery.send_task(TRAIN_TASK, args=[job_id], task_id=job_id, queue=TRAINING_QUEUE, ignore_result=True,
                               retry=True, retry_policy=ENQUEUE_RETRY_POLICY)

    async def get(self, job_id: str) -> Job:
        """The job, or 404 (an id that is not a valid id is never looked up)."""
        job = await self.store.get(job_id) if valid_id(job_id) else None
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def read(self, job_id: str) -> Job:
        """The job as it stands; a running job whose worker went silent is failed (WorkerLost) first."""
        job = await self.get(job_id)
        if job.status in ("running", "cancelling") and self.watch.reaping_allowed() and await self.store.reap(
                job_id, self._lost_seconds, self.published):
            job = await self.get(job_id)
        return job

    async def resend_stranded(self, older_than: float) -> list[str]:
        """Send the task again for every job queued longer than `older_than` seconds (Redis' clock) whose
        message is no longer on the queue: an API that died between writing the record and sending the task,
        or a worker killed while it held the message. The worker runs a job only from `queued`, so a message
        seen twice never runs a job twice."""
        stale = await self.store.queued_longer_than(older_than)
        if not stale:
            return []
        waiting = await self._queued_task_ids()
        resent = []
        for job_id in stale:
            if job_id in waiting:
                continue
            try:
                await asyncio.wait_for(asyncio.to_thread(self._send_task, job_id), ENQUEUE_TIMEOUT_SECONDS)
            except Exception as exc:
                log.warning("could not re-send job %s (will try again): %s", job_id, exc)
                continue
            await self.store.update(job_id, {"enqueued_at": NOW}, from_statuses=["queued"])
            log.warning("job %s: queued for over %.0f s with no message on the queue; sent again", job_id,
                        older_than)
            resent.append(job_id)
        return resent

    async def _queued_task_ids(self, limit: int = 100_000) -> set[str]:
        """Ids of the task messages waiting on the training queue (kombu's Redis list of JSON messages)."""
        ids = set()
        for raw in await self.store.redis.lrange(TRAINING_QUEUE, 0, limit - 1):
            try:
                ids.add(str(json.loads(raw)["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                continue
        return ids

    async def list(self, status: str | None = None, model: str | None = None, limit: int = 50,
                   cursor: str | None = None) -> tuple[builtins.list[Job], str | None]:
        """Newest first, a page at a time (`cursor`: the previous page's `next_cursor`). With a filter, a page
        reads the status and kind of at most `LIST_SCAN_LIMIT` records and decodes only the matching ones, off
        the event loop; it may so hold fewer than `limit` jobs and still a `next_cursor`."""
        if status is None and model is None:
            return await self.store.list(limit=limit, cursor=cursor)
        redis = self.store.redis
        upper = f"({cursor}" if cursor else "+"
        matched: builtins.list[str] = []
        scanned = 0
        while scanned < LIST_SCAN_LIMIT:
            members = await redis.zrevrangebylex(INDEX_KEY, upper, "-", start=0,
                                                 num=min(LIST_SCAN_CHUNK, LIST_SCAN_LIMIT - scanned))
            if not members:
                return await self._decode_page(matched), None
            pipe = redis.pipeline()
            for member in members:
                pipe.hmget(job_key(member.split(":", 1)[1]), ["status", "spec"])
            rows = await pipe.execute()
            gone = []
            for member, (job_status, spec) in zip(members, rows, strict=True):
                scanned += 1
                upper = f"({member}"
                if job_status is None:
                    gone.append(member)  # the record expired
                elif (status is None or job_status == status) and (model is None or _spec_model(spec) == model):
                    matched.append(member)
                    if len(matched) == limit:
                        break
            if gone:
                await redis.zrem(INDEX_KEY, *gone)
            if len(matched) == limit:
                return await self._decode_page(matched), matched[-1]
        return await self._decode_page(matched), upper[1:]

    async def _decode_page(self, members: builtins.list[str]) -> builtins.list[Job]:
        if not members:
            return []
        pipe = self.store.redis.pipeline()
        for member in members:
            pipe.hgetall(job_key(member.split(":", 1)[1]))
        raws = await pipe.execute()
        return await asyncio.to_thread(_decode_records, raws)

    async def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once (`cancelled`), a running one asked to stop (`cancelling`);
        409 for a job that already ended."""
        for _ in range(CANCEL_ATTEMPTS):  # the status may move under us; decide again from the new one
            job = await self.get(job_id)
            if job.status in TERMINAL:
                raise JobFinished(job_id, job.status)
            if job.status == "cancelling":
                return job
            if job.status == "queued":
                if await self.store.update(job_id, {"status": "cancelled", "finished_at": utc_now()},
                                           from_statuses=["queued"]):
                    await self._revoke(job_id)
                    return await self.get(job_id)
            elif job.status == "running":
                await self.store.request_cancel(job_id)
                if await self.store.update(job_id, {"status": "cancelling"}, from_statuses=["running"]):
                    return await self.get(job_id)
        return await self.get(job_id)

    async def _revoke(self, job_id: str) -> None:
        """Revoke the queued task (best effort: the worker also skips a job that is no longer queued)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.celery.control.revoke, job_id), ENQUEUE_TIMEOUT_SECONDS)
        except Exception as exc:
            log.warning("could not revoke task %s (the worker will still skip it): %s", job_id, exc)

    async def open_events(self, job_id: str) -> EventStream:
        """An event stream of the job (`events`) in one of the `TL_MAX_EVENT_STREAMS` slots: 429 when none is
        free, 404 for an unknown job. Whoever sends it calls its `release` when it ends."""
        release = self._streams.take()
        try:
            job = await self.get(job_id)
        except BaseException:
            release()
            raise
        return EventStream(self.events(job, max_seconds=self._stream_max_seconds), release)

    async def events(self, first: Job, *, poll_seconds: float = SSE_POLL_SECONDS,
                     heartbeat_seconds: float = SSE_HEARTBEAT_SECONDS,
                     max_seconds: float | None = None) -> AsyncIterator[bytes]:
        """Server-Sent Events: the job now, then again on every change of status, stage or epoch (pub/sub
        notice, or a poll as fallback), until it ends; a comment line keeps an idle stream open. After
        `max_seconds` the stream ends with a `retry:` field (the client reconnects and gets the job anew)."""
        job_id = first.id
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        watch = self.feed.watch(job_id) if self.feed is not None else self.store.changes(job_id)
        async with watch as changes:
            job = first
            if changes.subscribed:
                try:  # read after subscribing: no change falls in between
                    job = await self.store.get(job_id) or first
                except REDIS_ERRORS:
                    pass
            yield _sse(job)
            last, last_sent = _change_key(job), time.monotonic()
            while job.status not in TERMINAL:
                wait = min(poll_seconds, heartbeat_seconds - (time.monotonic() - last_sent))
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        yield (f": open for {max_seconds:g} s, the most a stream stays (TL_EVENT_STREAM_MAX_SECONDS); "
                               f"reconnect to follow on\nretry: {SSE_RECONNECT_MS}\n\n").encode()
                        return
                    wait = min(wait, left)
                await changes.wait(max(0.05, wait))
                try:
                    current = await self.store.get(job_id)
                except REDIS_ERRORS:
                    current = job  # keep the stream; Redis may come back
                if current is None:
                    return  # the record expired or was removed
                job = current
                if _change_key(job) != last:
                    yield _sse(job)
                    last, last_sent = _change_key(job), time.monotonic()
                elif time.monotonic() - last_sent >= heartbeat_seconds:
                    yield b": keep-alive\n\n"
                    last_sent = time.monotonic()


def _spec_model(spec: str | None) -> object:
    try:
        data = json.loads(spec) if spec else None
    except ValueError:
        return None
    return data.get("model") if isinstance(data, dict) else None


def _decode_records(raws: list[dict[str, str]]) -> list[Job]:
    jobs = []
    for raw in raws:
        if not raw:
            continue  # removed since it was matched
        try:
            jobs.append(decode_job(raw))
        except ValueError as exc:  # a damaged record: left out, never the whole list
            log.warning("job record %r could not be read (left out of the list): %s", raw.get("id"), exc)
    return jobs


def _sse(job: Job) -> bytes:
    return f"event: job\ndata: {job.model_dump_json()}\n\n".encode()


def _change_key(job: Job) -> tuple[str, str, int]:
    return job.status, job.progress.stage, job.progress.epoch
