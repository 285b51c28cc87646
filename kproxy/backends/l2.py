"""The layer-2 responder: answers ARP requests and Neighbor Solicitations for the addresses this
node announces, from raw AF_PACKET sockets, and announces takeovers.

One daemon thread serves every socket (`select`); `announce()` replaces the set of addresses
(address -> interface) at once. Frames are built and parsed by kproxy.lb.packets.
- ARP: one socket per interface bound to ETH_P_ARP; a request whose target is announced on that
  interface gets a reply from the interface's MAC. The kernel never answers these itself: the
  addresses are on no interface (iptables mode) or on kube-ipvs0 with strict ARP (IPVS mode).
- NDP: one socket per interface bound to ETH_P_IPV6 with a classic BPF filter that passes only
  ICMPv6 Neighbor Solicitations, and a multicast membership for each announced address's
  solicited-node group (so real NICs pass those frames up).
- Takeover: a newly announced address is announced three times, 1 s apart (gratuitous ARP /
  unsolicited NA with Override), as MetalLB does for a few seconds; neighbours holding the old
  owner's MAC switch at once.
- Stopping (`close`) just stops answering: the next owner announces itself.
Frames the socket sees going out (our own) are ignored.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kproxy.lb import packets as P

log = logging.getLogger("kproxy.lb")

SO_ATTACH_FILTER = 26
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_DROP_MEMBERSHIP = 2
PACKET_MR_MULTICAST = 0
PACKET_OUTGOING = 4
ANNOUNCE_TIMES = 3
ANNOUNCE_GAP = 1.0
SKIP_INTERFACES = ("lo", "kube-ipvs0")


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


# ldb [20] (IPv6 next header); jeq 58; ldb [54] (ICMPv6 type); jeq 135; ret all / ret 0
_NS_FILTER = (
    (0x30, 0, 0, 20),
    (0x15, 0, 3, P.ICMPV6),
    (0x30, 0, 0, 54),
    (0x15, 0, 1, P.NS),
    (0x06, 0, 0, 0x40000),
    (0x06, 0, 0, 0),
)


def _attach_ns_filter(sock: socket.socket) -> None:
    insns = (_SockFilter * len(_NS_FILTER))(*(_SockFilter(*i) for i in _NS_FILTER))
    prog = _SockFprog(len(_NS_FILTER), insns)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(prog))


def _mreq(ifindex: int, mac: bytes) -> bytes:
    return struct.pack("iHH8s", ifindex, PACKET_MR_MULTICAST, 6, mac)


def interface_map() -> dict[str, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    """{interface name: its addresses with prefixes}, from netlink."""
    from pyroute2.iproute import IPRoute

    out: dict[str, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            name = names.get(msg["index"])
            if addr and name:
                out.setdefault(name, []).append(
                    ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}")
                )
    return out


def interface_for(
    ip: str, interfaces: Mapping[str, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]]
) -> str | None:
    """The interface facing `ip`'s subnet: the one with the longest prefix containing it."""
    addr = ipaddress.ip_address(ip)
    best: tuple[int, str] | None = None
    for name, ifaddrs in interfaces.items():
        if name in SKIP_INTERFACES:
            continue
        for ifa in ifaddrs:
            net = ifa.network
            if net.version != addr.version or net.prefixlen == net.max_prefixlen:
                continue
            if addr.version == 6 and ifa.ip.is_link_local:
                continue
            if addr in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, name)
    return best[1] if best else None


@dataclass
class _Port:
    """The sockets of one interface."""

    name: str
    index: int
    mac: bytes
    arp: socket.socket
    nd: socket.socket | None = None
    groups: set[bytes] = field(default_factory=set)

    def close(self) -> None:
        self.arp.close()
        if self.nd is not None:
            self.nd.close()


