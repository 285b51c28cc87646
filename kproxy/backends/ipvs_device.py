"""kube-ipvs0, the dummy interface whose addresses make the kernel accept Service VIPs as local.

IPVS intercepts packets for a virtual server only once they are routed to the local host, so
every ClusterIP (and every externalIP/LoadBalancer IP that is not a node address) is bound here
as a /32 or /128, as kube-proxy does. The device stays down, like kube-proxy's: local routes exist
for its addresses either way, and a down device never answers ARP/NDP for them.

Reads and address changes go through one `ip` process each (`ip -json addr show`, `ip -batch`):
at 10,000 services the device holds 10,000 addresses, and parsing that many netlink messages
with pyroute2 (or changing them one round trip at a time) costs seconds, tens of seconds under
emulation. The device itself is created through pyroute2.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess
from collections.abc import Iterable

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kproxy.backends.netlink import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
    error_code,
    message,
    parse_messages,
)
from kproxy.errors import DataplaneError
from kproxy.render.ipvs import DUMMY_DEVICE

log = logging.getLogger("kproxy.ipvs")


class DeviceError(DataplaneError):
    """kube-ipvs0 could not be created or changed."""


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def device_exists(name: str = DUMMY_DEVICE) -> bool:
    with IPRoute() as ipr:
        return _index(ipr, name) is not None


def address_map(family: int, device: str | None = None) -> dict[str, set[str]]:
    """Interface name -> its addresses of `family` (IPv6 link-local left out), from one
    `ip -json addr show` (of one device, if given; empty when it does not exist)."""
    argv = ["ip", "-json", f"-{family}", "addr", "show"]
    if device:
        argv += ["dev", device]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode:
        if device and "does not exist" in proc.stderr:
            return {}
        raise DeviceError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    out: dict[str, set[str]] = {}
    for link in json.loads(proc.stdout or "[]"):
        addrs = out.setdefault(link.get("ifname", ""), set())
        for info in link.get("addr_info", ()):
            local = info.get("local")
            if not local or info.get("scope") == "link":
                continue
            # `ip` prints IPv4 canonically; IPv6 is normalised like everywhere else in kproxy
            addrs.add(str(ipaddress.ip_address(local)) if ":" in local else local)
    return out


RTM_NEWADDR = 20
RTM_GETADDR = 22
RT_SCOPE_LINK = 253
NETLINK_GET_STRICT_CHK = 12
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index


def address_count(family: int, device: str = DUMMY_DEVICE) -> int:
    """How many addresses of `family` `device` holds (IPv6 link-local left out, as in
    `address_map`; 0 when it does not exist): one RTM_GETADDR dump whose messages are counted by
    their header, nothing decoded (the drift check's read; kernels >= 4.20 filter the dump to the
    device themselves)."""
    try:
        index = socket.if_nametoindex(device)
    except OSError:
        return 0
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        sock.settimeout(30.0)
        seq = int.from_bytes(os.urandom(3), "big") or 1
        sock.send(
            message(
                RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, _IFADDRMSG.pack(af, 0, 0, 0, index)
            )
        )
        count = 0
        while True:
            for m in parse_messages(sock.recv(1 << 20)):
                if m.seq != seq:
                    continue
                if m.type == NLMSG_DONE:
                    return count
                if m.type == NLMSG_ERROR:
                    code = error_code(m.payload)
                    if code:
                        raise DeviceError(f"listing the addresses of {device}: {os.strerror(code)}")
                    return count
                if m.type == RTM_NEWADDR:
                    fam, _plen, _flags, scope, idx = _IFADDRMSG.unpack_from(m.payload)
                    count += idx == index and fam == af and scope != RT_SCOPE_LINK


def _ip_batch(lines: Iterable[str]) -> int:
    text = "".join(lines)
    if not text:
        return 0
    proc = subprocess.run(
        ["ip", "-force", "-batch", "-"], input=text, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        # -force carries on after a failed line; report what failed
        raise DeviceError(f"ip -batch: {proc.stderr.strip()[:2000]}")
    return text.count("\n")


class KubeIPVS0:
    """The dummy device and its addresses."""

    def __init__(self, name: str = DUMMY_DEVICE) -> None:
        self.name = name

    def ensure(self) -> None:
        """Create the dummy device when it is missing (kept down)."""
        with IPRoute() as ipr:
            if _index(ipr, self.name) is not None:
                return
            try:
                ipr.link("add", ifname=self.name, kind="dummy")
            except NetlinkError as err:
                if err.code != 17:  # EEXIST: created meanwhile
                    raise DeviceError(
                        f"cannot create {self.name}: {err} (is the dummy module available?)"
                    ) from err
        log.info("created %s", self.name)

    def count(self, family: int) -> int:
        """How many addresses of `family` the device holds (cheap: nothing decoded)."""
        return address_count(family, self.name)

    def addresses(self, family: int) -> set[str]:
        """The addresses of `family` on the device (empty when it does not exist)."""
        return address_map(family, self.name).get(self.name, set())

    def bind(self, addresses: Iterable[str]) -> int:
        return _ip_batch(
            f"address replace {a}/{_prefix(a)} dev {self.name}\n" for a in sorted(addresses)
        )

    def unbind(self, addresses: Iterable[str]) -> int:
        return _ip_batch(
            f"address del {a}/{_prefix(a)} dev {self.name}\n" for a in sorted(addresses)
        )

    def remove(self, *, families: Iterable[int] = (4, 6)) -> bool:
        """Remove the addresses of `families`; delete the device when none is left. True when
        the device is gone."""
        families = tuple(families)
        for fam in families:
            with contextlib.suppress(DeviceError):
                self.unbind(self.addresses(fam))
        if any(self.addresses(f) for f in (4, 6)):
            return False
        with IPRoute() as ipr:
            idx = _index(ipr, self.name)
            if idx is not None:
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=idx)
        log.info("deleted %s", self.name)
        return True


def _prefix(address: str) -> int:
    return 128 if ":" in address else 32
