"""Listening sockets that must not take the agent down: /healthz, /metrics, DNS, the inspection
socket.

A port someone else holds (kube-proxy still running on 10256/10249, systemd-resolved or another
DNS server on :53, a second kproxy) is the usual lab mistake. kube-proxy's answer is the one kept
here: say so in one log line that names the address and the likely holder, keep proxying, and
retry in the background, with a backoff (1 s doubling to 15 s), until the port is free; then one
line saying it is served now. No traceback: the failure is an expected condition, not a bug.

`Listeners` records which listener is not bound and why, for /healthz's body (the proxy itself is
healthy, so the status stays 200: a load balancer must not drain a node whose dataplane works).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("kproxy")

FIRST_RETRY = 1.0
MAX_RETRY = 15.0


def _reason(err: BaseException) -> str:
    """The errno text of `err` or of the OSError that caused it."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__
    return str(err)


def _errno(err: BaseException) -> int | None:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__
    return None


class Listeners:
    """Starts listeners, retrying the ones that cannot bind yet; knows which are unbound."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._lock = threading.Lock()
        self._unbound: dict[str, str] = {}

    def unbound(self) -> dict[str, str]:
        """ "name address" -> why it is not served (empty when everything listens)."""
        with self._lock:
            return dict(self._unbound)

    def start(
        self,
        name: str,
        address: str,
        open_: Callable[[], object],
        *,
        hint: str = "",
        catch: tuple[type[BaseException], ...] = (OSError,),
    ) -> bool:
        """Call `open_` (bind and start serving); on failure log one line and keep retrying in a
        background thread. True when it is listening now."""
        try:
            open_()
            return True
        except catch as err:
            key = f"{name} {address}"
            reason = _reason(err)
            with self._lock:
                self._unbound[key] = reason
            cause = f" ({hint})" if hint and _errno(err) == errno.EADDRINUSE else ""
            log.error(
                "cannot listen on %s for %s: %s%s; proxying continues, retrying in the background",
                address,
                name,
                reason,
                cause,
                extra={"listener": name, "address": address},
            )
            threading.Thread(
                target=self._retry,
                args=(key, name, address, open_, catch),
                name=f"bind-{name}",
                daemon=True,
            ).start()
            return False

    def _retry(
        self,
        key: str,
        name: str,
        address: str,
        open_: Callable[[], object],
        catch: tuple[type[BaseException], ...],
    ) -> None:
        delay = FIRST_RETRY
        attempts = 1
        while not self._stop.wait(delay):
            attempts += 1
            try:
                open_()
            except catch as err:
                reason = _reason(err)
                with self._lock:
                    self._unbound[key] = reason
                log.debug("%s: %s still cannot listen: %s", name, address, reason)
                delay = min(delay * 2, MAX_RETRY)
                continue
            with self._lock:
                self._unbound.pop(key, None)
            log.info("now listening on %s for %s (after %d attempts)", address, name, attempts)
            return
