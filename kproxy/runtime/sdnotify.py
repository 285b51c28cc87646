"""The systemd notify protocol (sd_notify(3)) without libsystemd.

This module owns the conversation with the service manager: `READY=1` once the first sync
succeeded, `WATCHDOG=1` pings from the sync loop, `STATUS=` lines for `systemctl status`, and
`STOPPING=1` on a graceful stop. Each message is one datagram of newline-separated `KEY=VALUE`
fields sent to the AF_UNIX socket named by `NOTIFY_SOCKET`; a leading `@` there names a socket
in the abstract namespace.

Invariants:
- Without `NOTIFY_SOCKET` (not started by systemd, or not `Type=notify`) every call is a no-op
  that returns False, so callers never branch on "are we under systemd".
- Sending never raises: a notification that cannot be delivered is logged and reported as False.
  Failing the daemon because its supervisor went away would be worse than the missing message.
- The watchdog period is read from `WATCHDOG_USEC`, and only honoured when `WATCHDOG_PID` is
  absent or names this process (systemd sets it for the main PID; a child that inherited the
  environment must not ping on the parent's behalf).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to the socket named by `environ["NOTIFY_SOCKET"]`.

    `environ` defaults to `os.environ`; `pid` (for the WATCHDOG_PID check) to `os.getpid()`.
    The socket is created on first use and kept open; `close()` releases it.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _parse_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _parse_watchdog(env, pid=os.getpid() if pid is None else pid)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send one message made of `KEY=VALUE` fields. Returns True when it was delivered."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            log.warning(
                "sd_notify failed",
                extra={"notify_socket": _printable(self._address), "error": str(exc)},
            )
            self.close()
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (`READY=1`), optionally with a status line."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.send(*fields)

    def watchdog(self) -> bool:
        """Ping the watchdog (`WATCHDOG=1`)."""
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Set the free-form status shown by `systemctl status` (`STATUS=`)."""
        return self.send(_status_field(text))

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd a graceful stop has begun (`STOPPING=1`)."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.send(*fields)

    def reloading(self) -> bool:
        """Tell systemd a configuration reload has begun (`RELOADING=1`, with the monotonic
        timestamp systemd >= 253 expects for Type=notify-reload); follow with `ready()`."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the start (or stop) timeout fires
        (`EXTEND_TIMEOUT_USEC=`), e.g. while a first sync of a large cluster runs."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_timeout(self) -> float | None:
        """The watchdog timeout systemd enforces, in seconds, or None when there is none."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000

    def watchdog_interval(self) -> float | None:
        """How often to call `watchdog()`, in seconds: half the timeout, as sd_watchdog_enabled(3)
        recommends, so one late ping does not kill the service. None when no watchdog is set."""
        timeout = self.watchdog_timeout()
        return None if timeout is None else timeout / 2

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of a path.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd also accepts vsock: addresses (for VMs); kproxy never runs that way.
    log.warning("ignoring unsupported NOTIFY_SOCKET", extra={"notify_socket": value})
    return None


def _parse_watchdog(env: Mapping[str, str], *, pid: int) -> int | None:
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC", extra={"value": raw})
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID", extra={"value": owner})
            return None
    return usec


def _status_field(text: str) -> str:
    # A newline would start a new KEY=VALUE field: keep the status on one line.
    return "STATUS=" + " ".join(text.splitlines())


def _printable(address: str | bytes) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode(errors="replace")
    return address
