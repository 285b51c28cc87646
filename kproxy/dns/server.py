"""`DNSService`: kproxy's cluster DNS as the daemon sees it (start, update, stop, ready).

The daemon calls `update(snapshot)` after store changes; the call only records the snapshot and
wakes the feeder thread, which diffs it against the last snapshot sent (`diff_snapshots`, mostly
identity checks) and hands the delta to the serving engines. Each engine builds its next index
incrementally and swaps it in atomically.

Serving runs in `workers` child processes (`kproxy.dns.worker`), all reading the same addresses
through SO_REUSEPORT UDP sockets and a shared TCP listener that this process opens (so bind
errors surface in `start()`, and a restarted worker gets the very same sockets back). Separate
processes are what keep DNS answering in microseconds while the daemon's own threads hold the GIL
for a proxy sync. `workers=0` runs the engine on threads of this process instead. A worker that
dies is restarted and re-fed the full model: after 1 s, and after twice as long each time it
dies again before serving (up to `MAX_BACKOFF`). A worker that refuses this daemon's protocol
(`frames.PROTOCOL`: kproxy upgraded in place) is logged as such: only restarting kproxy helps.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

import kproxy
from kproxy.dns.frames import EXIT_PROTOCOL, PROTOCOL, write_frame
from kproxy.dns.index import ModelDelta, diff_snapshots
from kproxy.dns.options import DNSOptions
from kproxy.dns.placement import Placement, ensure_listen_addresses, remove_listen_addresses
from kproxy.dns.upstreams import resolve_upstreams
from kproxy.errors import KproxyError
from kproxy.model.store import Snapshot

if TYPE_CHECKING:  # imported when serving in this process (workers=0): the daemon needs none
    from kproxy.dns.engine import Engine  # of the resolver, wire codec and forwarder otherwise

log = logging.getLogger(__name__)

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
UDP_RCVBUF = 4 << 20
START_TIMEOUT = 15.0
MAX_BACKOFF = 60.0  # seconds between restarts of a worker that keeps dying before it serves


class DNSError(KproxyError):
    """The DNS service could not start."""


def _setup(sock: socket.socket, family: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # bind even before the address is configured (or while it moves between interfaces)
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)


def open_udp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _setup(sock, family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def open_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _setup(sock, family)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


class _Worker:
    """One serving child process and what it last reported."""

    def __init__(self, number: int, service: DNSService) -> None:
        self.number = number
        self.service = service
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = threading.Event()
        self.applied_seq = -1
        self.synced = False
        self.stats: dict[str, int] = {}
        self.dead = False
        self.last_spawn = 0.0
        self.failures = 0  # deaths since it last served: the restart delay doubles with each
        self.mismatch: dict[str, Any] | None = None  # its protocol_mismatch event
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def spawn(self, udp: list[socket.socket], tcp: list[socket.socket], init: object) -> None:
        fds = [s.fileno() for s in udp + tcp]
        root = os.path.dirname(os.path.dirname(os.path.abspath(kproxy.__file__)))
        env = dict(os.environ)
        # The daemon's own import path (its site-packages included), kproxy's root first: the
        # worker imports kproxy and, for queries of unusual shape, dnslib (wire._dnslib_parse).
        path = [root, *(p for p in sys.path if p), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in path if p))
        # -S: no `site`: it would run every .pth file of site-packages (import hooks of
        # editable installs, vendor start-up code): ~1.5 MB of RSS per worker for nothing. The
        # path above is all the worker needs of it.
        cmd = [
            sys.executable,
            "-S",
            "-m",
            "kproxy.dns.worker",
            "--protocol",
            str(PROTOCOL),
            "--udp",
            ",".join(str(s.fileno()) for s in udp),
            "--tcp",
            ",".join(str(s.fileno()) for s in tcp),
        ]
        old = self.proc
        if old is not None:  # a dead predecessor: release its pipes
            for stream in (old.stdin, old.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self.started.clear()
        self.dead = False
        self.mismatch = None
        self.applied_seq = -1
        self.synced = False
        self.last_spawn = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=fds, env=env
        )
        threading.Thread(
            target=self._read, args=(self.proc,), name=f"dns-worker-{self.number}", daemon=True
        ).start()
        self.send(init)

    def send(self, obj: object) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None:
            return
        with self._lock:
            try:
                write_frame(proc.stdin, obj)  # type: ignore[arg-type]
            except (BrokenPipeError, OSError, ValueError):
                self.dead = True

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        stream: IO[bytes] | None = proc.stdout
        assert stream is not None
        for line in stream:
            try:
                event: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "started":
                self.failures = 0
                self.started.set()
            elif kind == "protocol_mismatch":
                self.mismatch = event
            elif kind == "applied":
                self.applied_seq = int(event["seq"])
                self.synced = bool(event["synced"])
                self.service._progress()
            elif kind == "stats":
                self.stats = dict(event["stats"])
        proc.wait()
        if proc is self.proc:
            self.failures += 1
            self.dead = True
            self.service._worker_died(self, proc.returncode)

    @property
    def backoff(self) -> float:
        """Seconds from its last start to its next restart."""
        return min(MAX_BACKOFF, 2.0 ** max(0, self.failures - 1))

    def mismatch_text(self) -> str | None:
        event = self.mismatch
        if event is None:
            return None
        return (
            f"dns: worker {self.number} refuses to serve: the kproxy installed now speaks DNS "
            f"worker protocol {event.get('worker')}, this running daemon {PROTOCOL} (kproxy "
            "was upgraded while it ran); restart kproxy"
        )

    def stop(self, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        self.send(("stop",))
        if proc.stdin:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class DNSService:
    """kproxy's node-local cluster DNS server."""

    def __init__(self, *, options: DNSOptions) -> None:
        self.options = options
        self._udp: list[list[socket.socket]] = []  # per worker
        self._tcp: list[socket.socket] = []
        self._addresses: tuple[tuple[str, int], ...] = ()
        self._placement: Placement | None = None
        self._engine: Engine | None = None
        self._workers: list[_Worker] = []
        self._init: object = None
        self._latest: Snapshot | None = None
        self._sent: Snapshot | None = None
        self._seq = -1
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._stopping = False
        self._feeder: threading.Thread | None = None
        self._started = False

    # -- public API -------------------------------------------------------------------------
    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """The (ip, port) pairs actually served (ports resolved when 0 was asked for)."""
        return self._addresses

    @property
    def ready(self) -> bool:
        """True once every serving engine runs an index built from a synced model."""
        if not self._started or self._stopping:
            return False
        if self._engine is not None:
            return self._engine.index.synced
        return bool(self._workers) and all(
            w.started.is_set() and w.synced and not w.dead for w in self._workers
        )

    @property
    def worker_pids(self) -> tuple[int, ...]:
        if self._engine is not None:
            return (os.getpid(),)
        return tuple(w.pid for w in self._workers if w.pid is not None)

    def stats(self) -> dict[str, int]:
        """Counters summed over the serving engines (worker figures are up to 1 s old)."""
        if self._engine is not None:
            return self._engine.stats()
        total: dict[str, int] = {}
        for w in self._workers:
            for k, v in w.stats.items():
                if k in ("generation", "synced"):
                    total[k] = min(total.get(k, v), v)
                else:
                    total[k] = total.get(k, 0) + v
        return total

    def start(self) -> None:
        if self._started:
            return
        endpoints = self.options.endpoints
        if self.options.create_interface:
            self._placement = ensure_listen_addresses(ip for ip, _ in endpoints)
        try:
            self._open_sockets(endpoints)
            upstreams = resolve_upstreams(
                self.options.upstreams,
                resolv_conf=self.options.resolv_conf,
                own=self._addresses,
            )
            if not upstreams:
                log.warning("dns: no upstream servers: names outside the zone get SERVFAIL")
            self._init = ("init", self.options, upstreams)
            if self.options.workers == 0:
                from kproxy.dns.engine import Engine  # workers=0 only: serving in this process

                self._engine = Engine(
                    self.options,
                    udp=self._udp[0],
                    tcp=self._tcp,
                    upstreams=upstreams,
                )
                self._engine.start()
            else:
                self._spawn_workers()
        except Exception:
            self._close()
            raise
        self._started = True
        self._feeder = threading.Thread(target=self._feed, name="dns-feeder", daemon=True)
        self._feeder.start()
        log.info(
            "dns: serving %s on %s (%s)",
            self.options.zone,
            ", ".join(_fmt(a) for a in self._addresses),
            f"{self.options.workers} worker processes" if self.options.workers else "in-process",
        )

    def update(self, snapshot: Snapshot) -> None:
        """Serve `snapshot` from now on (asynchronously; cheap; thread-safe)."""
        with self._cond:
            self._latest = snapshot
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every engine serves the last snapshot given to `update`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._caught_up():
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))

    def stop(self) -> None:
        if not self._started:
            return
        self._stopping = True
        self._wake.set()
        if self._feeder is not None:
            self._feeder.join(5)
        if self._engine is not None:
            self._engine.stop()
        for w in self._workers:
            w.stop(5.0)
        self._close()
        self._started = False
        self._stopping = False

    # -- internals ----------------------------------------------------------------------------
    def _open_sockets(self, endpoints: Iterable[tuple[str, int]]) -> None:
        per = max(1, self.options.workers)
        self._udp = [[] for _ in range(per)]
        resolved = []
        for host, port in endpoints:
            try:
                first = open_udp(host, port)
                port = first.getsockname()[1]
                self._udp[0].append(first)
                for i in range(1, per):
                    self._udp[i].append(open_udp(host, port))
                self._tcp.append(open_tcp(host, port))
            except OSError as exc:
                raise DNSError(f"cannot listen on {_fmt((host, port))}: {exc}") from exc
            resolved.append((str(ipaddress.ip_address(host)), port))
        self._addresses = tuple(resolved)

    def _spawn_workers(self) -> None:
        self._workers = [_Worker(i, self) for i in range(self.options.workers)]
        for i, w in enumerate(self._workers):
            w.spawn(self._udp[i], self._tcp, self._init)
        deadline = time.monotonic() + START_TIMEOUT
        for w in self._workers:
            while not w.started.wait(0.05):
                if w.dead and w.proc is not None and w.proc.poll() is not None:
                    text = w.mismatch_text()
                    raise DNSError(text or f"DNS worker {w.number} exited with {w.proc.returncode}")
                if time.monotonic() > deadline:
                    raise DNSError(f"DNS worker {w.number} did not start")

    def _close(self) -> None:
        for group in self._udp:
            for s in group:
                s.close()
        for s in self._tcp:
            s.close()
        self._udp, self._tcp = [], []
        if self._placement is not None:
            remove_listen_addresses(self._placement)
            self._placement = None

    def _caught_up(self) -> bool:
        if self._latest is not None and self._latest is not self._sent:
            return False
        if self._engine is not None:
            return True
        return all(w.applied_seq >= self._seq and not w.dead for w in self._workers)

    def _progress(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _worker_died(self, worker: _Worker, code: int | None) -> None:
        if self._stopping:
            return
        text = worker.mismatch_text()
        if text is None and code == EXIT_PROTOCOL:
            text = f"dns: worker {worker.number} refuses this daemon's protocol; restart kproxy"
        if text is None:
            text = f"dns: worker {worker.number} exited with {code}"
        left = max(0.0, worker.last_spawn + worker.backoff - time.monotonic())
        log.error("%s; starting it again in %.0f s", text, left)
        self._wake.set()

    def _restart_dead(self) -> None:
        for w in self._workers:
            if not w.dead or self._stopping:
                continue
            if time.monotonic() - w.last_spawn < w.backoff:
                continue  # the feeder comes back every 0.5 s
            # the replacement builds the whole index before it reads its socket: queries wait
            # in the socket buffer for a moment instead of getting SERVFAIL
            assert isinstance(self._init, tuple)
            init = self._init
            if self._sent is not None:
                init = (*init, self._seq, diff_snapshots(None, self._sent))
            w.spawn(self._udp[w.number], self._tcp, init)

    def _feed(self) -> None:
        while not self._stopping:
            self._wake.wait(0.5)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._restart_dead()
                with self._cond:
                    snap = self._latest
                if snap is None or snap is self._sent:
                    continue
                delta = diff_snapshots(self._sent, snap)
                self._deliver(delta)
                with self._cond:
                    self._sent = snap
                    self._cond.notify_all()
            except Exception:
                log.exception("dns: feeding the model to the DNS engines failed")
                time.sleep(0.5)

    def _deliver(self, delta: ModelDelta) -> None:
        self._seq += 1
        if self._engine is not None:
            self._engine.apply(delta)
            return
        for w in self._workers:
            w.send(("delta", self._seq, delta))


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
