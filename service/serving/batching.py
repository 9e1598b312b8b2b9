"""Micro-batching: concurrent requests for one model are merged into one batch of at most `TL_MAX_BATCH` images.

A forming batch waits at most `TL_BATCH_WINDOW_MS`, and only for requests already on their way (like
TF Serving's batch_timeout, but a lone request does not wait); while a batch runs, the next one gathers
by itself. Each model runs one batch at a time, in a worker thread; only a request that is alone (no other
predict request in the process, `alone()`, and nothing queued or running on the model, still so after
`INLINE_YIELDS` turns of the loop, which let the requests already read reach the batcher) of at most
`INLINE_MAX_IMAGES` images runs on the event loop itself: there is nothing to batch it with, and the two
thread hand-offs (there and back) cost a lone single-image request more than a third of the model's own time
(bench/README.md). A runner says whether it may run so (`Runner.inline`: LiteRT's single-image call takes
about a millisecond; the Keras fallback never).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.serving.runners import Runner

#: A lone request of at most this many images runs on the event loop (see the module docstring) ...
INLINE_MAX_IMAGES = 2
#: ... once it is still alone after this many turns of the loop.
INLINE_YIELDS = 2


@dataclass
class _Request:
    images: np.ndarray
    future: asyncio.Future[np.ndarray]


class MicroBatcher:
    """Merges concurrent `predict` calls on one model into batches of at most `max_batch` images.

    A batch waits for more requests only while some are known to be on their way (`incoming`: their
    bodies are still being read or decoded), and never longer than `window_s`; a lone request runs at
    once: always waiting the full window would cost a single client much of its throughput for no gain
    (bench/README.md).
    """

    def __init__(self, runner: Runner, executor: Executor, max_batch: int, window_s: float,
                 on_batch: Callable[[int], None] | None = None, alone: Callable[[], bool] | None = None) -> None:
        self.runner = runner
        self._executor = executor
        self._max_batch = max_batch
        self._window_s = window_s
        self._on_batch = on_batch
        #: Whether the caller's request is the only predict request in the process (None: never assumed).
        self._alone = alone if getattr(runner, "inline", False) else None
        self._pending: deque[_Request] = deque()
        self._pending_images = 0
        self._incoming = 0
        self._changed = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request whose images are being read, so a forming batch may wait for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._changed.set()

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for `images` (N <= max_batch), computed in a batch shared with concurrent calls."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        request = _Request(images, future)
        lone = self._could_run_alone(len(images))
        self._pending.append(request)
        self._pending_images += len(images)
        if lone:
            # Let the requests the server has already read reach the batcher first: one turn of the loop reads
            # the sockets that are ready, the next runs the requests they start. Whoever arrives meanwhile
            # starts the drainer, which takes this request along; with nobody, it runs here and now.
            try:
                for _ in range(INLINE_YIELDS):
                    await asyncio.sleep(0)
            except BaseException:  # the caller went away (cancelled)
                if request in self._pending:
                    self._pending.remove(request)
                    self._pending_images -= len(images)
                future.cancel()
                raise
            if (len(self._pending) == 1 and self._pending[0] is request
                    and self._could_run_alone(len(images), queued=1)):
                self._pending.popleft()
                self._pending_images -= len(images)
                probs = self.runner.predict(images)  # nothing to batch with: on the loop, no hand-off
                if self._on_batch is not None:
                    self._on_batch(len(images))
                return probs
        self._changed.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    def _could_run_alone(self, images: int, queued: int = 0) -> bool:
        """Whether a request of `images` may run on the event loop: a runner that allows it, few images, no
        other request queued (but `queued` of its own), being read or running on this model, and no other
        predict request in the process."""
        return (self._alone is not None and images <= INLINE_MAX_IMAGES and len(self._pending) == queued
                and self._incoming == 0 and (self._drainer is None or self._drainer.done()) and self._alone())

    async def _gather(self) -> None:
        """Wait (at most the window) while announced requests may still join and the batch is not full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._window_s
        while self._incoming > 0 and self._pending_images < self._max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if self._window_s > 0:
                await self._gather()
            batch: list[_Request] = []
            count = 0
            while self._pending and (not batch or count + len(self._pending[0].images) <= self._max_batch):
                request = self._pending.popleft()
                batch.append(request)
                count += len(request.images)
            self._pending_images -= count
            live = [r for r in batch if not r.future.done()]  # skip callers that went away
            if not live:
                continue
            images = live[0].images if len(live) == 1 else np.concatenate([r.images for r in live])
            try:
                probs = await loop.run_in_executor(self._executor, self.runner.predict, images)
            except Exception as exc:
                for request in live:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(images))
            start = 0
            for request in live:
                end = start + len(request.images)
                if not request.future.done():
                    request.future.set_result(probs[start:end])
                start = end
