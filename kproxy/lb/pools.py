"""Address pools: ranges (`A-B`) and CIDRs of IPv4 or IPv6 addresses, kept in the order given.

A pool hands out its addresses lowest first. Nothing here enumerates a range: finding a free
address walks from the start of each range past the used ones only, so a /64 pool costs nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class AddressRange:
    """first..last inclusive, one family."""

    first: IPAddress
    last: IPAddress
    text: str

    @property
    def family(self) -> int:
        return self.first.version

    @property
    def size(self) -> int:
        return int(self.last) - int(self.first) + 1

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return ip.version == self.first.version and int(self.first) <= int(ip) <= int(self.last)

    def addresses(self) -> Iterator[IPAddress]:
        cls = type(self.first)
        for value in range(int(self.first), int(self.last) + 1):
            yield cls(value)


def parse_range(text: str) -> AddressRange:
    """`192.168.50.200-192.168.50.220`, `192.168.50.240/29`, `fd00:50::100-fd00:50::1ff` or one
    address; ValueError for anything else."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty address range")
    if "/" in raw:
        net = ipaddress.ip_network(raw, strict=False)
        return AddressRange(net[0], net[-1], str(net))
    if "-" in raw:
        a, b = (part.strip() for part in raw.split("-", 1))
        first, last = ipaddress.ip_address(a), ipaddress.ip_address(b)
        if first.version != last.version:
            raise ValueError(f"{raw!r} mixes IPv4 and IPv6")
        if int(last) < int(first):
            raise ValueError(f"{raw!r} ends before it starts")
        return AddressRange(first, last, f"{first}-{last}")
    ip = ipaddress.ip_address(raw)
    return AddressRange(ip, ip, str(ip))


@dataclass(frozen=True, slots=True)
class Pools:
    """Every configured range, in configuration order."""

    ranges: tuple[AddressRange, ...] = ()

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Pools:
        ranges = tuple(parse_range(t) for t in texts)
        for i, a in enumerate(ranges):
            for b in ranges[i + 1 :]:
                if (
                    a.family == b.family
                    and int(a.first) <= int(b.last)
                    and int(b.first) <= int(a.last)
                ):
                    raise ValueError(f"address ranges {a.text} and {b.text} overlap")
        return cls(ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def range_of(self, ip: str | IPAddress) -> AddressRange | None:
        try:
            addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        except ValueError:
            return None
        for r in self.ranges:
            if addr in r:
                return r
        return None

    def contains(self, ip: str | IPAddress) -> bool:
        return self.range_of(ip) is not None

    def families(self) -> set[int]:
        return {r.family for r in self.ranges}

    def size(self, family: int | None = None) -> int:
        return sum(r.size for r in self.ranges if family is None or r.family == family)

    def first_free(self, family: int, used: Collection[str]) -> str | None:
        """The lowest address of `family` (ranges in order) not in `used`."""
        taken = {ipaddress.ip_address(u) for u in used}
        for r in self.ranges:
            if r.family != family:
                continue
            candidates = sorted(ip for ip in taken if ip in r)
            value = int(r.first)
            for ip in candidates:  # walk past the used prefix of the range only
                if int(ip) != value:
                    break
                value += 1
            if value <= int(r.last):
                return str(type(r.first)(value))
        return None
