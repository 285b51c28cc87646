"""DNS names and resource records as the index stores them: wire bytes, not objects.

Names are kept in uncompressed wire form, lower-cased (`b"\\x03web\\x07default\\x03svc..."`), so the
index, the resolver and the encoder all compare and hash the same bytes the packets carry. A record
is an `RR` tuple whose rdata is already encoded; names inside rdata are uncompressed (always legal,
and mandatory for SRV targets per RFC 2782). Keeping records as small tuples rather than library
objects is what lets 10k services fit in a few tens of MB and an answer be encoded in microseconds.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from kproxy.errors import InputError

# record types and classes (RFC 1035, 3596, 2782, 6891)
A = 1
NS = 2
CNAME = 5
SOA = 6
PTR = 12
MX = 15
TXT = 16
AAAA = 28
SRV = 33
OPT = 41
IXFR = 251
AXFR = 252
ANY = 255
CLASS_IN = 1

# rcodes
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5

DNS_SCHEMA_VERSION = "1.1.0"

# types whose rdata starts with (or, for SRV, ends with) a single domain name: the encoder registers
# that name for compression of later owner names. Value: offset of the name inside the rdata.
RDATA_NAME_OFFSET = {CNAME: 0, PTR: 0, NS: 0, SRV: 6}


class RR(NamedTuple):
    """One resource record: owner name (wire, lower case), type, TTL and encoded rdata."""

    owner: bytes
    rtype: int
    ttl: int
    rdata: bytes


class BadName(InputError):
    """A text name that cannot be a DNS name (empty label, label > 63, name > 255, non-ASCII)."""


def to_wire(name: str) -> bytes:
    """Lower-case uncompressed wire form of a text name ("a.b." and "a.b" are the same name)."""
    text = name.strip().rstrip(".").lower()
    if not text:
        return b"\x00"
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise BadName(f"non-ASCII name {name!r}") from exc
    out = bytearray()
    for label in raw.split(b"."):
        if not label or len(label) > 63:
            raise BadName(f"bad label in {name!r}")
        out.append(len(label))
        out += label
    out.append(0)
    if len(out) > 255:
        raise BadName(f"name too long: {name!r}")
    return bytes(out)


def labels_to_wire(labels: tuple[bytes, ...] | list[bytes]) -> bytes:
    return b"".join(bytes((len(lb),)) + lb for lb in labels) + b"\x00"


def wire_labels(wire: bytes) -> tuple[bytes, ...]:
    """Labels of an uncompressed wire name (without the root)."""
    out: list[bytes] = []
    i = 0
    while True:
        n = wire[i]
        if n == 0:
            return tuple(out)
        out.append(wire[i + 1 : i + 1 + n])
        i += 1 + n


def to_text(wire: bytes) -> str:
    """Presentation form with a trailing dot (labels are assumed printable, as the index's are)."""
    labels = wire_labels(wire)
    return ".".join(lb.decode("ascii", "backslashreplace") for lb in labels) + "."


def parent(wire: bytes) -> bytes:
    """The wire name one label up (the root's parent is the root)."""
    return wire[wire[0] + 1 :] if wire[0] else wire


def is_subdomain(wire: bytes, zone: bytes) -> bool:
    """True when `wire` is `zone` or below it, on label boundaries."""
    if len(wire) < len(zone) or not wire.endswith(zone):
        return False
    cut = len(wire) - len(zone)
    i = 0
    while i < cut:
        i += wire[i] + 1
    return i == cut


_IN_ADDR = b"\x07in-addr\x04arpa\x00"
_IP6 = b"\x03ip6\x04arpa\x00"
_NIBBLE = [bytes((1,)) + b"%x" % i for i in range(16)]
_OCTET = [bytes((len(str(i)),)) + str(i).encode() for i in range(256)]


def pack_ip(address: str) -> bytes:
    """The 4 or 16 bytes of an IP address (ValueError when it is not one)."""
    try:
        if ":" in address:
            return socket.inet_pton(socket.AF_INET6, address)
        return socket.inet_pton(socket.AF_INET, address)
    except OSError as exc:
        raise ValueError(f"not an IP address: {address!r}") from exc


def reverse_wire(address: str) -> bytes:
    """The in-addr.arpa / full-nibble ip6.arpa name of an IP address."""
    return reverse_packed(pack_ip(address))


def reverse_packed(packed: bytes) -> bytes:
    """The in-addr.arpa / full-nibble ip6.arpa name of a packed address (4 or 16 bytes)."""
    if len(packed) == 4:
        return b"".join(_OCTET[b] for b in reversed(packed)) + _IN_ADDR
    return b"".join(_NIBBLE[b & 0xF] + _NIBBLE[b >> 4] for b in reversed(packed)) + _IP6


# -- record constructors --------------------------------------------------------------------------


def a_rr(owner: bytes, ttl: int, address: str) -> RR:
    """An A or AAAA record, by the address family."""
    packed = pack_ip(address)
    return RR(owner, A if len(packed) == 4 else AAAA, ttl, packed)


def name_rr(owner: bytes, rtype: int, ttl: int, target: bytes) -> RR:
    """CNAME, PTR or NS record pointing at wire name `target`."""
    return RR(owner, rtype, ttl, target)


def srv_rr(owner: bytes, ttl: int, *, priority: int, weight: int, port: int, target: bytes) -> RR:
    return RR(owner, SRV, ttl, struct.pack("!HHH", priority, weight, port) + target)


def txt_rr(owner: bytes, ttl: int, *texts: str) -> RR:
    data = b""
    for text in texts:
        raw = text.encode()
        for i in range(0, max(len(raw), 1), 255):
            chunk = raw[i : i + 255]
            data += bytes((len(chunk),)) + chunk
    return RR(owner, TXT, ttl, data)


def soa_rr(
    owner: bytes,
    ttl: int,
    *,
    mname: bytes,
    rname: bytes,
    serial: int,
    refresh: int = 7200,
    retry: int = 1800,
    expire: int = 86400,
    minimum: int,
) -> RR:
    tail = struct.pack("!IIIII", serial & 0xFFFFFFFF, refresh, retry, expire, minimum)
    return RR(owner, SOA, ttl, mname + rname + tail)


def soa_minimum(rr: RR) -> int:
    return int(struct.unpack_from("!I", rr.rdata, len(rr.rdata) - 4)[0])
