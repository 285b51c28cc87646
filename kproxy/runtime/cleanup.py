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
    from kproxy.dns.placement import cleanup_listen_addresses

    addresses = list(settings.dns_listen)
    if settings.dns_service_ip:
        addresses.append(settings.dns_service_ip)
    try:
        cleanup_listen_addresses(addresses)
    except Exception as err:
        log.warning("could not remove DNS listen addresses: %s", err)
