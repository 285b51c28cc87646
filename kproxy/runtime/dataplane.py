"""Choosing and building the dataplane backends (one proxier per IP family) from the settings."""

from __future__ import annotations

import ipaddress
import logging
import shutil
from dataclasses import dataclass

from kproxy.backends.base import Proxier
from kproxy.backends.netinfo import addresses_in, ipv6_available, local_addresses
from kproxy.config import Settings
from kproxy.model.options import ProxyOptions

log = logging.getLogger("kproxy")


def proxy_options(settings: Settings, *, family: int, node_name: str) -> ProxyOptions:
    cidrs = tuple(
        c
        for c in settings.nodeport_addresses
        if c != "primary" and ipaddress.ip_network(c).version == family
    )
    everywhere = not cidrs or any(ipaddress.ip_network(c).prefixlen == 0 for c in cidrs)
    return ProxyOptions(
        family=family,
        node_name=node_name,
        node_ips=local_addresses(family),
        nodeport_ips=None if everywhere else addresses_in(cidrs, family),
        cluster_cidrs=tuple(
            c for c in settings.cluster_cidr if ipaddress.ip_network(c).version == family
        ),
        masquerade_all=settings.masquerade_all,
        masquerade_bit=settings.masquerade_bit,
        primary_ips=primary_ips(settings, family),
    )


def primary_ips(settings: Settings, family: int) -> tuple[str, ...] | None:
    """--node-ip-override's address of `family`; None (any node address) when not given."""
    if not settings.node_ip_override:
        return None
    return tuple(
        ip for ip in settings.node_ip_override if ipaddress.ip_address(ip).version == family
    )


def families(mode: str = "iptables") -> tuple[int, ...]:
    """IPv4 always; IPv6 too when the host has it (and ip6tables exists, but for nftables)."""
    if ipv6_available() and (mode == "nftables" or shutil.which("ip6tables-restore")):
        return (4, 6)
    return (4,)


@dataclass(frozen=True)
class Plane:
    """The dataplane of one IP family: its options and its proxier."""

    family: int
    options: ProxyOptions
    proxier: Proxier


def make_planes(settings: Settings, *, node_name: str) -> list[Plane]:
    out: list[Plane] = []
    engine = None
    for family in families(settings.proxy_mode):
        options = proxy_options(settings, family=family, node_name=node_name)
        proxier: Proxier
        if settings.proxy_mode == "nftables":
            from kproxy.backends.nftables import NftablesProxier

            proxier = NftablesProxier(options=options)
        elif settings.proxy_mode == "userspace":
            from kproxy.backends.userspace import UserspaceProxier
            from kproxy.backends.userspace_proxy import ProxyEngine

            engine = engine or ProxyEngine()  # one proxy loop for both families
            proxier = UserspaceProxier(
                options=options, engine=engine, udp_timeout=settings.udp_idle_timeout
            )
        elif settings.proxy_mode == "ipvs":
            from kproxy.backends.ipvs import IPVSProxier

            proxier = IPVSProxier(options=options, settings=settings)
        else:
            from kproxy.backends.iptables import IptablesProxier

            proxier = IptablesProxier(options=options)
        out.append(Plane(family=family, options=options, proxier=proxier))
    return out


def cleanup_all(settings: Settings) -> None:
    """`kproxy cleanup`: remove everything kproxy may have created, in every mode."""
    from kproxy.backends.iptables import IptablesProxier

    for family in families():
        options = proxy_options(settings, family=family, node_name="")
        IptablesProxier(options=options).cleanup()
    from kproxy.backends.userspace import cleanup_rules

    for family in families():
        cleanup_rules(family)
    try:
        from kproxy.backends.ipvs import cleanup_ipvs

        cleanup_ipvs()
    except ImportError:
        pass
    except Exception as err:  # no IPVS in this kernel is the common case
        log.info("IPVS cleanup skipped: %s", err)
    from kproxy.backends.nftables import cleanup_nftables

    for family in (4, 6):
        cleanup_nftables(family)
