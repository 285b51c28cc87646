"""Node-local placement: make the DNS listen addresses local to the node.

NodeLocal DNSCache puts 169.254.20.10 on a dummy interface; kproxy does the same with a dummy
interface named `kproxy-dns`. Kernels built without dummy support (CONFIG_DUMMY unset, as on the
development machines) refuse to create it; the addresses then go on `lo` instead, which behaves
the same for local delivery. Addresses that are already present anywhere on the node (a service IP
on kube-ipvs0, a loopback address) are left alone, and `remove_listen_addresses` removes only what
`ensure_listen_addresses` added. Netlink EEXIST on add and EADDRNOTAVAIL/ENODEV on delete count
as success.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from kproxy.backends.netlink import NetlinkRequestError, NetlinkSocket
from kproxy.backends.rtnetlink import (
    add_address,
    add_link,
    delete_address,
    delete_link,
    link_index,
    set_link_up,
)
from kproxy.backends.rtnetlink import addresses as list_addresses
from kproxy.errors import ConfigError

log = logging.getLogger(__name__)

INTERFACE = "kproxy-dns"


class PlacementError(ConfigError):
    """The addresses could not be configured (e.g. EPERM: not root)."""


@dataclass(slots=True)
class Placement:
    """What `ensure_listen_addresses` did, so that cleanup undoes exactly that."""

    ifname: str
    created_interface: bool = False
    added: list[tuple[str, int]] = field(default_factory=list)  # (address, prefixlen)


def _present(nl: NetlinkSocket, address: str) -> bool:
    return any(a.address == address for a in list_addresses(nl))


def ensure_listen_addresses(addresses: Iterable[str], *, ifname: str = INTERFACE) -> Placement:
    """Put each address (/32 or /128) on the `kproxy-dns` dummy interface, or on `lo`."""
    wanted = []
    for text in addresses:
        ip = ipaddress.ip_address(text)
        if ip.is_unspecified or ip.is_loopback:
            continue  # already local
        wanted.append(ip)
    placement = Placement(ifname=ifname)
    if not wanted:
        return placement
    try:
        with NetlinkSocket() as nl:
            index = link_index(nl, ifname)
            if index is None:
                try:
                    add_link(nl, ifname, "dummy")
                    placement.created_interface = True
                    index = link_index(nl, ifname)
                except NetlinkRequestError as exc:
                    if exc.code == errno.EPERM:
                        raise
                    log.info("dns: no dummy interface support (%s); using lo", exc)
            if index is None:
                placement.ifname = "lo"
                index = link_index(nl, "lo")
            if index is None:
                raise PlacementError("no loopback interface")
            set_link_up(nl, index)
            for ip in wanted:
                if _present(nl, str(ip)):
                    continue
                prefix = 32 if ip.version == 4 else 128
                try:
                    add_address(nl, index, str(ip), prefix)
                    placement.added.append((str(ip), prefix))
                except NetlinkRequestError as exc:
                    if exc.code != errno.EEXIST:
                        raise
    except NetlinkRequestError as exc:
        raise PlacementError(f"configuring DNS addresses on {ifname}: {exc}") from exc
    return placement


def remove_listen_addresses(placement: Placement) -> None:
    """Undo `ensure_listen_addresses`: delete the interface it made, or the addresses it added."""
    try:
        with NetlinkSocket() as nl:
            index = link_index(nl, placement.ifname)
            if index is None:
                return
            if placement.created_interface:
                delete_link(nl, index)
                return
            for address, prefix in placement.added:
                try:
                    delete_address(nl, index, address, prefix)
                except NetlinkRequestError as exc:
                    if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                        raise
    except NetlinkRequestError as exc:
        log.warning("dns: removing DNS addresses from %s failed: %s", placement.ifname, exc)


def cleanup_listen_addresses(addresses: Iterable[str], *, ifname: str = INTERFACE) -> list[str]:
    """Remove kproxy's DNS placement after a crash (`kproxy cleanup`): the `kproxy-dns`
    interface, and those of `addresses` that sit on `lo` with a host prefix (where kproxy puts
    them when there is no dummy support). Returns what was removed, for the log."""
    removed: list[str] = []
    wanted = set()
    for text in addresses:
        ip = ipaddress.ip_address(text)
        if not (ip.is_unspecified or ip.is_loopback):
            wanted.add(str(ip))
    try:
        with NetlinkSocket() as nl:
            index = link_index(nl, ifname)
            if index is not None:
                delete_link(nl, index)
                removed.append(ifname)
            lo = link_index(nl, "lo")
            if lo is None:
                return removed
            for found in list_addresses(nl, lo):
                address, prefix = found.address, found.prefixlen
                if address in wanted and prefix in (32, 128):
                    try:
                        delete_address(nl, lo, address, prefix)
                        removed.append(f"{address}/{prefix} on lo")
                    except NetlinkRequestError as exc:
                        if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                            raise
    except NetlinkRequestError as exc:
        raise PlacementError(f"removing DNS addresses: {exc}") from exc
    return removed
