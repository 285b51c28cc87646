"""What the IPVS drift check reads (`IPVSProxier.drift`): how many virtual servers and real
servers the kernel holds, without reading the table back.

A periodic check at 10,000 services x 10 real servers must stay far cheaper than the full
resync it guards. Reading `/proc/net/ip_vs` (~110k lines the kernel formats on every read)
cost 3.69 s per check at 2,000 services under emulation; a netlink real server dump takes one
round trip per virtual server. Two cheaper reads, the first that works:

- **IPv4: one getsockopt.** The kernel's original IPVS control interface
  (`IP_VS_SO_GET_SERVICES`, what ipvsadm used before generic netlink, still in every kernel)
  returns every IPv4 virtual server of the namespace as a fixed 104-byte record that carries its
  number of real servers (`num_dests`), in one call: ~1 MB at 10k services, no text, no
  per-message parsing. `read_v4` reduces it to (virtual servers, real servers, fingerprint),
  the fingerprint being an order-independent sum of `entry_hash` over (virtual server, its
  number of real servers). kproxy keeps the same three numbers for what it wrote, so every
  virtual server's real server count is compared on every check.
- **Any family (IPv6; IPv4 when the sockopt is refused):** one netlink service dump, counted
  without decoding, for the virtual servers, and the real servers of a rotating slice of them
  (`Rotation`): each virtual server's real servers are counted at least once every
  `Rotation.periods` checks.

Neither sees an outside weight or scheduler edit (the full resync period catches those).
"""

from __future__ import annotations

import ctypes
import errno as errnos
import socket
import struct
from bisect import bisect_right
from collections.abc import Collection
from dataclasses import dataclass

from kproxy.backends.netlink import netns_socket
from kproxy.render.ipvs import VSKey

# include/uapi/linux/ip_vs.h
IP_VS_BASE_CTL = 64 + 1024 + 64
IP_VS_SO_GET_INFO = IP_VS_BASE_CTL + 1
IP_VS_SO_GET_SERVICES = IP_VS_BASE_CTL + 2
_PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}

_INFO = struct.Struct("=III")  # struct ip_vs_getinfo: version, size (conn table), num_services
# struct ip_vs_service_entry on 64-bit: protocol u16 (+2), addr be32, port be16 (+2), fwmark u32,
# sched_name[16], flags, timeout, netmask, num_dests, then ip_vs_stats_user (56 bytes with the
# padding before its u64s and at its end): 104 bytes, 8-byte aligned
_ENTRY = struct.Struct("=H2x4s2s2xI16x12xI56x")
_ENTRIES_AT = 8  # struct ip_vs_get_services: num_services u32, then the 8-aligned entries
_SLACK = 64  # room for services created between GET_INFO and GET_SERVICES
_MASK64 = (1 << 64) - 1


def entry_hash(protocol: int, address: bytes, port: bytes, dests: int) -> int:
    """One virtual server's share of the fingerprint (address and port in network order, as
    the kernel's record holds them). Python's hash, stable within one process, which is all
    the fingerprint needs (kproxy computes both sides), then scrambled by splitmix64's
    finalizer: a tuple's hash is nearly linear in its last item, so without it a real server
    moved from one virtual server to another often left the sum unchanged."""
    x = hash((protocol, address, port, dests)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key_hash(key: VSKey, dests: int) -> int:
    """`entry_hash` of one of kproxy's virtual servers (0 for IPv6: not in the sockopt view)."""
    if ":" in key.address:
        return 0
    return entry_hash(
        _PROTOCOLS[key.protocol], socket.inet_aton(key.address), key.port.to_bytes(2, "big"), dests
    )


@dataclass(frozen=True, slots=True)
class Census:
    """Virtual servers of one family, their real servers in total, and the fingerprint."""

    services: int
    dests: int
    fingerprint: int


class SockoptReader:
    """`read_v4` over one raw socket kept open (IPPROTO_RAW: it never receives anything)."""

    def __init__(self, *, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._libc = ctypes.CDLL(None, use_errno=True)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = netns_socket(
                self.netns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW
            )
        return self._sock

    def _services(self, sock: socket.socket, room: int) -> list[tuple[int, bytes, bytes, int, int]]:
        """The entries the kernel wrote into room for `room` of them."""
        size = _ENTRIES_AT + room * _ENTRY.size
        buf = ctypes.create_string_buffer(size)
        struct.pack_into("=I", buf, 0, room)
        length = ctypes.c_uint32(size)
        rc = self._libc.getsockopt(
            sock.fileno(), socket.IPPROTO_IP, IP_VS_SO_GET_SERVICES, buf, ctypes.byref(length)
        )
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"IP_VS_SO_GET_SERVICES: {errnos.errorcode.get(err)}")
        # entries past the last one written stay zero: no protocol, no fwmark
        return [e for e in _ENTRY.iter_unpack(buf.raw[_ENTRIES_AT:]) if e[0] or e[3]]

    def read_v4(self) -> Census:
        """The IPv4 virtual servers (fwmark ones left out, as everywhere in kproxy) with their
        real servers: two getsockopt calls. Raises OSError when the interface is unusable."""
        sock = self._socket()
        info = sock.getsockopt(socket.IPPROTO_IP, IP_VS_SO_GET_INFO, _INFO.size)
        if len(info) != _INFO.size:
            raise OSError(errnos.EINVAL, "IP_VS_SO_GET_INFO: short answer")
        room = _INFO.unpack(info)[2] + _SLACK
        written = self._services(sock, room)
        while len(written) >= room:  # the table grew past the slack meanwhile: ask again
            room *= 2
            written = self._services(sock, room)
        entries = [e for e in written if not e[3]]
        return Census(
            services=len(entries),
            dests=sum(e[4] for e in entries),
            fingerprint=sum(entry_hash(e[0], e[1], e[2], e[4]) for e in entries),
        )


class Rotation:
    """Which virtual servers' real servers a netlink drift check counts: a slice per check, in
    key order from where the previous slice stopped, wrapping around.

    A slice holds max(`minimum`, ceil(n / `periods`)) of the n virtual servers (all of them when
    n <= `minimum`), so while the table keeps its size every virtual server is counted at least
    once in any `periods` consecutive checks (a virtual server added meanwhile waits at most
    one more turn)."""

    def __init__(self, *, periods: int = 20, minimum: int = 64) -> None:
        if periods < 1 or minimum < 1:
            raise ValueError("periods and minimum must be >= 1")
        self.periods = periods
        self.minimum = minimum
        self._cursor: VSKey | None = None  # the last key counted

    def size(self, n: int) -> int:
        return min(n, max(self.minimum, -(-n // self.periods)))

    def take(self, keys: Collection[VSKey]) -> list[VSKey]:
        ordered = sorted(keys)
        size = self.size(len(ordered))
        if not size:
            return []
        start = 0 if self._cursor is None else bisect_right(ordered, self._cursor)
        out = ordered[start : start + size]
        if len(out) < size:
            out += ordered[: size - len(out)]
        self._cursor = out[-1]
        return out
