"""The userspace mode's proxy: listeners that accept service traffic and copy it to endpoints.

One `ProxyEngine` per agent: a single thread running an epoll loop over every proxy socket of
every service port (both IP families). The sync thread opens and closes listeners and updates
their `Balancer`s; the loop does the rest. Why not asyncio: one proxied request costs an accept,
a non-blocking connect, two small copies and two closes; asyncio's transports, futures and
callbacks around those syscalls cost several times the syscalls themselves (measured in
benchmarks/modes_bench.py), so this loop dispatches straight from epoll to a handler per fd.

TCP (`TCPListener`): each accepted connection gets an endpoint from the listener's balancer and
a non-blocking connect. A refused or timed-out connect tries the next endpoint (kube-proxy's
userspace mode: four attempts with timeouts of 0.25, 0.5, 1 and 2 s, the affinity record skipped
on retries); when every attempt fails the client is reset. Bytes are then copied both ways:
small transfers with recv_into/send through one shared buffer, and a direction that fills the
buffer switches to `os.splice` through a pipe (socket -> pipe -> socket without copying into
Python), which is what a bulk transfer needs. Half-closes are forwarded (EOF -> shutdown(WR)),
a reset on one side resets the other. Established connections belong to no listener: closing a
listener or changing its endpoints never touches them; they end with the process.

UDP (`UDPListener`): one session per client address (and local address), each with its own
connected socket to the endpoint chosen when the session started; replies go back from the
address the client's datagram arrived on (IP_PKTINFO / IPV6_PKTINFO), so the kernel's REDIRECT
translation matches them. A session idle for `udp_timeout` is closed (kube-proxy's
`--udp-timeout`, 250 ms by default).

No endpoints: the proxier closes the listener, so the REDIRECTed connection meets a port with
no socket and the kernel answers with a reset (TCP) or port unreachable (UDP): "connection
refused", at once.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kproxy.backends.userspace_balance import Balancer

log = logging.getLogger("kproxy.userspace")

CONNECT_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)  # kube-proxy's endpointDialTimeout, one per attempt
BUFFER = 64 * 1024
PIPE_SIZE = 1 << 20
SPLICE = hasattr(os, "splice")
_F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = (
    (getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)) if SPLICE else 0
)
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_ANCILLARY = 128
_UDP_MAX = 65535

IN = select.EPOLLIN
OUT = select.EPOLLOUT
_GONE = errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH


def split_hostport(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


class ProxyEngine:
    """The epoll loop thread shared by every listener. See the module docstring."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Any] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ep.register(self._wake_r, IN)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.buffer = bytearray(BUFFER)
        self.view = memoryview(self.buffer)
        self.splice = SPLICE

    # -- control (any thread) ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="userspace-proxy", daemon=True)
            self._thread.start()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the loop thread (thread-safe)."""
        self._calls.append(fn)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def stop(self) -> None:
        self._stop = True
        self.call_soon(lambda: None)
        if self._thread is not None:
            self._thread.join(5)

    # -- loop-thread API -----------------------------------------------------------------------
    def add(self, fd: int, mask: int, handler: Any) -> None:
        self._handlers[fd] = handler
        self._ep.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self._ep.modify(fd, mask)

    def remove(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def rehandle(self, fd: int, mask: int, handler: Any) -> None:
        """A registered fd changes hands (one epoll_ctl instead of a delete and an add)."""
        self._handlers[fd] = handler
        self._ep.modify(fd, mask)

    def forget(self, fd: int) -> None:
        """Drop the handler of an fd the caller closes next: closing removes it from epoll."""
        self._handlers.pop(fd, None)

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def _run(self) -> None:
        poll = self._ep.poll
        handlers = self._handlers
        wake = self._wake_r
        timers = self._timers
        while not self._stop:
            timeout = -1.0
            if timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            try:
                events = poll(timeout, 256)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == wake:
                    self._drain_calls()
                    continue
                handler = handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler.on_event(fd, ev)
                except Exception:
                    log.exception("userspace proxy: handler failed")
                    try:
                        handler.close()
                    except Exception:
                        log.exception("userspace proxy: close failed")
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    _, _, fn = heapq.heappop(timers)
                    try:
                        fn()
                    except Exception:
                        log.exception("userspace proxy: timer failed")
        for handler in list(handlers.values()):
            with contextlib.suppress(Exception):
                handler.close()

    def _drain_calls(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("userspace proxy: call failed")


class Stats:
    """Counters of one listener (read by status; written only by the loop thread)."""

    __slots__ = ("accepted", "active", "connect_failures", "no_endpoint", "per_endpoint", "retries")

    def __init__(self) -> None:
        self.accepted = 0
        self.active = 0
        self.connect_failures = 0
        self.retries = 0
        self.no_endpoint = 0
        self.per_endpoint: dict[str, int] = {}

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "active": self.active,
            "connect_failures": self.connect_failures,
            "retries": self.retries,
            "no_endpoint": self.no_endpoint,
            "per_endpoint": dict(self.per_endpoint),
        }


def _family_of(bind_ip: str) -> int:
    return socket.AF_INET6 if ":" in bind_ip else socket.AF_INET


def bind_socket(kind: int, bind_ip: str, port: int) -> socket.socket:
    """A bound (not yet listening) non-blocking socket; port 0 lets the kernel choose."""
    family = _family_of(bind_ip)
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((bind_ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _Listener:
    """What TCP and UDP listeners share: the socket, the balancer, the counters."""

    def __init__(self, engine: ProxyEngine, sock: socket.socket, balancer: Balancer) -> None:
        self.engine = engine
        self.sock = sock
        self.fd = sock.fileno()
        self.balancer = balancer
        # (balancer, predicate): clients the predicate selects use that balancer instead
        # (the short-circuit of pod and node traffic under externalTrafficPolicy Local)
        self.short_circuit: tuple[Balancer, Callable[[str], bool]] | None = None
        self.stats = Stats()
        self.family = sock.family
        self.port = int(sock.getsockname()[1])
        self.closed = False

    def register(self) -> None:
        self.engine.add(self.fd, IN, self)

    def balancer_for(self, client_ip: str) -> Balancer:
        short = self.short_circuit
        if short is not None and short[1](client_ip):
            return short[0]
        return self.balancer

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.engine.remove(self.fd)
        self.sock.close()


# -- TCP -------------------------------------------------------------------------------------------
class TCPListener(_Listener):
    def on_event(self, fd: int, ev: int) -> None:
        accept = self.sock._accept  # type: ignore[attr-defined]  # (fd, addr) without a wrapper
        for _ in range(64):
            try:
                cfd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("userspace proxy: accept on port %d failed: %s", self.port, err)
                    return
                if err.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            client = socket.socket(self.family, socket.SOCK_STREAM, 0, cfd)
            client.setblocking(False)
            self.stats.accepted += 1
            _Connect(self, client, addr[0]).attempt()


class _Connect:
    """Connecting one accepted client to an endpoint, retrying the next one on failure."""

    __slots__ = ("client", "client_ip", "done", "endpoint", "fd", "listener", "sock", "tries")

    def __init__(self, listener: TCPListener, client: socket.socket, client_ip: str) -> None:
        self.listener = listener
        self.client = client
        self.client_ip = client_ip
        self.tries = 0
        self.sock: socket.socket | None = None
        self.fd = -1
        self.endpoint = ""
        self.done = False

    def attempt(self) -> None:
        lis = self.listener
        while self.tries < len(CONNECT_TIMEOUTS):
            endpoint = lis.balancer_for(self.client_ip).pick(self.client_ip, retry=self.tries > 0)
            if endpoint is None:
                lis.stats.no_endpoint += 1
                break
            if self.tries:
                lis.stats.retries += 1
            timeout = CONNECT_TIMEOUTS[self.tries]
            self.tries += 1
            ip, port = split_hostport(endpoint)
            sock = socket.socket(
                _family_of(ip), socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
            rc = sock.connect_ex((ip, port))
            if rc == 0:
                self.endpoint = endpoint
                self._connected(sock)
                return
            if rc != errno.EINPROGRESS:
                sock.close()
                lis.stats.connect_failures += 1
                continue
            self.sock, self.fd, self.endpoint = sock, sock.fileno(), endpoint
            lis.engine.add(self.fd, OUT, self)
            lis.engine.later(timeout, self._timed_out(sock))
            return
        self._give_up()

    def _timed_out(self, sock: socket.socket) -> Callable[[], None]:
        def fire() -> None:
            if self.sock is sock and not self.done:
                log.debug("userspace proxy: connect to %s timed out", self.endpoint)
                self._failed()

        return fire

    def on_event(self, fd: int, ev: int) -> None:
        if self.sock is None or not ev & (OUT | select.EPOLLERR | select.EPOLLHUP):
            return  # a stale event of an earlier socket that had this fd number
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            log.debug("userspace proxy: connect to %s: %s", self.endpoint, os.strerror(err))
            self._failed()
            return
        sock = self.sock
        self.sock = None
        self._connected(sock, registered=True)

    def _failed(self) -> None:
        assert self.sock is not None
        self.listener.stats.connect_failures += 1
        self.listener.engine.remove(self.fd)
        self.sock.close()
        self.sock = None
        self.attempt()

    def _give_up(self) -> None:
        self.done = True
        _reset(self.client)

    def _connected(self, sock: socket.socket, *, registered: bool = False) -> None:
        self.done = True
        stats = self.listener.stats
        stats.per_endpoint[self.endpoint] = stats.per_endpoint.get(self.endpoint, 0) + 1
        stats.active += 1
        _Pair(self.listener.engine, self.client, sock, stats, registered=registered)

    def close(self) -> None:
        if self.sock is not None:
            self.listener.engine.remove(self.fd)
            self.sock.close()
            self.sock = None
        self.done = True
        self.client.close()


def _reset(sock: socket.socket) -> None:
    """Close with a reset (RST), not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Direction:
    """Bytes flowing from one socket to the other, with what is still to be written."""

    __slots__ = ("done", "dst", "eof", "in_pipe", "pending", "pipe", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pending = b""  # copied bytes not yet written (recv/send mode)
        self.pipe: tuple[int, int] | None = None  # splice mode
        self.in_pipe = 0
        self.eof = False
        self.done = False

    @property
    def blocked(self) -> bool:
        return bool(self.pending) or self.in_pipe > 0


class _Pair:
    """An established proxied connection: client <-> endpoint."""

    __slots__ = ("a", "b", "closed", "down", "engine", "fa", "fb", "masks", "stats", "up")

    def __init__(
        self,
        engine: ProxyEngine,
        client: socket.socket,
        backend: socket.socket,
        stats: Stats,
        *,
        registered: bool = False,
    ) -> None:
        self.engine = engine
        self.a, self.b = client, backend
        self.fa, self.fb = client.fileno(), backend.fileno()
        self.up = _Direction(client, backend)  # client -> endpoint
        self.down = _Direction(backend, client)  # endpoint -> client
        self.stats = stats
        self.closed = False
        # the client socket inherited TCP_NODELAY from the listener
        with contextlib.suppress(OSError):
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.masks = {self.fa: IN, self.fb: IN}
        engine.add(self.fa, IN, self)
        if registered:  # still registered from the connect: hand it over
            engine.rehandle(self.fb, IN, self)
        else:
            engine.add(self.fb, IN, self)
        # the client usually sent its request with the handshake: move it now, not one
        # epoll round later
        self._pump(self.up)

    def on_event(self, fd: int, ev: int) -> None:
        inbound, outbound = (self.up, self.down) if fd == self.fa else (self.down, self.up)
        if ev & select.EPOLLERR:
            self.close(reset=True)  # reset by the peer, or unreachable
            return
        if ev & (IN | select.EPOLLHUP):
            self._pump(inbound)
        if self.closed:
            return
        if ev & OUT:
            self._flush(outbound)
        if ev & select.EPOLLHUP and inbound.eof and not self.closed:
            # both ways shut on this socket: nothing more can move through it
            self.close(reset=outbound.blocked)

    # -- moving bytes ----------------------------------------------------------------------------
    def _pump(self, d: _Direction) -> None:
        if d.eof or d.blocked:
            return
        try:
            if d.pipe is not None:
                n = os.splice(d.src.fileno(), d.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
                if n == 0:
                    self._eof(d)
                    return
                d.in_pipe += n
            else:
                engine = self.engine
                n = d.src.recv_into(engine.buffer)
                if n == 0:
                    self._eof(d)
                    return
                sent = d.dst.send(engine.view[:n]) if n else 0
                if sent < n:
                    d.pending = bytes(engine.view[sent:n])
                elif n == BUFFER and engine.splice:
                    d.pipe = _make_pipe()  # bulk: from now on without copying into Python
                if d.pending:
                    self._blocked(d)
                return
        except BlockingIOError:
            return
        except OSError as err:
            self._broken(err)
            return
        self._flush(d)

    def _flush(self, d: _Direction) -> None:
        try:
            if d.pending:
                sent = d.dst.send(d.pending)
                d.pending = d.pending[sent:]
            while d.in_pipe:
                assert d.pipe is not None
                n = os.splice(d.pipe[0], d.dst.fileno(), d.in_pipe, flags=_SPLICE_FLAGS)
                d.in_pipe -= n
        except BlockingIOError:
            pass
        except OSError as err:
            self._broken(err)
            return
        if d.blocked:
            self._blocked(d)
        else:
            self._unblocked(d)
            if d.eof:
                self._finish(d)

    def _set(self, fd: int, mask: int) -> None:
        if self.masks[fd] != mask:
            self.masks[fd] = mask
            self.engine.modify(fd, mask)

    def _blocked(self, d: _Direction) -> None:
        """Stop reading the source until the destination took what is pending."""
        src, dst = d.src.fileno(), d.dst.fileno()
        self._set(src, self.masks[src] & ~IN)
        self._set(dst, self.masks[dst] | OUT)

    def _unblocked(self, d: _Direction) -> None:
        src, dst = d.src.fileno(), d.dst.fileno()
        self._set(dst, self.masks[dst] & ~OUT)
        if not d.eof:
            self._set(src, self.masks[src] | IN)

    def _eof(self, d: _Direction) -> None:
        d.eof = True
        other = self.down if d is self.up else self.up
        if not other.done:  # (when both are done the sockets close: no epoll change needed)
            src = d.src.fileno()
            self._set(src, self.masks[src] & ~IN)
        if not d.blocked:
            self._finish(d)

    def _finish(self, d: _Direction) -> None:
        """The source ended and everything was written: pass the half-close on."""
        if d.done:
            return
        d.done = True
        if self.up.done and self.down.done:
            self.close()  # close() sends the last FIN
            return
        with contextlib.suppress(OSError):
            d.dst.shutdown(socket.SHUT_WR)

    def _broken(self, err: OSError) -> None:
        if err.errno not in _GONE:
            log.debug("userspace proxy: connection failed: %s", err)
        # a reset on one side resets the other
        self.close(reset=True)

    def close(self, *, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.stats.active -= 1
        self.engine.forget(self.fa)  # closing the sockets below removes them from epoll
        self.engine.forget(self.fb)
        for d in (self.up, self.down):
            if d.pipe is not None:
                os.close(d.pipe[0])
                os.close(d.pipe[1])
                d.pipe = None
        if reset:
            _reset(self.a)
            _reset(self.b)
        else:
            self.a.close()
            self.b.close()


def _make_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        import fcntl

        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return r, w


# -- UDP -------------------------------------------------------------------------------------------
def _pktinfo_local(family: int, ancdata: list[tuple[int, int, bytes]]) -> bytes:
    """The local address a datagram arrived on, packed, from its IP_PKTINFO/IPV6_PKTINFO."""
    for level, kind, data in ancdata:
        if family == socket.AF_INET and level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
            return data[8:12]  # struct in_pktinfo: ifindex, spec_dst, addr (header dst)
        if family == socket.AF_INET6 and level == socket.IPPROTO_IPV6 and kind == _IPV6_PKTINFO:
            return data[:16]  # struct in6_pktinfo: addr, ifindex
    return b""


def _reply_ancillary(family: int, local: bytes) -> list[tuple[int, int, bytes]]:
    if not local:
        return []
    if family == socket.AF_INET:
        return [(socket.IPPROTO_IP, _IP_PKTINFO, struct.pack("=i4s4s", 0, local, b"\0" * 4))]
    return [(socket.IPPROTO_IPV6, _IPV6_PKTINFO, struct.pack("=16si", local, 0))]


class _Session:
    """One UDP client of a listener, with its own connected socket to its endpoint."""

    __slots__ = ("client", "closed", "endpoint", "fd", "key", "last", "listener", "local", "sock")

    def __init__(
        self, listener: UDPListener, key: tuple[Any, bytes], sock: socket.socket, endpoint: str
    ) -> None:
        self.listener = listener
        self.key = key
        self.client = key[0]
        self.local = key[1]
        self.sock = sock
        self.fd = sock.fileno()
        self.endpoint = endpoint
        self.last = time.monotonic()
        self.closed = False

    def on_event(self, fd: int, ev: int) -> None:
        lis = self.listener
        anc = _reply_ancillary(lis.family, self.local)
        for _ in range(64):
            try:
                data = self.sock.recv(_UDP_MAX)
            except BlockingIOError:
                return
            except OSError as err:  # ECONNREFUSED: the endpoint has no socket on that port
                log.debug("userspace proxy: UDP endpoint %s: %s", self.endpoint, err)
                self.close()
                return
            self.last = time.monotonic()
            try:
                lis.sock.sendmsg([data], anc, 0, self.client)
            except BlockingIOError:
                pass  # a full send queue drops the datagram, as the kernel would
            except OSError as err:
                log.debug("userspace proxy: UDP reply to %s: %s", self.client, err)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.listener.sessions.pop(self.key, None)
        self.listener.stats.active -= 1
        self.listener.engine.remove(self.fd)
        self.sock.close()


class UDPListener(_Listener):
    def __init__(
        self, engine: ProxyEngine, sock: socket.socket, balancer: Balancer, *, timeout: float
    ) -> None:
        super().__init__(engine, sock, balancer)
        if self.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
        self.timeout = max(0.01, timeout)
        self.sessions: dict[tuple[Any, bytes], _Session] = {}
        self._sweeping = False

    def on_event(self, fd: int, ev: int) -> None:
        for _ in range(64):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(_UDP_MAX, _ANCILLARY)
            except BlockingIOError:
                return
            except OSError as err:  # e.g. ECONNREFUSED left by an ICMP error: not fatal
                log.debug("userspace proxy: UDP port %d: %s", self.port, err)
                continue
            key = (addr, _pktinfo_local(self.family, anc))
            session = self.sessions.get(key)
            if session is None:
                session = self._open(key)
                if session is None:
                    continue
            session.last = time.monotonic()
            try:
                session.sock.send(data)
            except BlockingIOError:
                pass
            except OSError as err:
                log.debug("userspace proxy: UDP to %s: %s", session.endpoint, err)
                session.close()

    def _open(self, key: tuple[Any, bytes]) -> _Session | None:
        client_ip = str(key[0][0])
        endpoint = self.balancer_for(client_ip).pick(client_ip)
        if endpoint is None:
            self.stats.no_endpoint += 1
            return None
        ip, port = split_hostport(endpoint)
        sock = socket.socket(
            _family_of(ip), socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            sock.connect((ip, port))
        except OSError as err:
            sock.close()
            self.stats.connect_failures += 1
            log.debug("userspace proxy: UDP connect to %s: %s", endpoint, err)
            return None
        session = _Session(self, key, sock, endpoint)
        self.sessions[key] = session
        self.stats.accepted += 1
        self.stats.active += 1
        self.stats.per_endpoint[endpoint] = self.stats.per_endpoint.get(endpoint, 0) + 1
        self.engine.add(session.fd, IN, session)
        if not self._sweeping:
            self._sweeping = True
            self.engine.later(self.timeout / 2, self._sweep)
        return session

    def _sweep(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if now - session.last >= self.timeout:
                session.close()
        if self.sessions and not self.closed:
            self.engine.later(self.timeout / 2, self._sweep)
        else:
            self._sweeping = False

    def close(self) -> None:
        """Stop taking new datagrams; live sessions stay until they idle out (their replies
        still leave through this socket while it is open, so close them too)."""
        for session in list(self.sessions.values()):
            session.close()
        super().close()
