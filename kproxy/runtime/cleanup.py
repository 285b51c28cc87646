"""`kproxy cleanup`: remove everything kproxy created (rules, chains, IPVS state, DNS addresses)."""

from __future__ import annotations

import logging

from kproxy.config import Settings
from kproxy.runtime.dataplane import cleanup_all

log = logging.getLogger("kproxy")


def cleanup_everything(settings: Settings) -> None:
    cleanup_all(settings)
    _remove_dns_addresses(settings)
    log.info("cleanup done")


def _remove_dns_addresses(settings: Settings) -> None:
    """Delete the kproxy-dns interface, or the listen addresses kproxy put on `lo`."""
    from kproxy.dns.options import parse_hostport
    from kproxy.dns.placement import INTERFACE, Placement, remove_listen_addresses

    ips = [parse_hostport(hp)[0] for hp in settings.dns_listen]
    if settings.dns_service_ip:
        ips.append(settings.dns_service_ip)
    # only addresses kproxy would have added: never loopback's own 127.0.0.1 / ::1
    added = [(ip, 128 if ":" in ip else 32) for ip in ips if ip not in ("127.0.0.1", "::1")]
    try:
        remove_listen_addresses(Placement(ifname=INTERFACE, created_interface=True))
        remove_listen_addresses(Placement(ifname="lo", added=added))
    except Exception as err:
        log.warning("could not remove DNS listen addresses: %s", err)
