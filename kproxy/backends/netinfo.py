"""Reads of this host's network configuration through netlink (`kproxy.backends.rtnetlink`)."""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import replace

from kproxy.backends.netlink import NetlinkSocket
from kproxy.backends.rtnetlink import addresses
from kproxy.model.options import ProxyOptions


def local_addresses(family: int | None = None) -> tuple[str, ...]:
    """Every address configured on this host's interfaces (of one family, if given)."""
    out: list[str] = []
    with NetlinkSocket() as nl:
        for found in addresses(nl):
            ip = ipaddress.ip_address(found.address)
            if family is not None and ip.version != family:
                continue
            if ip.version == 6 and ip.is_link_local:
                continue
            out.append(str(ip))
    return tuple(dict.fromkeys(out))


def addresses_in(cidrs: tuple[str, ...], family: int) -> tuple[str, ...]:
    """Local addresses of `family` inside any of `cidrs`."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    nets = [n for n in nets if n.version == family]
    return tuple(
        a for a in local_addresses(family) if any(ipaddress.ip_address(a) in n for n in nets)
    )


def ipv6_available() -> bool:
    return os.path.exists("/proc/net/if_inet6")


def write_sysctl(name: str, value: str) -> bool:
    """Set a sysctl (dotted name); False when it does not exist or cannot be written."""
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        with open(path, encoding="ascii") as fh:
            if fh.read().strip() == value:
                return True
        with open(path, "w", encoding="ascii") as fh:
            fh.write(value)
        return True
    except OSError:
        return False


def families(mode: str = "iptables") -> tuple[int, ...]:
    """IPv4 always; IPv6 too when the host has it (and ip6tables exists, but for nftables)."""
    if ipv6_available() and (mode == "nftables" or shutil.which("ip6tables-restore")):
        return (4, 6)
    return (4,)


def with_node_addresses(options: ProxyOptions) -> ProxyOptions:
    """`options` with this host's addresses of its family: every local address as node_ips, and
    the NodePort addresses from `nodeport_cidrs` (None: every address, when no CIDR or a /0 is
    given)."""
    cidrs = options.nodeport_cidrs
    everywhere = not cidrs or any(ipaddress.ip_network(c).prefixlen == 0 for c in cidrs)
    return replace(
        options,
        node_ips=local_addresses(options.family),
        nodeport_ips=None if everywhere else addresses_in(cidrs, options.family),
    )
