"""A bounded-frequency sync loop, in the shape of kube-proxy's BoundedFrequencyRunner.

- `request()` asks for a sync soon; requests are coalesced, and two syncs are never closer than
  `min_interval` (so a rollout's burst of events becomes a few syncs, not hundreds).
- Every `max_interval` a full sync runs even without requests.
- A failed sync makes the next one full and retries after `retry_interval`.
- `tick` is called at least every `tick_interval` (the daemon pings the systemd watchdog there).
The loop itself runs in the caller's thread until `stop` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("kproxy.runtime")


class SyncLoop:
    def __init__(
        self,
        *,
        sync: Callable[[bool], bool],
        min_interval: float,
        max_interval: float,
        stop: threading.Event,
        retry_interval: float = 1.0,
        tick: Callable[[], None] | None = None,
        tick_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sync = sync
        self._min = max(0.0, min_interval)
        self._max = max_interval if max_interval > 0 else 3600.0
        self._retry = retry_interval
        self._stop = stop
        self._tick = tick or (lambda: None)
        self._tick_interval = tick_interval
        self._clock = clock
        self._wake = threading.Event()
        self._full_requested = True  # the first sync is always full
        self.syncs = 0

    def request(self, *, full: bool = False) -> None:
        if full:
            self._full_requested = True
        self._wake.set()

    def run(self) -> None:
        last_sync = float("-inf")
        next_full = self._clock()
        retry_at: float | None = None
        while not self._stop.is_set():
            now = self._clock()
            due = min(next_full, retry_at if retry_at is not None else next_full)
            if not self._wake.is_set() and now < due:
                self._wake.wait(min(due - now, self._tick_interval))
                self._tick()
                continue
            # rate limit: never closer than min_interval
            wait = last_sync + self._min - self._clock()
            if wait > 0:
                self._stop.wait(wait)
                if self._stop.is_set():
                    break
            self._wake.clear()
            now = self._clock()
            full = self._full_requested or now >= next_full
            self._full_requested = False
            try:
                ok = self._sync(full)
            except Exception:  # a bug in a sync must not end the loop
                log.exception("sync failed with an unexpected error")
                ok = False
            last_sync = self._clock()
            self.syncs += 1
            self._tick()
            if ok:
                retry_at = None
                if full:
                    next_full = last_sync + self._max
            else:
                self._full_requested = True
                retry_at = last_sync + self._retry
