"""DNS wire format: parse queries, encode answers once, patch them per query, truncate by hand.

The fast path never builds a message object. A plain query (one question, no compression, at most
an OPT record) is parsed with slicing; its cache key is the question section with the name
lower-cased. An answer is encoded once per (name, type) into a `Template`: everything after the
question, plus the counts and the byte offset where each record ends. Serving a cached answer
is then `id + flags + counts + the client's own question bytes + body [+ OPT]`: the client's
question is echoed byte for byte (its case included) and every compression pointer in the body
still lands right, because the question has the same length whatever its case. For the most
common query (RD set, no EDNS, lower-case question) the whole reply after the id is stored
ready-made, and the reply is one concatenation.

Truncation keeps as many whole records as fit (records only ever point backwards, so cutting
at a record boundary never leaves a dangling pointer) and sets TC when an answer or authority
record had to go; dropping only additional records does not set TC (RFC 2181 9).

Anything the fast parser does not accept goes to dnslib (`dnslib.DNSRecord.parse`), which also
handles compressed question names and extra records; what dnslib cannot parse gets FORMERR when
the header is readable, and silence otherwise.

Why encode by hand rather than with dnslib: dnslib takes 120-320 us to build an answer, this
encoder 10-30 us, and after a model change every touched name is re-encoded on its next query.
dnslib remains the parser of last resort; the tests decode every encoding with dnslib and dnspython.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from kproxy.dns.records import (
    CLASS_IN,
    FORMERR,
    NOERROR,
    NOTIMP,
    OPT,
    RDATA_NAME_OFFSET,
    RR,
    labels_to_wire,
)
from kproxy.dns.resolver import Answer, Question
from kproxy.errors import InputError

QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
CD = 0x0010
ECHO_FLAGS = RD | CD
BADVERS = 16

MIN_UDP = 512
HEADER = struct.Struct("!HHHHHH")
_H = struct.Struct("!H")
_COUNTS = struct.Struct("!HHHH")
_RRHEAD = struct.Struct("!HHIH")
_QTAIL = struct.Struct("!HH")


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query.

    qbytes: the question section exactly as the client sent it (uncompressed).
    key:    qbytes with the name lower-cased: the cache key.
    edns:   the client's UDP payload size, or None without EDNS.
    """

    id: int
    flags: int
    question: Question
    qbytes: bytes
    key: bytes
    edns: int | None = None
    edns_version: int = 0
    dnssec_ok: bool = False


class Template(NamedTuple):
    """An encoded answer (see the module docstring).

    `wire` is the whole reply after the id for the most common query (RD set, no other flag,
    no EDNS) with the question in lower case: the fast path sends `id + wire`. Every other
    shape is assembled from `flags`, the counts and `body` (what follows the question).
    A tuple of atomic values, so the garbage collector stops tracking it: a large answer cache
    costs the collector nothing.
    """

    flags: int
    an: int
    ns: int
    ar: int
    wire: bytes
    qlen: int  # length of the question section inside `wire`
    ends: tuple[int, ...]  # end offset of each record, relative to the body
    chase: bytes | None

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def body(self) -> bytes:
        return self.wire[10 + self.qlen :]


def make_template(
    *,
    flags: int,
    an: int,
    ns: int,
    ar: int,
    question: bytes,
    body: bytes,
    ends: tuple[int, ...],
    chase: bytes | None = None,
) -> Template:
    """A template; `question` is the question section (name, type, class) it answers."""
    head = _H.pack(flags | RD) + _COUNTS.pack(1, an, ns, ar)
    return Template(flags, an, ns, ar, head + question + body, len(question), ends, chase)


# -- parsing --------------------------------------------------------------------------------


