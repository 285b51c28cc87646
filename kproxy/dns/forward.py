"""Upstream forwarding for names outside the cluster zone, with a small TTL-respecting cache.

- Upstreams default to the nameservers of the node's resolv.conf (kproxy.dns.upstreams).
- A query goes over UDP (with EDNS, 1232-byte payload) to one upstream after another until one
  answers within the timeout; a truncated UDP answer is retried over TCP to the same upstream.
  Replies are checked (id, question) before use; anything else arriving on the socket is
  ignored until the timeout. A reply is decoded record by record and encoded again (see
  `to_upstreamed`), so the upstream's EDNS record, its compression and its record order never
  reach kproxy's templates. Any failure of one upstream (timeout, refused, garbage, a reply
  that does not decode) moves on to the next; all failing raises `UpstreamError`, which the
  engine answers with SERVFAIL.
- Answers are cached per question for their smallest TTL (negative answers: the SOA's minimum),
  capped at `max_ttl`; cached copies are served with their TTLs counted down.
- `RecursionPolicy` decides who may use any of this (the allow CIDRs); kproxy is not an open
  resolver.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kproxy.dns.records import CLASS_IN, NOERROR, NXDOMAIN, OPT, RR, SOA, soa_minimum
from kproxy.dns.wire import (
    HEADER,
    QR,
    RA,
    RD,
    TC,
    Template,
    WireError,
    decode_rr,
    make_template,
    opt_record,
    parse_message,
    reencode,
)
from kproxy.errors import SourceError

log = logging.getLogger(__name__)

_TTL = struct.Struct("!I")


class RecursionPolicy:
    """Which clients may use forwarding. Decisions are memoised per client address."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._nets = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._memo: dict[str, bool] = {}

    def allowed(self, client: str) -> bool:
        hit = self._memo.get(client)
        if hit is not None:
            return hit
        try:
            ip = ipaddress.ip_address(client.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        ok = any(ip in net for net in self._nets)
        if len(self._memo) > 65536:
            self._memo.clear()
        self._memo[client] = ok
        return ok


class UpstreamError(SourceError):
    """No upstream gave a usable answer."""


@dataclass(frozen=True, slots=True)
class Upstreamed:
    """An upstream answer, ready to be served: a template plus where its TTLs sit in the body."""

    template: Template
    ttls: tuple[tuple[int, int], ...]  # (offset in body, TTL when received)
    received: float
    expires: float
    answer: tuple[RR, ...]  # the answer section, decoded (for CNAME chasing)

    def body_at(self, now: float) -> bytes:
        """The body with every TTL reduced by the time spent in the cache."""
        age = int(now - self.received)
        if age <= 0 or not self.ttls:
            return self.template.body
        buf = bytearray(self.template.body)
        for off, ttl in self.ttls:
            _TTL.pack_into(buf, off, max(0, ttl - age))
        return bytes(buf)


def _cache_ttl(records: list[tuple[int, RR]], rcode: int) -> int:
    answers = [rr for section, rr in records if section == 0]
    if rcode == NOERROR and answers:
        return min(rr.ttl for rr in answers)
    if rcode in (NOERROR, NXDOMAIN):
        for section, rr in records:
            if section == 1 and rr.rtype == SOA:
                return min(rr.ttl, soa_minimum(rr))
    return 0


def to_upstreamed(msg: bytes, qlen: int, *, now: float, max_ttl: int) -> Upstreamed:
    """Turn an upstream reply into a servable `Upstreamed` (OPT removed, AA and TC cleared).

    The reply is decoded record by record (every compressed name expanded) and encoded again:
    the upstream's OPT record goes wherever it was, the counts match what is kept, and the
    body's compression pointers are kproxy's own. Anything that does not decode is a
    `WireError`, whatever the defect.
    """
    try:
        return _to_upstreamed(bytes(msg), qlen, now=now, max_ttl=max_ttl)
    except WireError:
        raise
    except (ValueError, IndexError, struct.error) as exc:
        raise WireError(f"malformed reply: {exc}") from exc


def _to_upstreamed(msg: bytes, qlen: int, *, now: float, max_ttl: int) -> Upstreamed:
    parsed = parse_message(msg)
    if parsed.qend != 12 + qlen:
        raise WireError("unexpected question section")
    rcode = parsed.flags & 0xF
    kept: list[tuple[int, RR]] = []
    for r in parsed.records:
        if r.rtype == OPT:
            if r.ttl >> 24:  # an extended rcode (BADVERS, BADCOOKIE...): not an answer
                raise WireError(f"extended rcode {(r.ttl >> 24) << 4 | rcode}")
            continue
        if r.rclass != CLASS_IN:
            continue
        kept.append((r.section, decode_rr(msg, r)))
    counts = [0, 0, 0]
    for section, _ in kept:
        counts[section] += 1
    question = msg[12 : parsed.qend]
    lowered = question[:-4].lower() + question[-4:]
    out = reencode(lowered[:-4], qlen, kept)
    flags = QR | RA | rcode | (parsed.flags & 0x0020)  # keep AD, drop AA and TC
    ttl = min(_cache_ttl(kept, rcode), max_ttl)
    template = make_template(
        question=lowered,
        flags=flags,
        an=counts[0],
        ns=counts[1],
        ar=counts[2],
        body=out.body,
        ends=out.ends,
    )
    return Upstreamed(
        template=template,
        ttls=tuple(zip(out.ttl_offsets, (rr.ttl for _, rr in kept), strict=True)),
        received=now,
        expires=now + ttl,
        answer=tuple(rr for section, rr in kept if section == 0),
    )


class Forwarder:
    """Asks the upstreams and caches their answers. Thread-safe."""

    def __init__(
        self,
        upstreams: Iterable[tuple[str, int]],
        *,
        timeout: float = 2.0,
        cache_size: int = 10_000,
        max_ttl: int = 300,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstreams = tuple(upstreams)
        self.timeout = timeout
        self.cache_size = cache_size
        self.max_ttl = max_ttl
        self._clock = clock
        self._cache: dict[bytes, Upstreamed] = {}
        self._lock = threading.Lock()
        self._next = 0

    def now(self) -> float:
        """The forwarder's clock (cache ages are measured with it)."""
        return self._clock()

    # -- cache ---------------------------------------------------------------------------
    def cached(self, key: bytes) -> Upstreamed | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        if hit.expires <= self._clock():
            with self._lock:
                self._cache.pop(key, None)
            return None
        return hit

    def _store(self, key: bytes, up: Upstreamed) -> None:
        if up.expires <= up.received:
            return
        with self._lock:
            if len(self._cache) >= self.cache_size:
                now = self._clock()
                for k in [k for k, v in self._cache.items() if v.expires <= now]:
                    del self._cache[k]
                while len(self._cache) >= self.cache_size:
                    del self._cache[next(iter(self._cache))]
            self._cache[key] = up

    # -- asking ---------------------------------------------------------------------------
    def query(self, qbytes: bytes, key: bytes) -> Upstreamed:
        """The (possibly cached) upstream answer to question section `qbytes`."""
        hit = self.cached(key)
        if hit is not None:
            return hit
        if not self.upstreams:
            raise UpstreamError("no upstream servers configured")
        errors = []
        n = len(self.upstreams)
        start = self._next
        for i in range(n):
            upstream = self.upstreams[(start + i) % n]
            try:
                msg = self._exchange(upstream, qbytes)
                up = to_upstreamed(msg, len(qbytes), now=self._clock(), max_ttl=self.max_ttl)
            except Exception as exc:  # any defect of one upstream's reply: try the next
                errors.append(f"{upstream[0]}:{upstream[1]}: {exc or type(exc).__name__}")
                continue
            self._next = (start + i) % n
            self._store(key, up)
            return up
        raise UpstreamError("; ".join(errors))

    def lookup(self, qbytes: bytes, key: bytes) -> tuple[int, list[RR]]:
        """(rcode, answer RRs) for a question, for CNAME chasing."""
        up = self.query(qbytes, key)
        age = int(self._clock() - up.received)
        rrs = [rr._replace(ttl=max(0, rr.ttl - age)) for rr in up.answer]
        return up.template.rcode, rrs

    def _exchange(self, upstream: tuple[str, int], qbytes: bytes) -> bytes:
        # os.urandom, as secrets does: importing secrets (hashlib, OpenSSL) costs ~4 MB
        qid = int.from_bytes(os.urandom(2), "big")
        query = HEADER.pack(qid, RD, 1, 0, 0, 1) + qbytes + opt_record(1232)
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        deadline = time.monotonic() + self.timeout
        ignored = 0
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(upstream)
            s.send(query)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    extra = f" ({ignored} replies that did not match the query)" if ignored else ""
                    raise TimeoutError(f"timed out{extra}")
                s.settimeout(left)
                try:
                    reply = s.recv(65535)
                except TimeoutError:
                    continue
                if self._matches(reply, qid, qbytes):
                    break
                ignored += 1
        if reply[2] & (TC >> 8):
            reply = self._exchange_tcp(upstream, qid, query, qbytes, deadline)
        return reply

    def _exchange_tcp(
        self, upstream: tuple[str, int], qid: int, query: bytes, qbytes: bytes, deadline: float
    ) -> bytes:
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.connect(upstream)
            s.sendall(struct.pack("!H", len(query)) + query)
            size = struct.unpack("!H", _recv_exact(s, 2, deadline))[0]
            reply = _recv_exact(s, size, deadline)
        if not self._matches(reply, qid, qbytes):
            raise WireError("TCP reply does not match the query")
        return reply

    @staticmethod
    def _matches(reply: bytes, qid: int, qbytes: bytes) -> bool:
        if len(reply) < 12 + len(qbytes) or not reply[2] & 0x80:
            return False
        if (reply[0] << 8 | reply[1]) != qid:
            return False
        head = reply[4:6]
        if head != b"\x00\x01":
            return False
        got = reply[12 : 12 + len(qbytes)]
        return got[:-4].lower() == qbytes[:-4].lower() and got[-4:] == qbytes[-4:]


def _recv_exact(s: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        s.settimeout(left)
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)
