"""When to sync, and whether a sync is full or partial: kube-proxy's BoundedFrequencyRunner plus
the full-sync triggers of its iptables proxier (KEP-3453), for any proxier.

`SyncSchedule` is the decision, pure and driven by an injected clock (the unit tests use a fake
one); `SyncLoop` runs it in the caller's thread with a wake-up event.

Pacing (kube-proxy's runner):
- A token bucket, rate 1/`min_interval`, burst 2 (`burst`), full at start. A sync takes a token
  when it starts. So the first change after a quiet period syncs at once; a second one right
  after it too; from then on syncs are spaced `min_interval` apart. Requests that arrive while a
  sync waits or runs are coalesced into the next sync. `min_interval` 0 disables the bucket.
- `max_interval` after the end of the last sync of any kind, a periodic sync runs even without
  requests. It is PARTIAL (only what changed, usually nothing) and carries `check=True`: the
  caller runs its proxier's cheap "are the tables still ours" check and escalates to a full sync
  only when that finds tampering.
- After a failed sync the next one is full and is retried `retry_interval` after the failure
  (still paced by the bucket).

Full syncs happen only: at start-up, after a failure, on request (`request(full=True)`: a
SIGHUP, a node or config change that touches every service, tampering found by a check), and
once per `full_interval` (kproxy's `fullSyncPeriod`, default 1 h; kube-proxy hard-codes the same
hour as FullSyncPeriod). The full-request flag is taken when a full sync starts, so a change that
arrives during a full sync is applied by the next sync, which is partial: changes never wait
behind more than one full sync.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("kproxy.runtime")

INF = math.inf


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """What one sync must do. `reason` names the trigger (for the log line and metrics)."""

    full: bool
    reason: str  # startup | change | periodic | retry | requested | resync
    check: bool = False  # run the proxier's drift check first (periodic syncs)


class SyncSchedule:
    """The pure decision: call `take(now)` when `next_due(now) <= now`, then `finished`."""

    def __init__(
        self,
        *,
        min_interval: float,
        max_interval: float,
        full_interval: float = 3600.0,
        retry_interval: float = 1.0,
        burst: int = 2,
        now: float = 0.0,
    ) -> None:
        self.min_interval = max(0.0, min_interval)
        self.max_interval = max_interval if max_interval > 0 else INF
        self.full_interval = full_interval if full_interval > 0 else INF
        self.retry_interval = max(0.0, retry_interval)
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._tokens_at = now
        self._pending = False  # a change was requested since the last sync started
        self._full_reason: str | None = "startup"  # the first sync is always full
        self._last_end = now
        self._last_full_end = now
        self._retry_at: float | None = None
        self._running = False

    # -- inputs ----------------------------------------------------------------------------
    def request(self, *, full: bool = False, reason: str = "requested") -> None:
        self._pending = True
        if full and self._full_reason is None:
            self._full_reason = reason

    def finished(self, now: float, *, ok: bool, full: bool) -> None:
        """Record the end of the sync `take` returned; `full` is what really ran (a check may
        have escalated a partial sync)."""
        self._running = False
        self._last_end = now
        if ok:
            self._retry_at = None
            if full:
                self._last_full_end = now
        else:
            if self._full_reason is None:
                self._full_reason = "retry"
            self._retry_at = now + self.retry_interval

    # -- the bucket ------------------------------------------------------------------------
    def _refill(self, now: float) -> None:
        if self.min_interval <= 0:
            self._tokens = float(self.burst)
        elif now > self._tokens_at:
            gained = (now - self._tokens_at) / self.min_interval
            self._tokens = min(float(self.burst), self._tokens + gained)
        self._tokens_at = max(self._tokens_at, now)

    def _token_at(self, now: float) -> float:
        """When a token is available (now or later)."""
        self._refill(now)
        if self._tokens >= 1.0:
            return now
        return now + (1.0 - self._tokens) * self.min_interval

    # -- decisions -------------------------------------------------------------------------
    def _wanted_at(self) -> float:
        """When a sync is wanted, ignoring the bucket."""
        if self._retry_at is not None:
            return self._retry_at
        if self._pending or self._full_reason is not None:
            return -INF
        return min(self._last_end + self.max_interval, self._last_full_end + self.full_interval)

    def next_due(self, now: float) -> float:
        """The clock time at which `take` will return a plan (INF: only after a request)."""
        if self._running:
            return INF
        wanted = self._wanted_at()
        if wanted == INF:
            return INF
        return max(wanted, self._token_at(now))

    def take(self, now: float) -> SyncPlan | None:
        """The sync to run now, taking a token; None if nothing is due yet."""
        if self._running or self.next_due(now) > now:
            return None
        self._tokens -= 1.0
        retry = self._retry_at is not None
        self._retry_at = None
        periodic = not self._pending and self._full_reason is None and not retry
        full_reason = self._full_reason
        if full_reason is None and now >= self._last_full_end + self.full_interval:
            full_reason = "resync"
        self._full_reason = None
        self._pending = False
        self._running = True
        if full_reason is not None:
            return SyncPlan(full=True, reason=full_reason)
        if periodic:
            return SyncPlan(full=False, reason="periodic", check=True)
        return SyncPlan(full=False, reason="change")


class SyncLoop:
    """Runs `sync(plan) -> ok` by a `SyncSchedule` in the caller's thread until `stop` is set.

    `tick` is called at least every `tick_interval` (the daemon pings the systemd watchdog there).
    `sync` returns whether it succeeded and may return the plan it really ran (a partial sync
    escalated to full by a drift check) as `(ok, full)`.
    """

    def __init__(
        self,
        *,
        sync: Callable[[SyncPlan], bool | tuple[bool, bool]],
        min_interval: float,
        max_interval: float,
        stop: threading.Event,
        full_interval: float = 3600.0,
        retry_interval: float = 1.0,
        tick: Callable[[], None] | None = None,
        tick_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sync = sync
        self._stop = stop
        self._tick = tick or (lambda: None)
        self._tick_interval = tick_interval
        self._clock = clock
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.schedule = SyncSchedule(
            min_interval=min_interval,
            max_interval=max_interval,
            full_interval=full_interval,
            retry_interval=retry_interval,
            now=clock(),
        )
        self.syncs = 0

    def request(self, *, full: bool = False, reason: str = "requested") -> None:
        """Ask for a sync soon (thread-safe; coalesced with other requests)."""
        with self._lock:
            self.schedule.request(full=full, reason=reason)
        self._wake.set()

    def run_once(self) -> SyncPlan | None:
        """Run the sync that is due now, if any; return its plan."""
        now = self._clock()
        with self._lock:
            plan = self.schedule.take(now)
        if plan is None:
            return None
        full = plan.full
        try:
            outcome = self._sync(plan)
            if isinstance(outcome, tuple):
                ok, full = outcome
            else:
                ok = bool(outcome)
        except Exception:  # a bug in a sync must not end the loop
            log.exception("sync failed with an unexpected error")
            ok = False
        with self._lock:
            self.schedule.finished(self._clock(), ok=ok, full=full)
        self.syncs += 1
        self._tick()
        return plan

    def run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if self.run_once() is not None:
                continue
            with self._lock:
                due = self.schedule.next_due(self._clock())
            wait = min(due - self._clock(), self._tick_interval)
            if wait > 0:
                self._wake.wait(wait)
                self._tick()
