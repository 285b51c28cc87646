"""The serving engine: sockets in, answers out, from the current index and its answer cache.

One `Engine` lives in each serving process (or in the daemon itself with workers=0). Threads:

- one UDP loop per UDP socket: a non-blocking `recvfrom`/`sendto` loop that polls only when the
  socket is empty. A plain query whose (question, type) is in the answer cache is answered
  without building any object (see wire.py); everything else takes the slow path in the same
  thread, except what needs the upstream, which goes to a small thread pool so that a slow
  upstream never stalls cluster answers.
- one TCP acceptor per listener and a thread per connection (bounded), answering pipelined
  queries until the connection idles out.

Every query that is read gets an answer, whatever goes wrong while building it: an exception in
the resolver, the encoder, the forwarder or CNAME chasing is answered with SERVFAIL (the
client's id, question, RD/CD and EDNS echoed), counted (`internal_errors`) and logged once with
the query's name (`FailureLog` keeps a storm of identical failures to one line per interval).
The only silences are the deliberate ones of `parse_query` (no header, or a response).

State is one tuple `(index, cache)` swapped atomically by `apply`. The cache maps the lower-cased
question (name, type, class) to an encoded `Template`; `apply` carries it over to the new index
minus the names the model change touched, so a rollout does not cold-start the cache.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kproxy.dns.forward import Forwarder, RecursionPolicy, UpstreamError
from kproxy.dns.index import DnsIndex, IndexBuilder, ModelDelta
from kproxy.dns.options import DNSOptions
from kproxy.dns.records import CLASS_IN, REFUSED, SERVFAIL, to_text
from kproxy.dns.resolver import Answer, resolve
from kproxy.dns.wire import (
    Query,
    Template,
    encode,
    fast_reply,
    header_reply,
    opt_record,
    parse_query,
    render,
    reply_for,
)

log = logging.getLogger(__name__)

_H = struct.Struct("!H")
_QTAIL = struct.Struct("!HH")
MAX_PENDING_FORWARDS = 1024
MAX_TCP_MESSAGE = 65535
POLL_MS = 200  # TCP accept loop
RCODE_NAMES = {0: "noerror", 1: "formerr", 2: "servfail", 3: "nxdomain", 4: "notimp", 5: "refused"}


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def describe(q: Query) -> str:
    """`name. TYPE` of a query, for log lines."""
    name = to_text(q.question.name)
    return f"{name} {dns_type_name(q.question.qtype)}"


def dns_type_name(qtype: int) -> str:
    return _TYPE_NAMES.get(qtype, f"TYPE{qtype}")


_TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA"}
_TYPE_NAMES.update({33: "SRV", 35: "NAPTR", 65: "HTTPS", 64: "SVCB", 255: "ANY"})


class FailureLog:
    """Logs failures one line each, but at most one line per `interval` seconds.

    Lines that fall inside the interval are counted, and the next line says how many there
    were: an upstream outage or a bug hit by every query costs one log line per interval,
    not one per query, and none is lost from the count.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last = -interval
        self._suppressed = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        with self._lock:
            now = self._clock()
            if now - self._last < self._interval:
                self._suppressed += 1
                return
            self._last = now
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            msg += f" ({suppressed} more like this in the last {self._interval:g} s)"
        self._log.log(level, msg, *args, exc_info=exc_info)


