"""Endpoint choice of the userspace mode: round robin with ClientIP affinity, as kube-proxy's
userspace `LoadBalancerRR` did (pkg/proxy/userspace/roundrobin.go, up to 1.25).

One `Balancer` per proxy listener. It makes no policy decision of its own: the proxier hands it
the endpoints the model chose for the listener's traffic (internal or external) and it only
spreads connections over them.

- Round robin: each new connection (or UDP client session) takes the next endpoint in turn.
  When the set of endpoints changes, the order restarts at the first one (kube-proxy shuffled
  the list on each change; kproxy keeps the model's stable order, so `status` can say which
  endpoint the next connection gets and tests can predict it).
- ClientIP affinity (`affinity_timeout` > 0): a client IP that connected within the timeout goes
  to the endpoint it used last, and each use refreshes the timer. Records of endpoints that are
  gone are dropped, and expired ones are swept on every update.
- Retry: when connecting to the chosen endpoint fails, the caller asks again with `retry=True`,
  which skips the affinity record (as kube-proxy's sessionAffinityReset) and takes the next
  endpoint in turn; the new choice then becomes the client's affinity.

Thread safety: the proxy's event loop picks, the sync thread updates; one lock guards both.
The clock is injected, so tests drive affinity expiry without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class _Sticky:
    endpoint: str
    last_used: float


class Balancer:
    """Round robin over `endpoints` ("ip:port" texts) with optional ClientIP affinity."""

    def __init__(
        self,
        endpoints: Sequence[str] = (),
        *,
        affinity_timeout: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._endpoints: tuple[str, ...] = tuple(endpoints)
        self._index = 0
        self._affinity_timeout = float(affinity_timeout)
        self._sticky: dict[str, _Sticky] = {}
        self.picks = 0

    # -- the sync thread -----------------------------------------------------------------------
    def update(self, endpoints: Sequence[str], *, affinity_timeout: float | None = None) -> bool:
        """Replace the endpoints (and the affinity timeout); True when anything changed.

        The turn restarts at the first endpoint only when the set changed, so a sync that
        changes nothing does not disturb the rotation."""
        new = tuple(endpoints)
        with self._lock:
            changed = False
            if affinity_timeout is not None and float(affinity_timeout) != self._affinity_timeout:
                self._affinity_timeout = float(affinity_timeout)
                if not self._affinity_timeout:
                    self._sticky.clear()
                changed = True
            if new != self._endpoints:
                self._endpoints = new
                self._index = 0
                keep = set(new)
                self._sticky = {c: s for c, s in self._sticky.items() if s.endpoint in keep}
                changed = True
            self._sweep()
            return changed

    def _sweep(self) -> None:
        if not self._sticky:
            return
        now = self._clock()
        ttl = self._affinity_timeout
        self._sticky = {c: s for c, s in self._sticky.items() if now - s.last_used < ttl}

    # -- the event loop ------------------------------------------------------------------------
    def pick(self, client_ip: str, *, retry: bool = False) -> str | None:
        """The endpoint for a new connection from `client_ip`; None when there is none."""
        with self._lock:
            endpoints = self._endpoints
            if not endpoints:
                return None
            self.picks += 1
            ttl = self._affinity_timeout
            if ttl and not retry:
                sticky = self._sticky.get(client_ip)
                if sticky is not None:
                    now = self._clock()
                    if now - sticky.last_used < ttl:
                        sticky.last_used = now
                        return sticky.endpoint
            if self._index >= len(endpoints):
                self._index = 0
            endpoint = endpoints[self._index]
            self._index = (self._index + 1) % len(endpoints)
            if ttl:
                self._sticky[client_ip] = _Sticky(endpoint, self._clock())
            return endpoint

    # -- inspection ----------------------------------------------------------------------------
    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._endpoints

    @property
    def affinity_timeout(self) -> float:
        return self._affinity_timeout

    def peek(self, client_ip: str = "") -> str | None:
        """The endpoint the next connection (from `client_ip`, if given) would get, without
        taking a turn."""
        with self._lock:
            endpoints = self._endpoints
            if not endpoints:
                return None
            if self._affinity_timeout and client_ip:
                sticky = self._sticky.get(client_ip)
                if sticky is not None and self._clock() - sticky.last_used < self._affinity_timeout:
                    return sticky.endpoint
            return endpoints[self._index % len(endpoints)]

    def affinity(self) -> dict[str, tuple[str, float]]:
        """client IP -> (endpoint, seconds left) of the live affinity records."""
        with self._lock:
            now = self._clock()
            ttl = self._affinity_timeout
            return {
                c: (s.endpoint, round(ttl - (now - s.last_used), 3))
                for c, s in self._sticky.items()
                if now - s.last_used < ttl
            }
