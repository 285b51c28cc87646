"""The DNS server of `kproxy run`: built from the settings (the flags map 1:1 onto DNSOptions),
and kept up to date by a thread that hands it the store's snapshot after changes (debounced)."""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable

from kproxy.config import Settings
from kproxy.dns.options import LOOPBACK_CIDRS, DNSOptions
from kproxy.dns.server import DNSService
from kproxy.model.store import Snapshot

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


class DNSUpdater:
    """Pushes `snapshot()` to `dns` whenever `wake()` was called, at most every 50 ms."""

    def __init__(
        self, dns: DNSService, snapshot: Callable[[], Snapshot], stop: threading.Event
    ) -> None:
        self.dns = dns
        self._snapshot = snapshot
        self._stop = stop
        self._wake = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        threading.Thread(target=self._run, name="dns-updater", daemon=True).start()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(1.0):
                continue
            self._wake.clear()
            try:
                self.dns.update(self._snapshot())
            except Exception:
                log.exception("DNS index update failed")
            self._stop.wait(0.05)  # debounce bursts of events