class L2Responder:
    """See the module docstring. `on_reply(family)` and `on_announce(ip)` feed metrics."""

    def __init__(
        self,
        *,
        on_reply: Callable[[int], None] = lambda family: None,
        on_announce: Callable[[str], None] = lambda ip: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_reply = on_reply
        self._on_announce = on_announce
        self._clock = clock
        self._lock = threading.Lock()
        self._wanted: dict[str, str] = {}  # ip -> interface
        self._ports: dict[str, _Port] = {}
        self._pending: list[tuple[float, str, int]] = []  # (due, ip, times left)
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kproxy-l2", daemon=True)
        self._thread.start()

    @property
    def announced(self) -> dict[str, str]:
        with self._lock:
            return dict(self._wanted)

    def announce(self, wanted: Mapping[str, str]) -> None:
        """Answer for exactly these addresses (ip -> interface) from now on."""
        with self._lock:
            new = {ip: iface for ip, iface in wanted.items() if self._wanted.get(ip) != iface}
            self._wanted = dict(wanted)
            for iface in set(wanted.values()):
                if iface not in self._ports:
                    try:
                        self._ports[iface] = self._open(iface)
                    except OSError as err:
                        log.error("cannot listen for ARP/NDP on %s: %s", iface, err)
            for name in list(self._ports):
                if name not in set(wanted.values()):
                    self._ports.pop(name).close()
            self._sync_groups()
            now = self._clock()
            self._pending = [p for p in self._pending if p[1] in self._wanted]
            self._pending += [(now, ip, ANNOUNCE_TIMES) for ip in sorted(new)]
        self._wake_w.send(b"x")

    def close(self) -> None:
        """Stop answering (hand-off: the next owner announces itself)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(2.0)
        with self._lock:
            for port in self._ports.values():
                port.close()
            self._ports.clear()
            self._wanted.clear()
        self._wake_r.close()
        self._wake_w.close()

    # -- sockets ---------------------------------------------------------------------------
    def _open(self, iface: str) -> _Port:
        arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(P.ETH_P_ARP))
        arp.bind((iface, P.ETH_P_ARP))
        mac = arp.getsockname()[4]
        index = socket.if_nametoindex(iface)
        port = _Port(iface, index, mac, arp)
        try:
            nd = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(P.ETH_P_IPV6))
            _attach_ns_filter(nd)
            nd.bind((iface, P.ETH_P_IPV6))
            port.nd = nd
        except OSError as err:
            log.warning("no NDP responder on %s: %s", iface, err)
        log.info("answering ARP/NDP on %s (%s)", iface, P.mac_text(mac))
        return port

    def _sync_groups(self) -> None:
        """Join each announced IPv6 address's solicited-node group on its interface."""
        for port in self._ports.values():
            if port.nd is None:
                continue
            want = {
                P.solicited_node(ip)[1]
                for ip, iface in self._wanted.items()
                if iface == port.name and ":" in ip
            }
            for mac in want - port.groups:
                with contextlib.suppress(OSError):
                    port.nd.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, _mreq(port.index, mac))
            for mac in port.groups - want:
                with contextlib.suppress(OSError):
                    port.nd.setsockopt(SOL_PACKET, PACKET_DROP_MEMBERSHIP, _mreq(port.index, mac))
            port.groups = want

    # -- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                socks: dict[socket.socket, _Port] = {}
                for port in self._ports.values():
                    socks[port.arp] = port
                    if port.nd is not None:
                        socks[port.nd] = port
                due = min((p[0] for p in self._pending), default=None)
            timeout = 1.0 if due is None else max(0.0, min(1.0, due - self._clock()))
            try:
                ready, _, _ = select.select([self._wake_r, *socks], [], [], timeout)
            except (OSError, ValueError):  # a socket closed under us by announce()
                continue
            for sock in ready:
                if sock is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                try:
                    frame, addr = sock.recvfrom(2048)
                except OSError:
                    continue
                if addr[2] == PACKET_OUTGOING:
                    continue
                try:
                    self._handle(socks[sock], sock, frame)
                except Exception:
                    log.exception("cannot answer a frame on %s", socks[sock].name)
            self._send_due()

    def _handle(self, port: _Port, sock: socket.socket, frame: bytes) -> None:
        with self._lock:
            wanted = self._wanted
        if sock is port.arp:
            req = P.parse_arp(frame)
            if req is None or req.op != 1 or wanted.get(req.target_ip) != port.name:
                return
            if req.sender_mac == port.mac or req.sender_ip == req.target_ip:
                return  # our own or someone's gratuitous announcement
            sock.send(P.arp_reply(req, port.mac))
            self._on_reply(4)
            return
        ns = P.parse_ns(frame)
        if ns is None or wanted.get(ns.target) != port.name or ns.src_mac == port.mac:
            return
        sock.send(P.na_reply(ns, port.mac))
        self._on_reply(6)

    def _send_due(self) -> None:
        now = self._clock()
        with self._lock:
            due = [p for p in self._pending if p[0] <= now]
            self._pending = [p for p in self._pending if p[0] > now]
            self._pending += [(now + ANNOUNCE_GAP, ip, left - 1) for _, ip, left in due if left > 1]
            sends = []
            for _, ip, left in due:
                port = self._ports.get(self._wanted.get(ip, ""))
                if port is None:
                    continue
                if ":" in ip:
                    if port.nd is not None:
                        sends.append((port.nd, P.unsolicited_na(ip, port.mac), ip, left))
                else:
                    sends.append((port.arp, P.gratuitous_arp(ip, port.mac), ip, left))
        for sock, frame, ip, left in sends:
            try:
                sock.send(frame)
            except OSError as err:
                log.warning("cannot announce %s: %s", ip, err)
                continue
            if left == ANNOUNCE_TIMES:
                self._on_announce(ip)
