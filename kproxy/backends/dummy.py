"""The dummy interface IPVS mode binds service addresses to (kube-ipvs0), through pyroute2 IPRoute.

IPVS only sees packets the kernel routes to itself, so every ClusterIP, externalIP and
LoadBalancer IP must be a local address. As kube-proxy does, they are held as /32 (IPv4) and /128
(IPv6) addresses on a dummy interface that stays administratively DOWN: the kernel still installs
the `local` routes for its IPv4 addresses, and nothing is ever transmitted on it. IPv6 addresses
are added with NODAD (no duplicate address detection, never "tentative") and get their local
route only while the interface is up, so `ensure(up=True)` is there for IPv6 nodes.

Every method is idempotent: creating an existing interface, adding an address it holds, removing
one it does not, or deleting a missing interface all succeed. EPERM/EACCES raise
`DummyPermissionError`; other netlink failures `DummyError`. Addresses are canonical text
(``ipaddress`` form) without a prefix length.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("kproxy.dummy")

DEFAULT_NAME = "kube-ipvs0"
IFA_F_NODAD = 0x02
IFF_UP = 0x1
_FATAL = frozenset({errno.EPERM, errno.EACCES})


class DummyError(RuntimeError):
    """The dummy interface or its addresses could not be read or changed."""


class DummyPermissionError(DummyError):
    """The kernel refused with EPERM/EACCES (no CAP_NET_ADMIN)."""


def _raise(what: str, err: NetlinkError) -> None:
    msg = f"{what}: {err.args[-1] if err.args else err} (errno {err.code})"
    if err.code in _FATAL:
        raise DummyPermissionError(msg) from err
    raise DummyError(msg) from err


@dataclass(frozen=True, slots=True)
class AddressSync:
    """What `DummyInterface.sync` changed."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


class DummyInterface:
    """One dummy interface (by name) in the current network namespace, or in `netns`."""

    def __init__(self, name: str = DEFAULT_NAME, *, netns: str | None = None) -> None:
        self.name = name
        self._ipr = IPRoute(netns=netns) if netns else IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> DummyInterface:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the interface -----------------------------------------------------------------
    def index(self) -> int | None:
        """The interface index, or None when the interface does not exist."""
        try:
            found = self._ipr.link_lookup(ifname=self.name)
        except NetlinkError as err:
            if err.code == errno.ENODEV:
                return None
            _raise(f"look up {self.name}", err)
        return int(found[0]) if found else None

    def exists(self) -> bool:
        return self.index() is not None

    def is_up(self) -> bool:
        idx = self.index()
        if idx is None:
            return False
        (link,) = self._ipr.get_links(idx)
        return bool(link["flags"] & IFF_UP)

    def kind(self) -> str | None:
        """The link kind of the interface ("dummy" when kproxy made it), None when missing."""
        idx = self.index()
        if idx is None:
            return None
        (link,) = self._ipr.get_links(idx)
        info = link.get_attr("IFLA_LINKINFO")
        return None if info is None else info.get_attr("IFLA_INFO_KIND")

    def ensure(self, *, up: bool = False) -> int:
        """Create the interface if it is missing (and bring it up when `up`); its index.
        An existing interface of another kind is an error (kproxy would not own it)."""
        idx = self.index()
        if idx is None:
            try:
                self._ipr.link("add", ifname=self.name, kind="dummy")
                log.info("created dummy interface %s", self.name)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    _raise(f"create {self.name}", err)
            idx = self.index()
            if idx is None:
                raise DummyError(f"{self.name} vanished right after it was created")
        kind = self.kind()
        if kind != "dummy":
            raise DummyError(f"{self.name} exists but is a {kind or 'unknown'} interface")
        if up and not self.is_up():
            try:
                self._ipr.link("set", index=idx, state="up")
            except NetlinkError as err:
                _raise(f"bring {self.name} up", err)
        return idx

    def delete(self) -> bool:
        """Delete the interface (its addresses go with it). False when it did not exist."""
        idx = self.index()
        if idx is None:
            return False
        try:
            self._ipr.link("del", index=idx)
        except NetlinkError as err:
            if err.code in (errno.ENODEV, errno.ENOENT):
                return False
            _raise(f"delete {self.name}", err)
        log.info("deleted dummy interface %s", self.name)
        return True

    # -- addresses ---------------------------------------------------------------------
    def addresses(self) -> set[str]:
        """The addresses on the interface (empty when it does not exist)."""
        idx = self.index()
        if idx is None:
            return set()
        out: set[str] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                msgs = self._ipr.get_addr(family=family, index=idx)
            except NetlinkError as err:
                _raise(f"list addresses of {self.name}", err)
            for msg in msgs:
                addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if addr and not (family == socket.AF_INET6 and addr.startswith("fe80:")):
                    out.add(str(ipaddress.ip_address(addr)))
        return out

    def add(self, address: str) -> bool:
        """Bind `address` (/32 or /128). False when it was already bound."""
        idx = self._require()
        ip = ipaddress.ip_address(address)
        kwargs: dict[str, object] = {"index": idx, "address": str(ip)}
        if ip.version == 6:
            kwargs.update(prefixlen=128, flags=IFA_F_NODAD)
        else:
            kwargs.update(prefixlen=32)
        try:
            self._ipr.addr("add", **kwargs)
        except NetlinkError as err:
            if err.code == errno.EEXIST:
                return False
            _raise(f"add {ip} to {self.name}", err)
        return True

    def remove(self, address: str) -> bool:
        """Unbind `address`. False when it was not bound (or the interface is missing)."""
        idx = self.index()
        if idx is None:
            return False
        ip = ipaddress.ip_address(address)
        try:
            self._ipr.addr(
                "del", index=idx, address=str(ip), prefixlen=128 if ip.version == 6 else 32
            )
        except NetlinkError as err:
            if err.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                return False
            _raise(f"remove {ip} from {self.name}", err)
        return True

    def sync(self, wanted: Iterable[str]) -> AddressSync:
        """Make the interface hold exactly `wanted` (creating it if needed)."""
        self.ensure()
        want = {str(ipaddress.ip_address(a)) for a in wanted}
        have = self.addresses()
        added = tuple(sorted(a for a in want - have if self.add(a)))
        removed = tuple(sorted(a for a in have - want if self.remove(a)))
        return AddressSync(added=added, removed=removed)

    def _require(self) -> int:
        idx = self.index()
        if idx is None:
            raise DummyError(f"{self.name} does not exist (call ensure() first)")
        return idx
