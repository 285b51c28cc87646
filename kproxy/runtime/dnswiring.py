"""Building the DNS server from the settings (the flags map 1:1 onto DNSOptions)."""

from __future__ import annotations

import ipaddress
import logging

from kproxy.config import Settings
from kproxy.dns.options import LOOPBACK_CIDRS, DNSOptions
from kproxy.dns.server import DNSService

log = logging.getLogger("kproxy.dns")


def default_allow_cidrs(settings: Settings) -> tuple[str, ...]:
    """Recursion for the cluster CIDR, this node's addresses and loopback (not an open resolver)."""
    from kproxy.backends.netinfo import local_addresses

    node = []
    for ip in local_addresses():
        node.append(str(ipaddress.ip_network(ip)))
    return tuple(dict.fromkeys([*settings.cluster_cidr, *node, *LOOPBACK_CIDRS]))


def dns_options(settings: Settings) -> DNSOptions:
    return DNSOptions(
        listen=settings.dns_listen,
        zone=settings.cluster_domain.strip(".").lower() or "cluster.local",
        ttl=settings.dns_ttl,
        upstreams=settings.dns_upstream or None,
        allow_cidrs=settings.dns_allow_cidrs or default_allow_cidrs(settings),
        pods_mode=settings.dns_pods,
        service_ip=settings.dns_service_ip or None,
        workers=settings.dns_workers,
    )


def make_dns(settings: Settings) -> DNSService:
    return DNSService(options=dns_options(settings))
