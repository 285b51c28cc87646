"""Send real traffic from inside a lab namespace and read back what happened.

Owns the host-side API; the requests themselves are made by :mod:`kproxy.lab.probe`, started with
``ip netns exec <ns> python3 -S -m kproxy.lab.probe`` (~30 ms per call). Loops (``http_batch``,
``udp_query`` with n > 1, streams) run inside ONE probe process, with a new connection per
request, so 100 requests cost milliseconds, not 100 process starts.

Every request ends in a :class:`Result`: ``ok`` or an ``error_kind`` (see :mod:`kproxy.lab.probe`:
"refused" comes back at once for REJECT / no listener, "timeout" only after `timeout` for
DROP, "unreachable", "reset", "denied", "closed", "http", ...). Replies of
:mod:`kproxy.lab.servers` parse into ``name``, ``client_ip`` and ``client_port``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from kproxy.lab.nsexec import helper_argv, helper_env, ns_argv

_SLACK = 10.0


@dataclass(frozen=True)
class Result:
    """One request or query."""

    ok: bool
    body: str = ""
    error_kind: str | None = None
    error: str = ""
    elapsed: float = 0.0
    t: float = 0.0  # monotonic start time inside the probe (for ordering / gaps)

    @property
    def fields(self) -> dict[str, str]:
        """``key=value`` pairs of a servers.py reply."""
        return dict(part.split("=", 1) for part in self.body.split() if "=" in part)

    @property
    def name(self) -> str | None:
        return self.fields.get("name") if self.ok else None

    @property
    def client_ip(self) -> str | None:
        client = self.fields.get("client")
        return client.rsplit(":", 1)[0] if client else None

    @property
    def client_port(self) -> int | None:
        client = self.fields.get("client")
        return int(client.rsplit(":", 1)[1]) if client else None


@dataclass(frozen=True)
class Batch:
    """Several requests; counters over the successful replies and over the failure kinds."""

    results: tuple[Result, ...]

    @property
    def names(self) -> Counter[str]:
        return Counter(r.name for r in self.results if r.ok and r.name is not None)

    @property
    def clients(self) -> Counter[str]:
        return Counter(r.client_ip for r in self.results if r.ok and r.client_ip is not None)

    @property
    def errors(self) -> Counter[str]:
        return Counter(r.error_kind or "?" for r in self.results if not r.ok)

    @property
    def ok_count(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def all_ok(self) -> bool:
        return all(r.ok for r in self.results)


@dataclass(frozen=True)
class StreamResult(Batch):
    """A timed stream of requests (see :func:`start_stream`)."""

    duration: float = 0.0

    @property
    def failures(self) -> int:
        return len(self.results) - self.ok_count

    @property
    def max_gap(self) -> float:
        """Longest time between the starts of two consecutive successful requests."""
        times = [r.t for r in self.results if r.ok]
        return max((b - a for a, b in pairwise(times)), default=0.0)


@dataclass(frozen=True)
class HoldResult:
    """One long-lived keep-alive connection (see :func:`start_hold`)."""

    exchanges: tuple[Result, ...]
    error_kind: str | None
    error: str
    local: tuple[str, int]
    duration: float

    @property
    def ok(self) -> bool:
        """At least one exchange and the connection never failed."""
        return bool(self.exchanges) and self.error_kind is None

    @property
    def names(self) -> Counter[str]:
        return Counter(r.name for r in self.exchanges if r.name is not None)


def _result(raw: dict[str, Any]) -> Result:
    return Result(
        ok=bool(raw["ok"]),
        body=raw.get("body", ""),
        error_kind=raw.get("kind"),
        error=raw.get("error", ""),
        elapsed=float(raw.get("elapsed", 0.0)),
        t=float(raw.get("t", 0.0)),
    )


def _argv(ns: str | None, spec: dict[str, Any]) -> list[str]:
    return ns_argv(ns, helper_argv("kproxy.lab.probe", json.dumps(spec)))


def _probe(ns: str | None, spec: dict[str, Any], budget: float) -> Any:
    proc = subprocess.run(
        _argv(ns, spec),
        capture_output=True,
        text=True,
        timeout=budget + _SLACK,
        env=helper_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"probe in {ns} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spec(op: str, ip: str, port: int, **kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"op": op, "ip": ip, "port": int(port)}
    spec.update({k: v for k, v in kw.items() if v is not None})
    return spec


def http_get(
    ns: str | None,
    ip: str,
    port: int,
    timeout: float = 1.0,
    *,
    path: str = "/",
    src_ip: str | None = None,
) -> Result:
    """One HTTP GET from namespace `ns` (None: the current one) to ip:port."""
    spec = _spec("http", ip, port, n=1, timeout=timeout, path=path, src_ip=src_ip)
    return _result(_probe(ns, spec, timeout)[0])


def http_batch(
    ns: str | None,
    ip: str,
    port: int,
    *,
    n: int,
    timeout: float = 1.0,
    interval: float = 0.0,
    path: str = "/",
    src_ip: str | None = None,
) -> Batch:
    """`n` HTTP GETs, each on a new connection, from one probe process."""
    spec = _spec(
        "http", ip, port, n=n, timeout=timeout, interval=interval, path=path, src_ip=src_ip
    )
    raw = _probe(ns, spec, n * (timeout + interval))
    return Batch(results=tuple(_result(r) for r in raw))


def http_many(
    ns: str | None,
    targets: Sequence[tuple[str, int]],
    *,
    timeout: float = 1.0,
    path: str = "/",
) -> Batch:
    """One GET to each (ip, port) in order, from one probe process; results in target order."""
    spec: dict[str, Any] = {"op": "http_many", "targets": [[ip, int(port)] for ip, port in targets]}
    spec.update(timeout=timeout, path=path)
    raw = _probe(ns, spec, len(targets) * timeout)
    return Batch(results=tuple(_result(r) for r in raw))


def http_names(ns: str | None, ip: str, port: int, *, n: int, timeout: float = 1.0) -> Counter[str]:
    """Server name -> replies over `n` requests (failures are left out; see :func:`http_batch`)."""
    return http_batch(ns, ip, port, n=n, timeout=timeout).names


def wait_http(
    ns: str | None,
    ip: str,
    port: int,
    *,
    deadline: float = 5.0,
    timeout: float = 0.5,
    expect: str | None = None,
) -> Result:
    """Retry GETs until one succeeds (and its body contains `expect`) or `deadline` s pass;
    returns the last attempt."""
    spec = _spec("wait", ip, port, deadline=deadline, timeout=timeout, expect=expect)
    return _result(_probe(ns, spec, deadline + timeout)[0])


def udp_query(
    ns: str | None,
    ip: str,
    port: int,
    *,
    src_port: int | None = None,
    src_ip: str | None = None,
    n: int = 1,
    timeout: float = 1.0,
    interval: float = 0.0,
    payload: str = "ping",
) -> Batch:
    """`n` datagrams from one socket (bound to `src_port` if given, so conntrack sees the same
    flow across calls), each waiting up to `timeout` for its reply."""
    spec = _spec(
        "udp",
        ip,
        port,
        n=n,
        timeout=timeout,
        interval=interval,
        src_port=src_port,
        src_ip=src_ip,
        payload=payload,
    )
    raw = _probe(ns, spec, n * (timeout + interval))
    return Batch(results=tuple(_result(r) for r in raw))


class Running:
    """A probe running in the background (a stream or a held connection)."""

    def __init__(self, ns: str | None, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc = subprocess.Popen(
            _argv(ns, spec),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=helper_env(),
            start_new_session=True,
        )
        self._started = False
        self._raw: Any = None

    def wait_started(self, timeout: float = 5.0) -> None:
        """Block until the probe runs (for a hold: until its connection is established)."""
        if self._started:
            return
        assert self.proc.stdout is not None
        # Byte by byte on the raw fd: communicate() later reads the fd directly, so nothing past
        # this line may sit in a Python buffer.
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            byte = os.read(fd, 1) if ready else b""
            if not byte:
                break
            line += byte
        if line.strip() != b"STARTED":
            self.proc.kill()
            raise RuntimeError(f"probe did not start: {line!r}")
        self._started = True

    def stop(self) -> None:
        """Ask the probe to finish now and report (no-op if it already finished)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def _finish(self, timeout: float | None) -> Any:
        if self._raw is None:
            if timeout is None:
                timeout = float(self.spec.get("duration") or 600.0) + _SLACK
            try:
                out, err = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.stop()
                out, err = self.proc.communicate(timeout=_SLACK)
            lines = [ln for ln in out.decode().splitlines() if ln.strip() not in ("", "STARTED")]
            if self.proc.returncode != 0 or not lines:
                raise RuntimeError(f"probe failed ({self.proc.returncode}): {err.decode()}")
            self._raw = json.loads(lines[-1])
        return self._raw


