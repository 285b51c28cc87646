"""The few rtnetlink requests kproxy makes on the node, over `netlink.NetlinkSocket`: list
addresses, look up / create / bring up / delete a link, add / delete an address.

kproxy's own code instead of pyroute2's `IPRoute` on the agent's path (iptables and nftables
modes read the node's addresses at start-up; the DNS placement puts its listen address on a
dummy interface; conntrack cleanup and ipset use the same `NetlinkSocket`): importing pyroute2's
`IPRoute` costs the agent ~5 MB of RSS for good (asyncio, its mock IPRoute with `unittest`, the
traffic-control message classes, ...), for requests this module makes in ~150 lines with the
framing in `kproxy/backends/netlink.py`. Semantics follow what kproxy used of pyroute2: errors
carry the kernel's errno (`NetlinkRequestError.code`, as pyroute2's `NetlinkError`), "add"
requests are exclusive (EEXIST when present), an address is matched on IFA_ADDRESS.
The IPVS mode's device code and the L2 announcer still use pyroute2.
"""

from __future__ import annotations

import errno as errnos
import ipaddress
import socket
import struct
from typing import NamedTuple

from kproxy.backends.netlink import (
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NetlinkRequestError,
    NetlinkSocket,
    nla,
    nla_string,
    parse_attrs,
)

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 18, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFF_UP = 0x1

IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index


class Address(NamedTuple):
    """One address of an interface (RTM_GETADDR)."""

    ifindex: int
    family: int  # 4 or 6
    address: str  # IFA_ADDRESS (the peer for point-to-point links), else IFA_LOCAL
    local: str | None  # IFA_LOCAL
    prefixlen: int


_AF = {socket.AF_INET: 4, socket.AF_INET6: 6}


def _text(af: int, raw: memoryview) -> str:
    return socket.inet_ntop(af, bytes(raw))


def addresses(nl: NetlinkSocket, index: int | None = None) -> list[Address]:
    """Every address of the namespace (of interface `index` when given)."""
    out = []
    body = IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for payload in nl.request(RTM_GETADDR, NLM_F_DUMP, body, "listing addresses"):
        family, prefixlen, _flags, _scope, ifindex = IFADDR.unpack_from(payload)
        if family not in _AF or (index is not None and ifindex != index):
            continue
        attrs = parse_attrs(payload[IFADDR.size :])
        local = attrs.get(IFA_LOCAL)
        address = attrs.get(IFA_ADDRESS, local)
        if address is None:
            continue
        out.append(
            Address(
                ifindex=ifindex,
                family=_AF[family],
                address=_text(family, address),
                local=None if local is None else _text(family, local),
                prefixlen=prefixlen,
            )
        )
    return out


def link_index(nl: NetlinkSocket, ifname: str) -> int | None:
    """The index of interface `ifname`, None when there is none."""
    body = IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + nla_string(IFLA_IFNAME, ifname)
    try:
        for payload in nl.request(RTM_GETLINK, 0, body, f"looking up {ifname}"):
            return int(IFINFO.unpack_from(payload)[2])
    except NetlinkRequestError as err:
        if err.code in (errnos.ENODEV, errnos.ENOENT):
            return None
        raise
    return None


def link_request(ifname: str, kind: str) -> bytes:
    """The body of the RTM_NEWLINK creating `ifname` of `kind` (IFLA_LINKINFO without
    NLA_F_NESTED, as pyroute2 sent it)."""
    return (
        IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        + nla_string(IFLA_IFNAME, ifname)
        + nla(IFLA_LINKINFO, nla_string(IFLA_INFO_KIND, kind))
    )


def add_link(nl: NetlinkSocket, ifname: str, kind: str) -> None:
    """Create interface `ifname` of `kind` (e.g. "dummy"); EEXIST when it exists."""
    body = link_request(ifname, kind)
    nl.call(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"creating {kind} link {ifname}")


def set_link_up(nl: NetlinkSocket, index: int) -> None:
    body = IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
    nl.call(RTM_NEWLINK, 0, body, f"bringing link {index} up")


def delete_link(nl: NetlinkSocket, index: int) -> None:
    nl.call(RTM_DELLINK, 0, IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0), f"deleting link {index}")


def address_request(index: int, address: str, prefixlen: int) -> bytes:
    ip = ipaddress.ip_address(address)
    af = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    body = IFADDR.pack(af, prefixlen, 0, 0, index) + nla(IFA_ADDRESS, ip.packed)
    if ip.version == 4:
        body += nla(IFA_LOCAL, ip.packed)  # what `ip addr add` sends for IPv4
    return body


def add_address(nl: NetlinkSocket, index: int, address: str, prefixlen: int) -> None:
    """Add `address`/`prefixlen` to interface `index`; EEXIST when it is there."""
    body = address_request(index, address, prefixlen)
    nl.call(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"adding {address}/{prefixlen}")


def delete_address(nl: NetlinkSocket, index: int, address: str, prefixlen: int) -> None:
    body = address_request(index, address, prefixlen)
    nl.call(RTM_DELADDR, 0, body, f"deleting {address}/{prefixlen}")
