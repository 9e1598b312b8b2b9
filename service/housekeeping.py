"""Background duties of the API process: the job reaper and the live-worker census for `/readyz`.

The reaper fails a `running` (or `cancelling`) job whose worker stopped sending heartbeats for
`TL_JOB_LOST_SECONDS` (killed, out of memory, machine lost), so no job stays running forever. The
check is one atomic Lua script per job (worker.jobstore), so several API processes may reap at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

from celery import Celery

from worker.jobstore import REDIS_ERRORS, AsyncJobStore
from worker.queue import TRAINING_QUEUE

log = logging.getLogger(__name__)

def reaper_interval(lost_seconds: float) -> float:
    """How often to look: a few times per `lost_seconds`, between 0.5 and 5 seconds."""
    return max(0.5, min(5.0, lost_seconds / 3))


async def reap_lost_jobs(store: AsyncJobStore, lost_seconds: float) -> list[str]:
    """Fail every active job whose worker went silent; returns the ids it failed."""
    reaped = []
    for job_id in await store.active_ids():
        if await store.reap(job_id, lost_seconds):
            log.warning("job %s: no worker heartbeat for %.0f s, marked failed (WorkerLost)", job_id, lost_seconds)
            reaped.append(job_id)
    return reaped


async def run_reaper(store: AsyncJobStore, lost_seconds: float, interval: float, stop: asyncio.Event) -> None:
    """`reap_lost_jobs` every `interval` seconds until `stop` is set; errors are logged, never fatal.

    Stopped by an event rather than cancelled, so a Redis command is never interrupted half-way (a
    cancelled command can leave the connection pool in a state where closing it waits forever).
    """
    redis_down = False
    while not stop.is_set():
        try:
            await reap_lost_jobs(store, lost_seconds)
            if redis_down:
                log.info("reaper: Redis answers again")
            redis_down = False
        except REDIS_ERRORS as exc:
            if not redis_down:
                log.warning("reaper: Redis unavailable (%s); retrying every %.1f s", exc, interval)
            redis_down = True
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