class Engine:
    """Answers DNS on the given sockets. `apply` feeds it model deltas (one thread at a time)."""

    def __init__(
        self,
        options: DNSOptions,
        *,
        udp: Sequence[socket.socket],
        tcp: Sequence[socket.socket],
        upstreams: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.options = options
        self.builder = IndexBuilder(
            zone=options.zone,
            ttl=options.ttl,
            pods_mode=options.pods_mode,
            ns_addresses=[ip for ip, _ in options.endpoints],
        )
        self._state: tuple[DnsIndex, dict[bytes, Template]] = (self.builder.index, {})
        self._cached_types: set[int] = set()
        self.forwarder = Forwarder(
            upstreams, timeout=options.forward_timeout, cache_size=options.forward_cache_size
        )
        self.policy = RecursionPolicy(options.allow_cidrs)
        self._udp = list(udp)
        self._tcp = list(tcp)
        self._max_udp = options.max_udp_size
        self._opt = opt_record(options.max_udp_size)
        self._opt_do = opt_record(options.max_udp_size, dnssec_ok=True)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dns-forward")
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._tcp_slots = threading.BoundedSemaphore(options.max_tcp_connections)
        self._tcp_conns: set[socket.socket] = set()
        self.fast_hits = 0
        self.counters: Counter[str] = Counter()
        self._internal_log = FailureLog(log)
        self._upstream_log = FailureLog(log)

    # -- state ---------------------------------------------------------------------------
    @property
    def index(self) -> DnsIndex:
        return self._state[0]

    def apply(self, delta: ModelDelta, *, consume: bool = False) -> DnsIndex:
        """Build the next index from `delta` and swap it in with the carried-over cache
        (`consume`: see `IndexBuilder.apply`)."""
        with self._apply_lock:
            index, changed = self.builder.apply(delta, consume=consume)
            cache = self._state[1]
            if changed is None:
                fresh: dict[bytes, Template] = {}
            else:
                fresh = cache.copy()
                tails = [_QTAIL.pack(t, CLASS_IN) for t in list(self._cached_types)]
                for name in changed:
                    for tail in tails:
                        fresh.pop(name + tail, None)
            self._state = (index, fresh)
            return index

    def _cache_put(self, cache: dict[bytes, Template], q: Query, t: Template) -> None:
        if len(cache) >= self.options.answer_cache_size:
            cache.clear()
        qtype = q.question.qtype
        if qtype not in self._cached_types:
            self._cached_types.add(qtype)
        cache[q.key] = t

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        out["fast_hits"] = self.fast_hits
        out["queries"] = self.fast_hits + self.counters.get("slow_queries", 0)
        out["generation"] = self.index.generation
        out["synced"] = int(self.index.synced)
        out["answer_cache"] = len(self._state[1])
        return out

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        for s in self._udp:
            self._spawn(self._serve_udp, s, name="dns-udp")
        for s in self._tcp:
            self._spawn(self._serve_tcp, s, name="dns-tcp")

    def _spawn(
        self, target: Callable[[socket.socket], None], sock: socket.socket, *, name: str
    ) -> None:
        t = threading.Thread(target=target, args=(sock,), name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        for sock in self._udp:
            # wakes the blocked recvfrom; Linux raises ENOTCONN for an unconnected UDP
            # socket but still shuts the receive side down
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        for conn in list(self._tcp_conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- answering -----------------------------------------------------------------------
    def _limit(self, q: Query) -> int:
        if q.edns is None:
            return 512
        return min(q.edns, self._max_udp)

    def _opt_for(self, q: Query) -> bytes:
        if q.edns is None:
            return b""
        return self._opt_do if q.dnssec_ok else self._opt

    def local(self, q: Query, client: str, *, udp: bool) -> bytes | None:
        """The reply when no upstream exchange is needed; None when it is.

        Answers from the index, refusals, and upstream answers still in the forwarding cache
        are all given here, in the receiving thread.
        """
        self.counters["slow_queries"] += 1
        opt = self._opt_for(q)
        if q.edns_version:
            self.counters["badvers"] += 1
            return reply_for(q, 0, opt=opt_record(self._max_udp, ext_rcode=1))
        index, cache = self._state
        t = cache.get(q.key)
        if t is None:
            ans = resolve(q.question, index)
            if ans.forward:
                if not self.policy.allowed(client):
                    self.counters["recursion_refused"] += 1
                    return reply_for(q, REFUSED, opt=opt)
                up = self.forwarder.cached(q.key)
                if up is None:
                    return None
                self.counters["forward_cache_hits"] += 1
                body = up.body_at(self.forwarder.now())
                return self._render(up.template, q, udp=udp, opt=opt, body=body)
            t = encode(q.question, ans)
            if ans.cacheable:
                self._cache_put(cache, q, t)
        if t.chase is not None:
            return None
        return self._render(t, q, udp=udp, opt=opt)

    def _render(
        self, t: Template, q: Query, *, udp: bool, opt: bytes, body: bytes | None = None
    ) -> bytes:
        # TCP: a DNS message cannot exceed 65535 bytes (the length prefix); a headless service
        # with thousands of endpoints is cut there, with TC, like an oversized UDP answer
        limit = self._limit(q) if udp else MAX_TCP_MESSAGE
        resp = render(t, q, limit=limit, opt=opt, body=body)
        self.counters[RCODE_NAMES.get(t.rcode, "other")] += 1
        if resp[2] & 0x02:
            self.counters["truncated"] += 1
        return resp

    def remote(self, q: Query, client: str, *, udp: bool) -> bytes:
        """The reply for a question that needs the upstream (forwarding or CNAME chasing)."""
        opt = self._opt_for(q)
        index, _ = self._state
        ans = resolve(q.question, index)
        if not ans.forward:
            t = encode(q.question, ans)
            if t.chase is None:
                return self._render(t, q, udp=udp, opt=opt)
            return self._chase(ans, q, client, udp=udp, opt=opt)
        if not self.policy.allowed(client):
            self.counters["recursion_refused"] += 1
            return reply_for(q, REFUSED, opt=opt)
        self.counters["forwarded"] += 1
        try:
            up = self.forwarder.query(q.qbytes, q.key)
        except UpstreamError as exc:
            return self._upstream_failed(q, exc, opt=opt)
        return self._render(up.template, q, udp=udp, opt=opt, body=up.body_at(self.forwarder.now()))

    def _chase(self, ans: Answer, q: Query, client: str, *, udp: bool, opt: bytes) -> bytes:
        """The CNAME chain from the index, then the upstream's answer for its target.

        As CoreDNS does for an ExternalName service: the CNAME first, then the target's
        records (its own CNAMEs included), authoritative for the question's name. A client
        that may not recurse gets the CNAME alone. The upstream failing is SERVFAIL.
        """
        assert ans.chase is not None
        combined = ans
        if self.policy.allowed(client):
            self.counters["chased"] += 1
            qbytes = ans.chase + _QTAIL.pack(q.question.qtype, CLASS_IN)
            try:
                rcode, rrs = self.forwarder.lookup(qbytes, qbytes)
            except UpstreamError as exc:
                return self._upstream_failed(q, exc, opt=opt, target=ans.chase)
            combined = Answer(rcode=rcode, answer=ans.answer + tuple(rrs))
        return self._render(encode(q.question, combined), q, udp=udp, opt=opt)

    def _upstream_failed(
        self, q: Query, exc: Exception, *, opt: bytes, target: bytes | None = None
    ) -> bytes:
        self.counters["upstream_errors"] += 1
        self.counters["servfail"] += 1
        via = f" (CNAME target {to_text(target)})" if target is not None else ""
        self._upstream_log(
            logging.WARNING,
            "dns: no upstream answer for %s%s: %s; answered SERVFAIL",
            describe(q),
            via,
            exc,
        )
        return reply_for(q, SERVFAIL, opt=opt)

    def servfail(self, q: Query) -> bytes:
        """SERVFAIL for `q`: its id, question, RD/CD and (for EDNS clients) an OPT record."""
        return reply_for(q, SERVFAIL, opt=self._opt_for(q))

    def _internal_failure(self, q: Query, client: str) -> bytes:
        """Called from an `except` block: count, log once with the query's name, SERVFAIL."""
        self.counters["internal_errors"] += 1
        self.counters["servfail"] += 1
        self._internal_log(
            logging.ERROR,
            "dns: answering %s for %s failed; answered SERVFAIL",
            describe(q),
            client,
            exc_info=True,
        )
        return self.servfail(q)

    def _parse(self, data: bytes, client: str) -> Query | bytes | None:
        """`parse_query`, which never raises; should it anyway, SERVFAIL from the header."""
        try:
            return parse_query(data)
        except Exception:
            self.counters["internal_errors"] += 1
            self._internal_log(
                logging.ERROR,
                "dns: parsing a query from %s failed; answered SERVFAIL",
                client,
                exc_info=True,
            )
            if len(data) < 12 or data[2] & 0x80:
                return None
            return header_reply(data, SERVFAIL)

    def answer_local(self, data: bytes, client: str, *, udp: bool) -> Query | bytes | None:
        """The reply bytes, None for silence, or the `Query` when the upstream is needed.

        Never raises: a failure is a SERVFAIL reply.
        """
        parsed = self._parse(data, client)
        if parsed is None:
            self.counters["dropped"] += 1
            return None
        if isinstance(parsed, bytes):
            self.counters["malformed"] += 1
            return parsed
        try:
            resp = self.local(parsed, client, udp=udp)
        except Exception:
            return self._internal_failure(parsed, client)
        return parsed if resp is None else resp

    def answer_remote(self, q: Query, client: str, *, udp: bool) -> bytes:
        """`remote`, with any failure answered by SERVFAIL. Never raises."""
        try:
            return self.remote(q, client, udp=udp)
        except Exception:
            return self._internal_failure(q, client)

    def handle(self, data: bytes, client: str, *, udp: bool) -> bytes | None:
        """The complete (blocking) answer to one message; None to stay silent. Never raises."""
        resp = self.answer_local(data, client, udp=udp)
        if isinstance(resp, Query):
            return self.answer_remote(resp, client, udp=udp)
        return resp

    # -- UDP -------------------------------------------------------------------------------
    def _serve_udp(self, sock: socket.socket) -> None:
        # A plain blocking loop: one syscall per query under load and no polling when idle.
        # stop() wakes it with shutdown(SHUT_RD), which makes recvfrom return b"".
        sock.setblocking(True)
        recvfrom = sock.recvfrom
        sendto = sock.sendto
        stop = self._stop
        opt_plain, opt_do, max_udp = self._opt, self._opt_do, self._max_udp
        while True:
            try:
                data, addr = recvfrom(65535)
            except OSError:
                if stop.is_set():
                    return
                continue  # e.g. an ICMP error queued on the socket
            if not data:
                if stop.is_set():
                    return
                continue
            try:
                resp = fast_reply(data, self._state[1], opt_plain, opt_do, max_udp)
            except Exception:  # the slow path answers it (and reports any failure)
                resp = None
            try:
                if resp is not None:
                    sendto(resp, addr)
                    self.fast_hits += 1
                else:
                    self._udp_slow(sock, data, addr)
            except OSError:
                self.counters["send_errors"] += 1

    def _udp_slow(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        resp = self.answer_local(data, addr[0], udp=True)
        if resp is None:
            return
        if isinstance(resp, bytes):
            sock.sendto(resp, addr)
            return
        parsed = resp
        with self._pending_lock:
            busy = self._pending >= MAX_PENDING_FORWARDS
            if not busy:
                self._pending += 1
        if busy:
            self.counters["forward_overload"] += 1
            self.counters["servfail"] += 1
            sock.sendto(self.servfail(parsed), addr)
            return
        try:
            self._pool.submit(self._udp_remote, sock, parsed, addr)
        except RuntimeError:  # pool shut down: we are stopping
            with self._pending_lock:
                self._pending -= 1

    def _udp_remote(self, sock: socket.socket, q: Query, addr: tuple[str, int]) -> None:
        try:
            sock.sendto(self.answer_remote(q, addr[0], udp=True), addr)
        except OSError:
            self.counters["send_errors"] += 1
        finally:
            with self._pending_lock:
                self._pending -= 1

    # -- TCP -------------------------------------------------------------------------------
    def _serve_tcp(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(POLL_MS):
                continue
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another worker process took it
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            if not self._tcp_slots.acquire(blocking=False):
                self.counters["tcp_rejected"] += 1
                conn.close()
                continue
            threading.Thread(
                target=self._tcp_conn, args=(conn, addr), name="dns-tcp-conn", daemon=True
            ).start()

    def _tcp_conn(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        self._tcp_conns.add(conn)
        try:
            conn.setblocking(True)
            conn.settimeout(self.options.tcp_idle_timeout)
            while not self._stop.is_set():
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                data = _recv_exact(conn, (head[0] << 8) | head[1])
                if data is None:
                    return
                self.counters["tcp_queries"] += 1
                resp = self.handle(data, addr[0], udp=False)
                if resp is None:
                    return
                conn.sendall(_H.pack(len(resp)) + resp)
        except (OSError, ValueError):
            return
        finally:
            self._tcp_conns.discard(conn)
            conn.close()
            self._tcp_slots.release()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
