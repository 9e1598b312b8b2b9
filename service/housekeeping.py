"""Background duties of the API process: the job reaper and the live-worker census for `/readyz`.

The reaper ends a `running` (or `cancelling`) job whose worker stopped sending heartbeats for
`TL_JOB_LOST_SECONDS` (killed, out of memory, machine lost), so no job stays running forever; a job whose
worker had already published its model is recorded `succeeded` from that model. Heartbeats carry Redis' own
clock, and after Redis was unreachable the reaper waits `TL_JOB_LOST_SECONDS` of answers before it reaps
again. It also sends again the task of a job that waits `queued` with no message on the queue. Each step is
an atomic Lua script per job (worker.jobstore), so several API processes may run it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

from celery import Celery

from service.jobs import JobService
from worker.jobstore import REDIS_ERRORS
from worker.queue import TRAINING_QUEUE
from worker.store import ModelStore

log = logging.getLogger(__name__)

#: A queued job whose task message is gone is sent again after this long (API.md: it starts within a minute of a
#: worker being free, whatever was lost).
RESEND_AFTER_SECONDS = 30.0


def reaper_interval(lost_seconds: float) -> float:
    """How often to look: a few times per `lost_seconds`, between 0.5 and 5 seconds."""
    return max(0.5, min(5.0, lost_seconds / 3))


async def reap_lost_jobs(jobs: JobService, lost_seconds: float, models: ModelStore | None = None) -> list[str]:
    """End every active job whose worker went silent: `succeeded` when its model was published (the worker died
    between publishing and recording), `cancelled` when it was being cancelled (its model removed), else
    `failed` (WorkerLost). Returns the ids it ended."""
    reaped = []
    for job_id in await jobs.store.active_ids():
        outcome = await jobs.store.reap(job_id, lost_seconds, jobs.published)
        if outcome is None:
            continue
        reaped.append(job_id)
        if outcome.status == "succeeded":
            log.warning("job %s: its worker went silent after publishing the model; recorded succeeded", job_id)
        else:
            log.warning("job %s: no worker heartbeat for %.0f s, marked %s", job_id, lost_seconds, outcome.status)
        if outcome.discard_model and models is not None:
            await asyncio.to_thread(models.delete, outcome.discard_model)
    return reaped


async def run_reaper(jobs: JobService, lost_seconds: float, interval: float, stop: asyncio.Event,
                     models: ModelStore | None = None, resend_after: float = RESEND_AFTER_SECONDS) -> None:
    """Every `interval` seconds until `stop` is set: reap lost jobs (once Redis has answered for `lost_seconds`
    after an outage: `jobs.watch`) and re-send stranded queued jobs; errors are logged, never fatal.

    Stopped by an event rather than cancelled, so a Redis command is never interrupted half-way (a
    cancelled command can leave the connection pool in a state where closing it waits forever).
    """
    watch = jobs.watch
    redis_down = False
    while not stop.is_set():
        try:
            await jobs.store.ping()
            watch.answered()
            if redis_down:
                log.info("reaper: Redis answers again; reaping resumes after %.0f s of heartbeats", lost_seconds)
            redis_down = False
            if watch.reaping_allowed():
                await reap_lost_jobs(jobs, lost_seconds, models)
            await jobs.resend_stranded(resend_after)
        except REDIS_ERRORS as exc:
            if not redis_down:
                log.warning("reaper: Redis unavailable (%s); retrying every %.1f s", exc, interval)
            redis_down = True
            watch.failed()
        except Exception:
            log.exception("reaper: unexpected error (will retry)")
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


class WorkerCensus:
    """How many training workers answer (Celery workers consuming the `training` queue; the dataset worker does
    not count): asked in a thread, at most every `ttl` seconds, never hanging."""

    def __init__(self, celery: Celery, *, ping_timeout: float = 0.5, ttl: float = 2.0) -> None:
        self._celery = celery
        self._ping_timeout = ping_timeout
        self._ttl = ttl
        self._value = 0
        self._at = float("-inf")
        self._task: asyncio.Task[int] | None = None

    async def count(self) -> int:
        """The number of live workers (0 when the broker cannot be reached)."""
        if time.monotonic() - self._at < self._ttl:
            return self._value
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._refresh())
        try:
            return await asyncio.wait_for(asyncio.shield(self._task), self._ping_timeout + 2.5)
        except TimeoutError:
            return self._value

    async def _refresh(self) -> int:
        try:
            replies = await asyncio.to_thread(self._ping)
        except Exception as exc:  # the broker is down or refused: report no workers
            log.debug("worker ping failed: %s", exc)
            replies = 0
        self._value, self._at = replies, time.monotonic()
        return replies

    def _ping(self) -> int:
        replies = self._celery.control.inspect(timeout=self._ping_timeout).active_queues() or {}
        return sum(1 for queues in replies.values() if any(q.get("name") == TRAINING_QUEUE for q in queues or []))

    def forget(self) -> None:
        """Drop the cached count (Redis went away, so the workers are unreachable too)."""
        self._value, self._at = 0, float("-inf")
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with suppress(Exception):
                self._task.exception()
