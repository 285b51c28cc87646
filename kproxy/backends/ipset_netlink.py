"""ipset elements over netfilter netlink: many adds or deletes per message, and set listings.

Why not only `ipset restore`: the `ipset` tool resolves the protocol of every `ip,proto:port`
element through /etc/protocols when it parses or prints it, which costs milliseconds per element
wherever files are slow (the 9p root of the test VM: 10,000 elements took ~45 s to add and ~35 s
to list). Here an element is a few packed attributes, up to `CHUNK` of them ride in one
IPSET_CMD_ADD/DEL message (the kernel walks the IPSET_ATTR_ADT list, ip_set_core.c `ip_set_ad`),
and a listing is one dump. Sets are still created and destroyed with the tool (rare, no elements).

Elements are the text kproxy uses everywhere (and `ipset save` prints): `ip,proto:port`,
`ip,proto:port,ip2`, `ip,proto:port,net` (a host network written bare), `port`, `ip`. The set's
type (from kproxy.render.ipvs.SETS) says which. Adding without NLM_F_EXCL and deleting with the
same flags make a present add and an absent delete no-ops (the kernel's IPSET_FLAG_EXIST), as
`ipset -exist` does.
"""

from __future__ import annotations

import errno as errnos
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator

from kproxy.backends.netlink import NFGEN as _NFGEN
from kproxy.backends.netlink import (
    NLA,
    NLA_F_NESTED,
    NLA_F_NET_BYTEORDER,
    NLM_F_ACK,
    NLM_F_DUMP,
    NetlinkRequestError,
    NetlinkSocket,
    parse_attrs,
)
from kproxy.backends.netlink import nla as _nla
from kproxy.errors import DataplaneError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6

IPSET_PROTOCOL = 7
CMD_LIST = 7
CMD_ADD = 9
CMD_DEL = 10

ATTR_PROTOCOL = 1
ATTR_SETNAME = 2
ATTR_TYPENAME = 3
ATTR_FAMILY = 5
ATTR_FLAGS = 6
ATTR_DATA = 7
ATTR_ADT = 8
ATTR_LINENO = 9  # required beside IPSET_ATTR_ADT; per element, it names the one that failed
# inside IPSET_ATTR_DATA
DATA_IP = 1
DATA_CIDR = 3
DATA_PORT = 4
DATA_PROTO = 7
DATA_LINENO = 9
DATA_IP2 = 20
DATA_ELEMENTS = 24  # kernel-only, in a header listing: how many elements the set holds
DATA_CIDR2 = 21
# inside IPSET_ATTR_IP / IP2
IPADDR_IPV4 = 1
IPADDR_IPV6 = 2

FLAG_LIST_HEADER = 1 << 2  # IPSET_FLAG_LIST_HEADER: list the sets' headers, no elements
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}
CHUNK = 512  # elements per message (~40 bytes each, well inside one page-sized datagram pack)

_BE16 = struct.Struct(">H")
_U32 = struct.Struct("=I")


