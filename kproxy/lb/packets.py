"""ARP (RFC 826) and IPv6 Neighbor Discovery (RFC 4861) frames, built and parsed as bytes.

Only what a layer-2 announcer needs: parse a request for an address (ARP request, Neighbor
Solicitation), build the reply (ARP reply, solicited Neighbor Advertisement) and the takeover
announcement (gratuitous ARP request, unsolicited Neighbor Advertisement with Override).
Frames are whole Ethernet frames; MACs are 6 bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
ALL_NODES_MAC = bytes.fromhex("333300000001")
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ICMPV6 = 58
NS, NA = 135, 136
OPT_SOURCE_LL, OPT_TARGET_LL = 1, 2
NA_SOLICITED, NA_OVERRIDE = 0x40000000, 0x20000000


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def _eth(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + struct.pack("!H", ethertype)


# -- ARP -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ArpPacket:
    op: int  # 1 request, 2 reply
    sender_mac: bytes
    sender_ip: str
    target_mac: bytes
    target_ip: str
    eth_src: bytes = b""


def parse_arp(frame: bytes) -> ArpPacket | None:
    """An Ethernet/IPv4 ARP packet, or None."""
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        return None
    body = frame[22:42]
    return ArpPacket(
        op=op,
        sender_mac=body[0:6],
        sender_ip=str(ipaddress.IPv4Address(body[6:10])),
        target_mac=body[10:16],
        target_ip=str(ipaddress.IPv4Address(body[16:20])),
        eth_src=frame[6:12],
    )


def build_arp(
    *, op: int, eth_dst: bytes, sender_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str
) -> bytes:
    return (
        _eth(eth_dst, sender_mac, ETH_P_ARP)
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
        + sender_mac
        + ipaddress.IPv4Address(sender_ip).packed
        + target_mac
        + ipaddress.IPv4Address(target_ip).packed
    )


def arp_reply(request: ArpPacket, mac: bytes) -> bytes:
    """Our answer to `request`: `request.target_ip` is at `mac`."""
    return build_arp(
        op=2,
        eth_dst=request.sender_mac,
        sender_mac=mac,
        sender_ip=request.target_ip,
        target_mac=request.sender_mac,
        target_ip=request.sender_ip,
    )


def gratuitous_arp(ip: str, mac: bytes) -> bytes:
    """A broadcast ARP request for `ip` from `ip` (what Linux and MetalLB send on takeover;
    neighbours with an entry for `ip` update it)."""
    return build_arp(
        op=1, eth_dst=BROADCAST, sender_mac=mac, sender_ip=ip, target_mac=b"\x00" * 6, target_ip=ip
    )


# -- NDP -------------------------------------------------------------------------------------
def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmpv6(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, payload: bytes) -> bytes:
    pseudo = src.packed + dst.packed + struct.pack("!IxxxB", len(payload), ICMPV6)
    csum = _checksum(pseudo + payload)
    return payload[:2] + struct.pack("!H", csum) + payload[4:]


def _ipv6(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, icmp: bytes) -> bytes:
    header = struct.pack("!IHBB", 6 << 28, len(icmp), ICMPV6, 255) + src.packed + dst.packed
    return header + _icmpv6(src, dst, icmp)


def solicited_node(ip: str) -> tuple[str, bytes]:
    """The solicited-node multicast address of `ip` and its Ethernet MAC."""
    low = ipaddress.IPv6Address(ip).packed[-3:]
    group = ipaddress.IPv6Address(bytes.fromhex("ff02" + "00" * 9 + "01ff") + low)
    return str(group), b"\x33\x33\xff" + low


@dataclass(frozen=True, slots=True)
class Solicitation:
    src_ip: str
    dst_ip: str
    target: str
    src_mac: bytes  # the Ethernet source
    source_ll: bytes | None  # the Source Link-Layer Address option, when present


def parse_ns(frame: bytes) -> Solicitation | None:
    """A Neighbor Solicitation (no extension headers, hop limit 255), or None."""
    if len(frame) < 14 + 40 + 24 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IPV6:
        return None
    ip6 = frame[14:54]
    if ip6[6] != ICMPV6 or ip6[7] != 255:
        return None
    icmp = frame[54 : 54 + struct.unpack("!H", ip6[4:6])[0]]
    if len(icmp) < 24 or icmp[0] != NS or icmp[1] != 0:
        return None
    src = ipaddress.IPv6Address(ip6[8:24])
    dst = ipaddress.IPv6Address(ip6[24:40])
    if _icmpv6(src, dst, icmp[:2] + b"\x00\x00" + icmp[4:]) != icmp:
        return None  # bad checksum
    source_ll = None
    opts = icmp[24:]
    while len(opts) >= 8:
        kind, length = opts[0], opts[1] * 8
        if length == 0:
            return None
        if kind == OPT_SOURCE_LL and length >= 8:
            source_ll = opts[2:8]
        opts = opts[length:]
    return Solicitation(
        src_ip=str(src),
        dst_ip=str(dst),
        target=str(ipaddress.IPv6Address(icmp[8:24])),
        src_mac=frame[6:12],
        source_ll=source_ll,
    )


def build_na(
    *,
    eth_dst: bytes,
    mac: bytes,
    target: str,
    dst_ip: str,
    solicited: bool,
) -> bytes:
    """A Neighbor Advertisement for `target` at `mac` with Override set; sent from `target`."""
    flags = NA_OVERRIDE | (NA_SOLICITED if solicited else 0)
    tgt = ipaddress.IPv6Address(target)
    icmp = (
        struct.pack("!BBHI", NA, 0, 0, flags)
        + tgt.packed
        + struct.pack("!BB", OPT_TARGET_LL, 1)
        + mac
    )
    return _eth(eth_dst, mac, ETH_P_IPV6) + _ipv6(tgt, ipaddress.IPv6Address(dst_ip), icmp)


def na_reply(ns: Solicitation, mac: bytes) -> bytes:
    """The solicited answer (to the solicitor; to all nodes when it has no address yet)."""
    if ns.src_ip == "::":
        return build_na(
            eth_dst=ALL_NODES_MAC, mac=mac, target=ns.target, dst_ip=str(ALL_NODES), solicited=False
        )
    return build_na(
        eth_dst=ns.source_ll or ns.src_mac,
        mac=mac,
        target=ns.target,
        dst_ip=ns.src_ip,
        solicited=True,
    )


def unsolicited_na(ip: str, mac: bytes) -> bytes:
    return build_na(
        eth_dst=ALL_NODES_MAC, mac=mac, target=ip, dst_ip=str(ALL_NODES), solicited=False
    )


def build_ns(*, src_mac: bytes, src_ip: str, target: str) -> bytes:
    """A Neighbor Solicitation for `target` to its solicited-node group (for tests and probes)."""
    group, group_mac = solicited_node(target)
    icmp = (
        struct.pack("!BBHI", NS, 0, 0, 0)
        + ipaddress.IPv6Address(target).packed
        + struct.pack("!BB", OPT_SOURCE_LL, 1)
        + src_mac
    )
    return _eth(group_mac, src_mac, ETH_P_IPV6) + _ipv6(
        ipaddress.IPv6Address(src_ip), ipaddress.IPv6Address(group), icmp
    )


def parse_na(frame: bytes) -> tuple[str, bytes, bool] | None:
    """(target, link-layer address, solicited) of a Neighbor Advertisement, or None."""
    if len(frame) < 14 + 40 + 24 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IPV6:
        return None
    ip6 = frame[14:54]
    if ip6[6] != ICMPV6:
        return None
    icmp = frame[54 : 54 + struct.unpack("!H", ip6[4:6])[0]]
    if len(icmp) < 24 or icmp[0] != NA:
        return None
    flags = struct.unpack("!I", icmp[4:8])[0]
    ll = frame[6:12]
    opts = icmp[24:]
    while len(opts) >= 8 and opts[1]:
        if opts[0] == OPT_TARGET_LL:
            ll = opts[2:8]
        opts = opts[opts[1] * 8 :]
    target = str(ipaddress.IPv6Address(icmp[8:24]))
    return target, ll, bool(flags & NA_SOLICITED)