def _fast_parse(data: bytes) -> Query | None:
    """Parse the common query shape; None when the packet is anything else."""
    n = len(data)
    if n < 17 or data[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return None
    arcount = (data[10] << 8) | data[11]
    if arcount > 1:
        return None
    # walk the labels: no compression, each label <= 63, name <= 255
    i = 12
    labels = []
    while True:
        if i >= n:
            return None
        ln = data[i]
        if ln == 0:
            break
        if ln > 63:
            return None
        labels.append(data[i + 1 : i + 1 + ln].lower())
        i += 1 + ln
    end = i + 1
    if end - 12 > 255 or end + 4 > n:
        return None
    qtype, qclass = _QTAIL.unpack_from(data, end)
    qbytes = data[12 : end + 4]
    name = labels_to_wire(labels)
    edns: int | None = None
    version = 0
    do = False
    pos = end + 4
    if arcount:
        # the OPT pseudo-record: root owner, type 41, class = payload size
        if pos + 11 > n or data[pos] != 0:
            return None
        rtype, size, ttl, rdlen = _RRHEAD.unpack_from(data, pos + 1)
        if rtype != OPT or pos + 11 + rdlen != n:
            return None
        edns = max(size, MIN_UDP)
        version = (ttl >> 16) & 0xFF
        do = bool(ttl & 0x8000)
    elif pos != n:
        return None
    flags = (data[2] << 8) | data[3]
    return Query(
        id=(data[0] << 8) | data[1],
        flags=flags,
        question=Question(name, qtype, qclass),
        qbytes=qbytes,
        key=name + qbytes[-4:],
        edns=edns,
        edns_version=version,
        dnssec_ok=do,
    )


def _dnslib_parse(data: bytes) -> Query | None:
    """The slow path for unusual but valid queries; None when dnslib cannot make sense of it."""
    import dnslib  # deferred: only unusual packets need it

    try:
        msg = dnslib.DNSRecord.parse(data)
    except Exception:  # dnslib raises a zoo of exception types on bad input
        return None
    if len(msg.questions) != 1:
        return None
    q = msg.questions[0]
    raw_labels = tuple(bytes(lb) for lb in q.qname.label)
    if any(not lb or len(lb) > 63 for lb in raw_labels):
        return None
    exact = labels_to_wire(raw_labels)
    if len(exact) > 255:
        return None
    name = labels_to_wire(tuple(lb.lower() for lb in raw_labels))
    qbytes = exact + _QTAIL.pack(q.qtype, q.qclass)
    opts = [rr for rr in msg.ar if rr.rtype == OPT]
    if len(opts) > 1:
        return None
    edns = None
    version = 0
    do = False
    if opts:
        edns = max(int(opts[0].rclass), MIN_UDP)
        ttl = int(opts[0].ttl)
        version = (ttl >> 16) & 0xFF
        do = bool(ttl & 0x8000)
    return Query(
        id=msg.header.id,
        flags=(data[2] << 8) | data[3],
        question=Question(name, q.qtype, q.qclass),
        qbytes=qbytes,
        key=name + qbytes[-4:],
        edns=edns,
        edns_version=version,
        dnssec_ok=do,
    )


def parse_query(data: bytes) -> Query | bytes | None:
    """A `Query`, or the bytes of an immediate error reply, or None to stay silent.

    Silence for packets too short to carry a header and for responses (QR set: answering
    them could start a loop between two servers).
    """
    if len(data) < 12 or data[2] & 0x80:
        return None
    opcode = (data[2] >> 3) & 0xF
    if opcode != 0:
        return header_reply(data, NOTIMP)
    q = _fast_parse(data) or _dnslib_parse(data)
    if q is None:
        return header_reply(data, FORMERR)
    return q


_QD1 = b"\x00\x01\x00\x00\x00\x00"
_AR0 = b"\x00\x00"
_AR1 = b"\x00\x01"
_OPT_TYPE = b"\x00\x29"
_RD_ONLY = b"\x01\x00"


def fast_reply(
    data: bytes, cache: Mapping[bytes, Template], opt_plain: bytes, opt_do: bytes, max_udp: int
) -> bytes | None:
    """The UDP reply to a plain query whose answer is cached, or None (take the slow path).

    Plain: QR=0, opcode 0, one question, no answer/authority records, and nothing or one
    well-formed EDNS version 0 OPT record after the question. The cache key is the question
    exactly as sent, so a hit proves the name parsed right (the key is a valid uncompressed
    name followed by type and class) and that the template's question is byte for byte the
    client's; questions in other cases miss here and hit the cache on the slow path. None also
    when the answer needs truncation or the upstream.
    """
    if data[4:10] != _QD1 or data[2] & 0xF8:
        return None
    qe = data.find(0, 12) + 5
    t = cache.get(data[12:qe])
    if t is None or t.chase is not None:
        return None
    n = len(data)
    if n == qe and data[10:12] == _AR0:
        if data[2:4] == _RD_ONLY:
            resp = data[:2] + t.wire
        else:
            resp = (
                data[:2] + _H.pack(t.flags | (((data[2] << 8) | data[3]) & ECHO_FLAGS)) + t.wire[2:]
            )
        return resp if len(resp) <= MIN_UDP else None
    if (
        data[10:12] == _AR1
        and n >= qe + 11
        and data[qe] == 0
        and data[qe + 1 : qe + 3] == _OPT_TYPE
        and data[qe + 6] == 0
        and n == qe + 11 + ((data[qe + 9] << 8) | data[qe + 10])
    ):
        opt = opt_do if data[qe + 7] & 0x80 else opt_plain
        size = (data[qe + 3] << 8) | data[qe + 4]
        limit = MIN_UDP if size < MIN_UDP else (size if size < max_udp else max_udp)
        w = t.wire
        resp = b"".join(
            (
                data[:2],
                _H.pack(t.flags | (((data[2] << 8) | data[3]) & ECHO_FLAGS)),
                w[2:8],
                _H.pack(t.ar + 1),
                w[10:],
                opt,
            )
        )
        return resp if len(resp) <= limit else None
    return None


def header_reply(data: bytes, rcode: int) -> bytes:
    """A header-only reply (FORMERR, NOTIMP) echoing the id, opcode and RD of `data`."""
    flags = QR | (((data[2] << 8) | data[3]) & (0x7800 | RD)) | rcode
    return HEADER.pack((data[0] << 8) | data[1], flags, 0, 0, 0, 0)


# -- encoding -------------------------------------------------------------------------------


class _Encoder:
    """Appends records to a message body, compressing owner names against earlier names."""

    def __init__(self, qname: bytes, *, base: int) -> None:
        self.out = bytearray()
        self.base = base  # message offset of out[0]
        self.names: dict[bytes, int] = {}
        self._register(qname, 12)

    def _register(self, name: bytes, offset: int, upto: int | None = None) -> None:
        """Remember where each suffix of `name` (written at `offset`) starts.

        `upto`: only the suffixes starting before this index (the rest was a pointer).
        """
        i = 0
        stop = len(name) - 1 if upto is None else upto
        while i < stop and offset + i < 0x3FFF:
            self.names.setdefault(name[i:], offset + i)
            i += name[i] + 1

    def _name(self, name: bytes) -> None:
        i = 0
        while name[i]:
            ptr = self.names.get(name[i:])
            if ptr is not None:
                start = self.base + len(self.out)
                self.out += name[:i]
                self.out += _H.pack(0xC000 | ptr)
                self._register(name, start, upto=i)
                return
            i += name[i] + 1
        start = self.base + len(self.out)
        self.out += name
        self._register(name, start)

    def record(self, rr: RR) -> int:
        """Append `rr`; returns the offset of its TTL in the body."""
        self._name(rr.owner)
        ttl_at = len(self.out) + 4
        self.out += _RRHEAD.pack(rr.rtype, CLASS_IN, rr.ttl, len(rr.rdata))
        at = RDATA_NAME_OFFSET.get(rr.rtype)
        if at is not None:
            self._register(rr.rdata[at:], self.base + len(self.out) + at)
        self.out += rr.rdata
        return ttl_at


def encode(q: Question, ans: Answer) -> Template:
    """Encode `ans` to a `Template` for questions with `q.name` (any case) and `q.qtype`."""
    enc = _Encoder(q.name, base=12 + len(q.name) + 4)
    ends = []
    for section in (ans.answer, ans.authority, ans.additional):
        for rr in section:
            enc.record(rr)
            ends.append(len(enc.out))
    flags = QR | RA | ans.rcode | (AA if ans.authoritative else 0)
    return make_template(
        question=q.name + _QTAIL.pack(q.qtype, q.qclass),
        flags=flags,
        an=len(ans.answer),
        ns=len(ans.authority),
        ar=len(ans.additional),
        body=bytes(enc.out),
        ends=tuple(ends),
        chase=ans.chase,
    )


def opt_record(size: int, *, dnssec_ok: bool = False, ext_rcode: int = 0) -> bytes:
    ttl = (ext_rcode << 24) | (0x8000 if dnssec_ok else 0)
    return b"\x00" + _RRHEAD.pack(OPT, size, ttl, 0)


def render(
    t: Template,
    q: Query,
    *,
    limit: int | None,
    opt: bytes = b"",
    body: bytes | None = None,
) -> bytes:
    """The reply to `q` from template `t`, truncated to `limit` bytes (None: no limit, TCP).

    `opt` is the OPT record to append (empty when the client sent none); `body` overrides the
    template's body (same record layout), which the forwarder uses for TTL-adjusted copies.
    """
    data = t.body if body is None else body
    flags = t.flags | (q.flags & ECHO_FLAGS)
    size = 12 + len(q.qbytes) + len(data) + len(opt)
    if limit is None or size <= limit:
        head = HEADER.pack(q.id, flags, 1, t.an, t.ns, t.ar + (1 if opt else 0))
        return head + q.qbytes + data + opt
    room = limit - 12 - len(q.qbytes) - len(opt)
    keep = 0
    for end in t.ends:
        if end > room:
            break
        keep += 1
    an = min(t.an, keep)
    ns = min(t.ns, max(0, keep - t.an))
    ar = max(0, keep - t.an - t.ns)
    if an < t.an or ns < t.ns:
        flags |= TC
    cut = t.ends[keep - 1] if keep else 0
    head = HEADER.pack(q.id, flags, 1, an, ns, ar + (1 if opt else 0))
    return head + q.qbytes + data[:cut] + opt


def reply_for(q: Query, rcode: int, *, opt: bytes = b"") -> bytes:
    """A reply with the question and no records (REFUSED, SERVFAIL, BADVERS...)."""
    flags = QR | RA | (rcode & 0xF) | (q.flags & ECHO_FLAGS)
    return HEADER.pack(q.id, flags, 1, 0, 0, 1 if opt else 0) + q.qbytes + opt


# -- reading messages from upstream --------------------------------------------------------------


class WireError(InputError):
    """A message that does not parse."""


def read_name(msg: bytes, offset: int) -> tuple[bytes, int]:
    """The uncompressed wire name at `offset` and the offset just past it in the message.

    Pointers may lead anywhere in the message (backwards, as RFC 1035 intends, or forwards, which
    some encoders do), at most 64 hops, so a pointer loop is an error, not a hang.
    """
    out = bytearray()
    end = -1
    hops = 0
    i = offset
    n = len(msg)
    while True:
        if i >= n:
            raise WireError("name runs past the message")
        ln = msg[i]
        if ln & 0xC0 == 0xC0:
            if i + 1 >= n:
                raise WireError("truncated pointer")
            if end < 0:
                end = i + 2
            hops += 1
            if hops > 64:
                raise WireError("compression loop")
            i = ((ln & 0x3F) << 8) | msg[i + 1]
            continue
        if ln & 0xC0:
            raise WireError("bad label type")
        if ln == 0:
            out.append(0)
            if len(out) > 255:
                raise WireError("name too long")
            return bytes(out), (end if end >= 0 else i + 1)
        if i + 1 + ln > n:
            raise WireError("label runs past the message")
        out += msg[i : i + 1 + ln]
        if len(out) > 255:
            raise WireError("name too long")
        i += 1 + ln


@dataclass(frozen=True, slots=True)
class ParsedRecord:
    section: int  # 0 answer, 1 authority, 2 additional
    start: int
    end: int
    rtype: int
    rclass: int
    ttl: int
    rdata_start: int


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    id: int
    flags: int
    qend: int  # offset just past the question section
    records: tuple[ParsedRecord, ...]


def parse_message(msg: bytes) -> ParsedMessage:
    """Split a message into its records (offsets only), following compression pointers.

    Every record the header counts must be there, whole: a message whose counts promise more
    than it holds is an error (WireError). Bytes after the last record are ignored.
    """
    if len(msg) < 12:
        raise WireError("short message")
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(msg, 0)
    pos = 12
    for _ in range(qd):
        _, pos = read_name(msg, pos)
        pos += 4
    if pos > len(msg):
        raise WireError("question runs past the message")
    qend = pos
    records = []
    for section, count in enumerate((an, ns, ar)):
        for _ in range(count):
            start = pos
            _, pos = read_name(msg, pos)
            if pos + 10 > len(msg):
                raise WireError("record header runs past the message")
            rtype, rclass, ttl, rdlen = _RRHEAD.unpack_from(msg, pos)
            rdata_start = pos + 10
            pos = rdata_start + rdlen
            if pos > len(msg):
                raise WireError("rdata runs past the message")
            records.append(ParsedRecord(section, start, pos, rtype, rclass, ttl, rdata_start))
    return ParsedMessage(qid, flags, qend, tuple(records))


# The rdata layout of every type whose rdata may hold compressed names (RFC 3597 section 4: the
# RFC 1035 types, plus those receivers must decompress: RP, AFSDB, RT, PX, SRV, NAPTR, KX;
# DNAME is never compressed by a correct sender, and expanding it is harmless). A positive
# number is that many fixed bytes, _NAME a domain name, _CSTR a character-string, _REST the
# remaining fixed bytes. Other types are copied as they are.
_NAME, _CSTR = -1, -2
_RDATA_LAYOUT: dict[int, tuple[int, ...]] = {
    2: (_NAME,),  # NS
    3: (_NAME,),  # MD
    4: (_NAME,),  # MF
    5: (_NAME,),  # CNAME
    6: (_NAME, _NAME, 20),  # SOA
    7: (_NAME,),  # MB
    8: (_NAME,),  # MG
    9: (_NAME,),  # MR
    12: (_NAME,),  # PTR
    14: (_NAME, _NAME),  # MINFO
    15: (2, _NAME),  # MX
    17: (_NAME, _NAME),  # RP
    18: (2, _NAME),  # AFSDB
    21: (2, _NAME),  # RT
    26: (2, _NAME, _NAME),  # PX
    33: (6, _NAME),  # SRV
    35: (4, _CSTR, _CSTR, _CSTR, _NAME),  # NAPTR
    36: (2, _NAME),  # KX
    39: (_NAME,),  # DNAME
}
_FIXED_SIZE = {1: 4, 28: 16}  # A, AAAA


def _expand_rdata(msg: bytes, rtype: int, start: int, end: int) -> bytes:
    """The rdata of a record with every name in it uncompressed."""
    layout = _RDATA_LAYOUT.get(rtype)
    if layout is None:
        size = _FIXED_SIZE.get(rtype)
        if size is not None and end - start != size:
            raise WireError(f"type {rtype} rdata of {end - start} bytes")
        return msg[start:end]
    out = bytearray()
    pos = start
    for item in layout:
        if item == _NAME:
            name, pos = read_name(msg, pos)
            out += name
        else:
            if item == _CSTR:
                if pos >= end:
                    raise WireError(f"type {rtype} rdata runs past its length")
                size = msg[pos] + 1
            else:
                size = item
            out += msg[pos : pos + size]
            pos += size
        if pos > end:
            raise WireError(f"type {rtype} rdata runs past its length")
    if pos != end:
        raise WireError(f"type {rtype} rdata longer than its fields")
    return bytes(out)


def decode_rr(msg: bytes, rec: ParsedRecord) -> RR:
    """The record as an `RR` with uncompressed names (owner lower-cased)."""
    owner, _ = read_name(msg, rec.start)
    rdata = _expand_rdata(msg, rec.rtype, rec.rdata_start, rec.end)
    return RR(owner.lower(), rec.rtype, rec.ttl, rdata)


@dataclass(frozen=True, slots=True)
class Reencoded:
    """Records encoded after a question: the body, record ends and TTL offsets (in the body)."""

    body: bytes
    ends: tuple[int, ...]
    ttl_offsets: tuple[int, ...]


def reencode(
    qname: bytes, qlen: int, records: list[tuple[int, RR]] | tuple[tuple[int, RR], ...]
) -> Reencoded:
    """Encode (section, RR) pairs, in section order, as the body after a question of `qlen` bytes.

    Used for upstream answers: whatever compression the upstream used (pointers anywhere, into
    records kproxy drops), the result only points backwards into itself or the question, so it
    can be cut at any record boundary and spliced after any spelling of the question.
    """
    enc = _Encoder(qname, base=12 + qlen)
    ends = []
    ttls = []
    for _, rr in sorted(records, key=lambda sr: sr[0]):
        ttls.append(enc.record(rr))
        ends.append(len(enc.out))
    return Reencoded(bytes(enc.out), tuple(ends), tuple(ttls))


__all__ = [
    "NOERROR",
    "ParsedMessage",
    "Query",
    "Template",
    "encode",
    "fast_reply",
    "header_reply",
    "make_template",
    "opt_record",
    "parse_message",
    "parse_query",
    "reencode",
    "render",
    "reply_for",
]