class IPSetNetlinkError(DataplaneError):
    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def _ip(kind: int, address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    inner = IPADDR_IPV6 if ip.version == 6 else IPADDR_IPV4
    return _nla(kind | NLA_F_NESTED, _nla(inner | NLA_F_NET_BYTEORDER, ip.packed))


def _port(value: int) -> bytes:
    return _nla(DATA_PORT | NLA_F_NET_BYTEORDER, _BE16.pack(value))


def _proto_port(text: str) -> bytes:
    proto, _, port = text.partition(":")
    return _port(int(port)) + _nla(DATA_PROTO, bytes((PROTO_NUMBERS[proto],)))


def encode_element(set_type: str, element: str, lineno: int = 0) -> bytes:
    """One IPSET_ATTR_DATA for `element` of a set of `set_type` (`lineno` numbers it in its
    message, so a failure names it)."""
    parts = element.split(",")
    if set_type == "bitmap:port":
        body = _port(int(element))
    elif set_type == "hash:ip":
        body = _ip(DATA_IP, element)
    elif set_type == "hash:ip,port":
        body = _ip(DATA_IP, parts[0]) + _proto_port(parts[1])
    elif set_type == "hash:ip,port,ip":
        body = _ip(DATA_IP, parts[0]) + _proto_port(parts[1]) + _ip(DATA_IP2, parts[2])
    elif set_type == "hash:ip,port,net":
        net = ipaddress.ip_network(parts[2], strict=False)
        body = (
            _ip(DATA_IP, parts[0])
            + _proto_port(parts[1])
            + _ip(DATA_IP2, str(net.network_address))
            + _nla(DATA_CIDR2, bytes((net.prefixlen,)))
        )
    else:
        raise ValueError(f"set type {set_type!r} is not one kproxy uses")
    if lineno:
        body += _nla(DATA_LINENO, _U32.pack(lineno))
    return _nla(ATTR_DATA | NLA_F_NESTED, body)


def _setname(name: str) -> bytes:
    return _nla(ATTR_SETNAME, name.encode() + b"\0")


def _attr_list(buf: memoryview) -> Iterator[tuple[int, memoryview]]:
    off = 0
    while off + 4 <= len(buf):
        size, kind = NLA.unpack_from(buf, off)
        if size < 4:
            break
        yield kind & 0x3FFF, buf[off + 4 : off + size]
        off += (size + 3) & ~3


def _ip_text(nested: memoryview) -> str:
    a = parse_attrs(nested)
    if IPADDR_IPV4 in a:
        return socket.inet_ntoa(a[IPADDR_IPV4])
    return str(ipaddress.IPv6Address(bytes(a[IPADDR_IPV6])))


def decode_element(set_type: str, data: memoryview) -> str:
    """The text of one listed element (inverse of `encode_element`)."""
    a = parse_attrs(data)
    if set_type == "bitmap:port":
        return str(_BE16.unpack(a[DATA_PORT][:2])[0])
    ip = _ip_text(a[DATA_IP])
    if set_type == "hash:ip":
        return ip
    proto = a[DATA_PROTO][0]
    pp = f"{PROTO_NAMES.get(proto, str(proto))}:{_BE16.unpack(a[DATA_PORT][:2])[0]}"
    if set_type == "hash:ip,port":
        return f"{ip},{pp}"
    ip2 = _ip_text(a[DATA_IP2])
    if set_type == "hash:ip,port,net":
        cidr = a[DATA_CIDR2][0] if DATA_CIDR2 in a else (128 if ":" in ip2 else 32)
        if cidr != (128 if ":" in ip2 else 32):
            ip2 = f"{ip2}/{cidr}"
    return f"{ip},{pp},{ip2}"


class IPSetSocket:
    """One netfilter netlink socket for ipset element changes and listings."""

    def __init__(self) -> None:
        self._nl = NetlinkSocket(NETLINK_NETFILTER, timeout=60.0)

    def close(self) -> None:
        self._nl.close()

    def __enter__(self) -> IPSetSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, cmd: int, family: int, flags: int, attrs: bytes) -> Iterator[memoryview]:
        """The payloads answering one ipset command (its errors as `IPSetNetlinkError`)."""
        body = _NFGEN.pack(family, 0, 0) + _nla(ATTR_PROTOCOL, bytes((IPSET_PROTOCOL,))) + attrs
        try:
            yield from self._nl.request((NFNL_SUBSYS_IPSET << 8) | cmd, flags, body)
        except NetlinkRequestError as err:
            raise IPSetNetlinkError(_describe(err.code), err.code) from None

    def change(
        self, cmd: int, name: str, set_type: str, family: int, elements: Iterable[str]
    ) -> int:
        """Add (CMD_ADD) or delete (CMD_DEL) `elements` of set `name`; returns how many."""
        af = socket.AF_INET6 if family == 6 else socket.AF_INET
        batch: list[bytes] = []
        count = 0

        def flush() -> None:
            if not batch:
                return
            attrs = (
                _setname(name)
                + _nla(ATTR_LINENO, _U32.pack(0))
                + _nla(ATTR_ADT | NLA_F_NESTED, b"".join(batch))
            )
            try:
                for _ in self._request(cmd, af, NLM_F_ACK, attrs):
                    pass
            except IPSetNetlinkError as err:
                raise IPSetNetlinkError(f"{_verb(cmd)} {name}: {err}", err.errno) from err
            batch.clear()

        for element in elements:
            batch.append(encode_element(set_type, element, len(batch) + 1))
            count += 1
            if len(batch) >= CHUNK:
                flush()
        flush()
        return count

    def list(self, name: str, set_type: str) -> set[str]:
        """The elements of set `name` (IPSetNetlinkError with errno ENOENT when it is missing)."""
        out: set[str] = set()
        for payload in self._request(CMD_LIST, socket.AF_UNSPEC, NLM_F_DUMP, _setname(name)):
            attrs = parse_attrs(payload[4:])
            adt = attrs.get(ATTR_ADT)
            if adt is None:
                continue
            for kind, data in _attr_list(adt):
                if kind == ATTR_DATA:
                    out.add(decode_element(set_type, data))
        return out

    def counts(self) -> dict[str, int | None]:
        """Set name -> how many elements it holds (None when the kernel does not say), for every
        set of the namespace: one header dump, no element listed."""
        flags = _nla(ATTR_FLAGS | NLA_F_NET_BYTEORDER, struct.pack(">I", FLAG_LIST_HEADER))
        out: dict[str, int | None] = {}
        for payload in self._request(CMD_LIST, socket.AF_UNSPEC, NLM_F_DUMP, flags):
            attrs = parse_attrs(payload[4:])
            name, data = attrs.get(ATTR_SETNAME), attrs.get(ATTR_DATA)
            if name is None:
                continue
            elements = parse_attrs(data).get(DATA_ELEMENTS) if data is not None else None
            count = struct.unpack(">I", elements)[0] if elements is not None else None
            out[bytes(name).split(b"\0", 1)[0].decode()] = count
        return out


IPSET_ERR_PRIVATE = 4096
_IPSET_ERRORS = {
    4097: "protocol error",
    4098: "cannot find the set type",
    4099: "maximum number of sets reached",
    4100: "set is busy",
    4102: "set type mismatch",
    4103: "element already exists",
    4104: "invalid CIDR",
    4106: "invalid family",
    4108: "set is referenced",
    4109: "invalid IPv4 address",
    4110: "invalid IPv6 address",
}


def _describe(code: int) -> str:
    if code == errnos.ENOENT:
        return "the set does not exist"
    if code >= IPSET_ERR_PRIVATE:
        return _IPSET_ERRORS.get(code, f"ipset error {code}")
    return os.strerror(code)


def _verb(cmd: int) -> str:
    return {CMD_ADD: "add to", CMD_DEL: "delete from"}.get(cmd, f"command {cmd} on")