class Stream(Running):
    def result(self, timeout: float | None = None) -> StreamResult:
        """Wait for the end of the stream (duration elapsed, or :meth:`stop`)."""
        raw = self._finish(timeout)
        return StreamResult(
            results=tuple(_result(r) for r in raw["results"]), duration=float(raw["duration"])
        )


class Hold(Running):
    def result(self, timeout: float | None = None) -> HoldResult:
        """Wait for the held connection to end (duration, first failure, or :meth:`stop`)."""
        raw = self._finish(timeout)
        error = raw.get("error") or {}
        return HoldResult(
            exchanges=tuple(_result(r) for r in raw["exchanges"]),
            error_kind=error.get("kind"),
            error=error.get("error", ""),
            local=(raw["local"][0], int(raw["local"][1])),
            duration=float(raw["duration"]),
        )


def start_stream(
    ns: str | None,
    ip: str,
    port: int,
    *,
    duration: float | None = None,
    interval: float = 0.02,
    timeout: float = 0.5,
    proto: str = "tcp",
    src_ip: str | None = None,
) -> Stream:
    """Start a request every `interval` s (HTTP on a new connection, or a UDP query from a new
    socket) for `duration` s or until ``stop()``; ``result()`` gives a :class:`StreamResult`."""
    spec = _spec(
        "stream",
        ip,
        port,
        duration=duration,
        interval=interval,
        timeout=timeout,
        proto=proto,
        src_ip=src_ip,
    )
    return Stream(ns, spec)


def stream(
    ns: str | None,
    ip: str,
    port: int,
    *,
    duration: float,
    interval: float = 0.02,
    timeout: float = 0.5,
    proto: str = "tcp",
) -> StreamResult:
    """Blocking :func:`start_stream`."""
    return start_stream(
        ns, ip, port, duration=duration, interval=interval, timeout=timeout, proto=proto
    ).result()


def start_hold(
    ns: str | None,
    ip: str,
    port: int,
    *,
    duration: float | None = None,
    interval: float = 0.1,
    timeout: float = 1.0,
) -> Hold:
    """Open ONE keep-alive HTTP connection and exchange a request every `interval` s until
    `duration`, the first failure, or ``stop()``. ``wait_started()`` returns once connected."""
    spec = _spec("hold", ip, port, duration=duration, interval=interval, timeout=timeout)
    return Hold(ns, spec)
