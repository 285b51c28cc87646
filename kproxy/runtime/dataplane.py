"""Choosing and building the dataplane backends (one proxier per IP family) from the settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kproxy.backends.base import Proxier
from kproxy.backends.netinfo import families, with_node_addresses
from kproxy.config import Settings, base_options
from kproxy.model.options import ProxyOptions

log = logging.getLogger("kproxy")


def proxy_options(settings: Settings, *, family: int, node_name: str) -> ProxyOptions:
    """The options of one family as the running agent uses them (settings + host addresses)."""
    return with_node_addresses(base_options(settings, family=family, node_name=node_name))


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
            from kproxy.backends.ipvs import IPVSOptions, IPVSProxier

            proxier = IPVSProxier(
                options=options,
                ipvs_options=IPVSOptions(
                    scheduler=settings.ipvs_scheduler,
                    tcp_timeout=settings.ipvs_tcp_timeout,
                    tcpfin_timeout=settings.ipvs_tcpfin_timeout,
                    udp_timeout=settings.ipvs_udp_timeout,
                ),
            )
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
