"""What keeps many `/v1/jobs/{id}/events` streams cheap: one pub/sub connection for all of them, and a cap.

- `ChangeFeed`: the API process subscribes once, to the pattern of every job's change channel
  (`tl:events:*`), on a Redis client of its own, and wakes the streams of the job a notice names. A stream
  so holds no Redis connection while it waits (it borrows one from the main pool for each read of the
  record), and no number of streams can starve ordinary requests or `/readyz` of connections. If Redis goes
  away the feed reconnects by itself; meanwhile `subscribed` is False and streams poll the record.
- `StreamSlots`: at most `TL_MAX_EVENT_STREAMS` streams at once per process; one more is a 429
  (`TooManyEventStreams`, with `Retry-After`).
- `EventStream`: one open stream's chunks and its slot, released when the response ends however it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from types import TracebackType

import redis.asyncio as aioredis

from service.errors import TooManyEventStreams
from worker.jobstore import REDIS_ERRORS, events_channel

log = logging.getLogger(__name__)

#: A retry of a refused stream is worth it after about this long (streams end with their job or time limit).
STREAM_RETRY_AFTER_SECONDS = 5
#: How long a new stream waits for the feed's subscription before it starts polling instead.
SUBSCRIBE_WAIT_SECONDS = 1.0
RECONNECT_SECONDS = 1.0
#: The feed's read timeout: how often it looks whether it was asked to stop.
READ_SECONDS = 1.0

_CHANNEL_PREFIX = events_channel("")


class ChangeFeed:
    """Change notices of every job over one pattern subscription, fanned out to the streams that wait."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._connected: asyncio.Event | None = None  # made on first use, in the loop that uses it

    @property
    def subscribed(self) -> bool:
        """Whether notices arrive now (False while Redis is away: streams then poll)."""
        return self._connected is not None and self._connected.is_set()

    def watch(self, job_id: str) -> FeedWatch:
        """A wait for the notices of one job (`async with feed.watch(id) as changes`), like `JobChanges`."""
        return FeedWatch(self, job_id)

    async def _add(self, job_id: str, event: asyncio.Event) -> None:
        self._waiters.setdefault(job_id, set()).add(event)
        if self._connected is None:
            self._connected = asyncio.Event()
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="tl-change-feed")
        if not self._connected.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), SUBSCRIBE_WAIT_SECONDS)

    def _remove(self, job_id: str, event: asyncio.Event) -> None:
        waiting = self._waiters.get(job_id)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self._waiters[job_id]

    def _wake(self, job_id: str | None = None) -> None:
        groups = self._waiters.values() if job_id is None else [self._waiters.get(job_id, set())]
        for waiting in groups:
            for event in waiting:
                event.set()

    async def _run(self) -> None:
        assert self._connected is not None
        failing = False
        while not self._stopping:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(events_channel("*"))
                self._connected.set()
                if failing:
                    log.info("event feed: subscribed again")
                failing = False
                self._wake()  # a notice may have been lost while away: every stream reads its job again
                while not self._stopping:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_SECONDS)
                    if message is not None and message.get("type") == "pmessage":
                        channel = str(message.get("channel", ""))
                        self._wake(channel.removeprefix(_CHANNEL_PREFIX))
            except REDIS_ERRORS as exc:
                if not failing:
                    log.warning("event feed: Redis unavailable (%s); streams poll until it answers", exc)
                failing = True
            except Exception:
                log.exception("event feed: unexpected error (will subscribe again)")
                failing = True
            finally:
                self._connected.clear()
                with suppress(Exception):  # closing a connection to a Redis that went away
                    await pubsub.aclose()
            if not self._stopping:
                await asyncio.sleep(RECONNECT_SECONDS)

    async def close(self) -> None:
        """Stop the subscription (it ends within `READ_SECONDS`) and close the feed's client."""
        self._stopping = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, READ_SECONDS + 4)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("event feed did not stop in time; cancelled")
        with suppress(Exception):
            await self._client.aclose()


class FeedWatch:
    """One stream's wait on the feed: `wait` returns on a notice for its job, or after `timeout` seconds."""

    def __init__(self, feed: ChangeFeed, job_id: str) -> None:
        self._feed = feed
        self._job_id = job_id
        self._event = asyncio.Event()

    @property
    def subscribed(self) -> bool:
        return self._feed.subscribed

    async def __aenter__(self) -> FeedWatch:
        await self._feed._add(self._job_id, self._event)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self._feed._remove(self._job_id, self._event)

    async def wait(self, timeout: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()


class StreamSlots:
    """At most `limit` open streams; `take` raises `TooManyEventStreams` (429) beyond."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> Callable[[], None]:
        """Take a slot; returns its release (idempotent)."""
        if self.open >= self.limit:
            raise TooManyEventStreams(self.limit, STREAM_RETRY_AFTER_SECONDS)
        self.open += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open -= 1

        return release


class EventStream:
    """The chunks of one open stream, and the release of its slot (called by the response when it ends)."""

    def __init__(self, chunks: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self.release = release

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks
