"""Whether Redis has answered long enough for a silent job heartbeat to mean a lost worker.

After Redis was unreachable (down, restarting, paused), no heartbeat could land while it was gone, so every
running job looks lost the moment it is back. The reaper waits `grace_seconds` of Redis answering before it
reaps again, which gives each live worker time to beat.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RedisWatch:
    """Redis' health as the API's reaper sees it; `reaping_allowed()` after `grace_seconds` of answers."""

    def __init__(self, grace_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._grace = grace_seconds
        self._clock = clock
        self._down = False
        self._ok_since = clock() - grace_seconds  # no outage seen yet: reaping is allowed from the start

    def answered(self) -> None:
        if self._down:
            self._down = False
            self._ok_since = self._clock()

    def failed(self) -> None:
        self._down = True

    def reaping_allowed(self) -> bool:
        return not self._down and self._clock() - self._ok_since >= self._grace
