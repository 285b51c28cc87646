"""The DNS answer index: every name kproxy is authoritative for, built from the model.

`build_index(snapshot, ...)` returns a `DnsIndex`: an immutable mapping from lower-case wire names
to `Node`s (the name's records, plus additional-section records for SRV and NS answers). Names
follow the Kubernetes DNS specification (schema 1.1.0) and match CoreDNS's `kubernetes` plugin
where the spec is silent:

- `<svc>.<ns>.svc.<zone>`: A/AAAA of the cluster IPs (even without endpoints); for a headless
  service the ready endpoints (all endpoints with publishNotReadyAddresses), and no name at all
  when none is ready (NXDOMAIN); a CNAME for ExternalName services.
- `<hostname>.<svc>.<ns>.svc.<zone>` per ready endpoint, hostname else the dashed IP (CoreDNS
  does this for every service with endpoints, not only headless ones).
- `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV for named ports: the service name for ClusterIP
  services, one record per endpoint for headless ones, with the addresses as additional records.
  SRV at the bare service name too, as CoreDNS answers it (`_bare_srv`).
- PTR for cluster IPs and endpoint IPs (a cluster IP wins over an endpoint with the same address;
  an endpoint in several services gets one PTR per service, as in CoreDNS).
- the apex SOA and NS (`ns.dns.<zone>` with the DNS listen addresses), `dns-version.<zone>` TXT,
  and the empty non-terminals (`svc.<zone>`, `pod.<zone>`, `<ns>.svc.<zone>`, `_tcp.<svc>...`)
  that make the difference between NODATA and NXDOMAIN.

Pod names (`a-b-c-d.<ns>.pod.<zone>`) are synthesised by the resolver, not stored. Most other
names are synthesised too, by `DnsIndex.lookup`: a ClusterIP service's names (its own, its SRV
names and their `_<proto>` parents, its cluster IPs' PTRs) from its `DnsService` alone, through
the same `service_part` a stored service goes through, and endpoint names and PTRs from each
service's `Endpoints` (its served addresses packed in one bytes object, plus hostnames when there
are any); per address a sorted table gives the services whose PTR it answers with. Only the
apex, the empty non-terminals and the names of headless and ExternalName services are stored:
at 10k ClusterIP services x 10 endpoints the index is ~7 MB (names, records and nodes for
every name took ~120 MB).

The index reads only what DNS needs from the model, converted to small tuples (`DnsService`,
`DnsSlice`): they pickle fast (the serving processes receive them over a pipe) and keep the
serving processes' memory small.

`IndexBuilder` maintains the index incrementally: for a `ModelDelta` (what changed between two
snapshots) it recomputes only the touched services and reports which names changed, so the
answer cache keeps every other pre-encoded answer. A full build of 10k services takes a few
tenths of a second of CPU; a one-service change well under a millisecond plus one copy of the
published maps.
"""

from __future__ import annotations

import socket
from array import array
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from kproxy.dns.records import (
    AAAA,
    CNAME,
    DNS_SCHEMA_VERSION,
    NS,
    PTR,
    RR,
    A,
    BadName,
    a_rr,
    name_rr,
    pack_ip,
    reverse_packed,
    reverse_wire,
    soa_rr,
    srv_rr,
    to_wire,
    txt_rr,
)

if TYPE_CHECKING:  # the serving processes import this module: they need none of the model's
    from kproxy.model.objects import EndpointPort, EndpointSlice, Ref, Service, ServicePort
    from kproxy.model.store import Snapshot

PODS_INSECURE = "insecure"
PODS_DISABLED = "disabled"
PODS_MODES = (PODS_INSECURE, PODS_DISABLED)

KIND_CLUSTER_IP = 0
KIND_HEADLESS = 1
KIND_EXTERNAL_NAME = 2

DNS_VERSION_TTL = 28800  # CoreDNS's TTL for dns-version.<zone> (the schema changes rarely)

_IN_ADDR = to_wire("in-addr.arpa")
_IP6 = to_wire("ip6.arpa")


# -- the model as DNS sees it ---------------------------------------------------------------------


class DnsPort(NamedTuple):
    name: str
    protocol: str
    port: int


class DnsSlice(NamedTuple):
    """An EndpointSlice as DNS sees it, packed: a few objects per slice, not a few per endpoint
    (the serving processes receive the whole model over a pipe, and build from it).

    addrs: per endpoint its address packed (4 bytes in an IPv4 slice, 16 in an IPv6 one);
           endpoints DNS can serve nothing for (an address not of the slice's family, not an
           IP address, or an FQDN slice) are left out.
    ready: per endpoint one byte, 1 when it is ready.
    hosts: per endpoint its host label (wire) when it is not the dashed address
           (`_dashed_label`), else b""; None when every one is.
    """

    addrs: bytes
    ready: bytes
    hosts: tuple[bytes, ...] | None
    ports: tuple[DnsPort, ...]


class DnsService(NamedTuple):
    namespace: str
    name: str
    kind: int
    cluster_ips: tuple[str, ...]
    ports: tuple[DnsPort, ...]
    external_name: str = ""
    publish_not_ready: bool = False


_PORTS: dict[tuple[DnsPort, ...], tuple[DnsPort, ...]] = {}


def _dns_ports(ports: Iterable[EndpointPort | ServicePort]) -> tuple[DnsPort, ...]:
    """The ports as DNS sees them, one shared tuple per distinct list: most services have the
    same few port lists, and the pickled model carries each once (the pickle's memo), so the
    serving processes keep one copy too. The cache is bounded (cleared when it fills)."""
    out = tuple(DnsPort(p.name, p.protocol, p.port) for p in ports)
    found = _PORTS.get(out)
    if found is not None:
        return found
    if len(_PORTS) >= 4096:
        _PORTS.clear()
    _PORTS[out] = out
    return out


def dns_service(svc: Service) -> DnsService:
    if svc.is_external_name:
        kind = KIND_EXTERNAL_NAME
    elif svc.headless or not svc.cluster_ips:
        kind = KIND_HEADLESS
    else:
        kind = KIND_CLUSTER_IP
    return DnsService(
        namespace=svc.namespace,
        name=svc.name,
        kind=kind,
        cluster_ips=svc.cluster_ips if kind == KIND_CLUSTER_IP else (),
        ports=_dns_ports(svc.ports),
        external_name=svc.external_name,
        publish_not_ready=svc.publish_not_ready,
    )


_FAMILIES = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6}


def dns_slices(slices: Iterable[EndpointSlice]) -> tuple[DnsSlice, ...]:
    return tuple(_dns_slice(sl) for sl in slices)


def _dns_slice(sl: EndpointSlice) -> DnsSlice:
    family = _FAMILIES.get(sl.address_type, 0)
    addrs: list[bytes] = []
    ready = bytearray()
    hosts: list[bytes] = []
    for ep in sl.endpoints if family else ():
        if not _family_ok(ep.address, sl.address_type):
            continue
        try:
            packed = pack_ip(ep.address)
        except ValueError:
            continue
        if not ep.hostname and socket.inet_ntop(family, packed) == ep.address:
            host = b""  # the common case: a canonical address, no hostname
        else:
            label = _host_label(ep.hostname, ep.address)
            if label is None:
                continue
            host = b"" if label == _dashed_label(packed) else label
        addrs.append(packed)
        ready.append(ep.ready)
        hosts.append(host)
    return DnsSlice(
        b"".join(addrs),
        bytes(ready),
        tuple(hosts) if any(hosts) else None,
        _dns_ports(sl.ports),
    )


@dataclass(frozen=True, slots=True)
class ModelDelta:
    """What changed between two snapshots, keyed by service ref.

    services: the new service, or None when it was deleted.
    slices:   the service's complete new slice tuple (empty when it has none any more), for
              every service whose slices changed and, unless `full`, every service in
              `services` that was not deleted (the index builder keeps no slices: it rebuilds
              a changed service from these).
    full:     replace the whole model with this delta (the first update, or a resync).
    """

    services: Mapping[Ref, DnsService | None] = field(default_factory=dict)
    slices: Mapping[Ref, tuple[DnsSlice, ...]] = field(default_factory=dict)
    synced: bool = True
    generation: int = 0
    full: bool = False

    @property
    def touched(self) -> set[Ref]:
        return set(self.services) | set(self.slices)


def _same_slices(a: tuple[EndpointSlice, ...], b: tuple[EndpointSlice, ...]) -> bool:
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b, strict=True))


def diff_snapshots(prev: Snapshot | None, cur: Snapshot) -> ModelDelta:
    """The delta that turns `prev` into `cur` (a full delta when there is no `prev`).

    Cheap because the store hands out the same object for an unchanged Service or slice: most
    comparisons are identity checks.
    """
    if prev is None:
        return ModelDelta(
            services={ref: dns_service(s) for ref, s in cur.services.items()},
            slices={ref: dns_slices(g) for ref, g in cur.slices.items()},
            synced=cur.synced,
            generation=cur.generation,
            full=True,
        )
    services: dict[Ref, DnsService | None] = {}
    slices: dict[Ref, tuple[DnsSlice, ...]] = {}
    for ref, svc in cur.services.items():
        old = prev.services.get(ref)
        if old is not svc and old != svc:
            services[ref] = dns_service(svc)
            slices[ref] = dns_slices(cur.slices.get(ref, ()))
    for ref in prev.services.keys() - cur.services.keys():
        services[ref] = None
    for ref, group in cur.slices.items():
        old_group = prev.slices.get(ref)
        if ref not in slices and (old_group is None or not _same_slices(old_group, group)):
            slices[ref] = dns_slices(group)
    for ref in prev.slices.keys() - cur.slices.keys():
        slices.setdefault(ref, ())
    return ModelDelta(
        services=services, slices=slices, synced=cur.synced, generation=cur.generation
    )


# -- nodes --------------------------------------------------------------------------------------


class Node(NamedTuple):
    """The records of one name; `extra` goes in the additional section of SRV and NS answers.

    `rank` orders PTR contributions: a cluster IP (0) hides endpoints (1) with the same address.
    """

    rrs: tuple[RR, ...] = ()
    extra: tuple[RR, ...] = ()
    rank: int = 0

    def get(self, rtype: int) -> tuple[RR, ...]:
        return tuple(rr for rr in self.rrs if rr.rtype == rtype)


EMPTY = Node()


# -- endpoints: their names and PTRs are synthesised when asked ------------------------------

_SLOT = 17  # an address in `Endpoints.addrs`: its length (4 or 16), then the address padded to 16
_DEC = [str(i).encode() for i in range(256)]


def _slot(packed: bytes) -> bytes:
    return bytes((len(packed),)) + packed.ljust(16, b"\x00")


def _dashed_label(packed: bytes) -> bytes:
    """The endpoint label of an address without hostname (wire label), b"" if it has none."""
    if len(packed) == 4:
        text = b"-".join([_DEC[b] for b in packed])
    else:
        text = socket.inet_ntop(socket.AF_INET6, packed).replace(":", "-").encode()
        if b"." in text:  # an IPv4-mapped address: such an endpoint keeps its label explicitly
            return b""
    return bytes((len(text),)) + text


def _undash(label: bytes) -> bytes | None:
    """The address a dashed endpoint label stands for (packed), None when it is not one."""
    text = label[1:]
    try:
        parts = text.split(b"-")
        if len(parts) == 4 and all(parts):
            packed = bytes([int(p) for p in parts])
        else:
            packed = socket.inet_pton(socket.AF_INET6, text.replace(b"-", b":").decode("ascii"))
    except (OSError, UnicodeDecodeError, ValueError):  # ValueError: not numbers, or over 255
        return None
    return packed if _dashed_label(packed) == label else None


def _unreverse(name: bytes) -> bytes | None:
    """The address of a canonical in-addr.arpa / ip6.arpa name (packed), else None."""
    if name.endswith(_IN_ADDR):
        body, want = name[: len(name) - len(_IN_ADDR)], 4
    elif name.endswith(_IP6):
        body, want = name[: len(name) - len(_IP6)], 32
    else:
        return None
    labels = []
    i = 0
    while i < len(body):
        end = i + 1 + body[i]
        labels.append(body[i + 1 : end])
        i = end
    if len(labels) != want:
        return None
    labels.reverse()
    try:
        if want == 4:
            packed = bytes([int(lb) for lb in labels])
        else:
            packed = bytes.fromhex(b"".join(labels).decode("ascii"))
    except ValueError:  # not numbers, a number over 255, not hex digits
        return None
    return packed if reverse_packed(packed) == name else None


def _address_rr(owner: bytes, ttl: int, packed: bytes) -> RR:
    return RR(owner, A if len(packed) == 4 else AAAA, ttl, packed)


class Endpoints(NamedTuple):
    """The addresses one service has names for (ready, or all with publishNotReadyAddresses).

    Nothing per endpoint is stored but its address: the name `<host>.<service>` and the PTR of
    the address are made when asked (`DnsIndex.lookup`), from this record. At 10k services x
    10 endpoints that is ~100 MB less than storing each endpoint's names and records.

    addrs: the addresses in model order (the first hostname of an address wins, as in
           CoreDNS): when `width` is 4 (every address is IPv4) the 4 bytes of each, else one
           `_SLOT`-byte slot (`_slot`) each.
    hosts: per address its host label (wire, with the length byte), b"" for the dashed address
           (`_dashed_label`); None when every address is dashed (endpoints without hostname).
    """

    addrs: bytes
    hosts: tuple[bytes, ...] | None
    width: int = _SLOT

    def packed(self) -> Iterator[bytes]:
        """Every address (packed), in model order."""
        addrs, width = self.addrs, self.width
        if width == 4:
            for i in range(0, len(addrs), 4):
                yield addrs[i : i + 4]
        else:
            for i in range(0, len(addrs), width):
                yield addrs[i + 1 : i + 1 + addrs[i]]

    def entries(self) -> Iterator[tuple[bytes, bytes]]:
        """(address, host label) per address, in model order."""
        hosts = self.hosts
        for k, packed in enumerate(self.packed()):
            host = hosts[k] if hosts is not None else b""
            yield packed, host or _dashed_label(packed)

    def position(self, packed: bytes) -> int:
        """Where `packed` is in `addrs` (-1 when it is not there)."""
        width = self.width
        if width == 4:
            if len(packed) != 4:
                return -1
            key = packed
        else:
            key = _slot(packed)
        i = self.addrs.find(key)
        while i >= 0 and i % width:
            i = self.addrs.find(key, i + 1)
        return i // width if i >= 0 else -1

    def host(self, packed: bytes) -> bytes | None:
        k = self.position(packed)
        if k < 0:
            return None
        return (self.hosts[k] if self.hosts is not None else b"") or _dashed_label(packed)

    def addresses(self, label: bytes) -> list[bytes]:
        """The addresses named `label` (several: a dual-stack hostname), in model order."""
        if self.hosts is None:
            packed = _undash(label)
            return [packed] if packed is not None and self.position(packed) >= 0 else []
        return [packed for packed, host in self.entries() if host == label]


def _endpoints(served: dict[bytes, bytes]) -> Endpoints | None:
    if not served:
        return None
    hosts = tuple(served.values()) if any(served.values()) else None
    if all(len(packed) == 4 for packed in served):
        return Endpoints(b"".join(served), hosts, 4)
    return Endpoints(b"".join(map(_slot, served)), hosts, _SLOT)


def _served(
    svc: DnsService, slices: tuple[DnsSlice, ...]
) -> Iterator[tuple[DnsSlice, bytes, bytes]]:
    """(slice, address, host label) per endpoint the service has names for (ready, or every
    endpoint with publishNotReadyAddresses), in model order; the address packed, the label
    b"" for the dashed address."""
    for sl in slices:
        addrs, ready, hosts = sl.addrs, sl.ready, sl.hosts
        width = len(addrs) // len(ready) if ready else 0  # 4 or 16: one family per slice
        for k in range(len(ready)):
            if ready[k] or svc.publish_not_ready:
                i = k * width
                yield sl, addrs[i : i + width], hosts[k] if hosts is not None else b""


def _cluster_endpoints(svc: DnsService, slices: tuple[DnsSlice, ...]) -> Endpoints | None:
    """A ClusterIP service's `Endpoints` (as `service_part` makes them, without its names):
    the first host label of an address wins."""
    served: dict[bytes, bytes] = {}
    for _, packed, host in _served(svc, slices):
        served.setdefault(packed, host)
    return _endpoints(served)


_ID_BITS = 24  # service numbers in `PtrOwners.v4`
_ID_MASK = (1 << _ID_BITS) - 1


class PtrOwners:
    """Per address, the services whose name its PTR answers with: per endpoint address the
    services it has a name in, or per cluster IP its services.

    IPv4 is one sorted array of `address << 24 | service number`: 8 bytes per address, where
    a dict keyed by address held ~90. IPv6 addresses (rarer) are a dict of service numbers.
    `services` maps numbers to service names (wire). Immutable once published.
    """

    __slots__ = ("services", "v4", "v6")

    def __init__(
        self, v4: array[int], v6: Mapping[bytes, tuple[int, ...]], services: list[bytes]
    ) -> None:
        self.v4 = v4
        self.v6 = v6
        self.services = services

    def owners(self, packed: bytes) -> list[bytes]:
        """The names of the services `packed` belongs to."""
        if len(packed) != 4:
            return [self.services[k] for k in self.v6.get(packed, ())]
        v4 = self.v4
        lo = int.from_bytes(packed, "big") << _ID_BITS
        hi = lo + (1 << _ID_BITS)
        out = []
        i = bisect_left(v4, lo)
        while i < len(v4) and v4[i] < hi:
            out.append(self.services[v4[i] & _ID_MASK])
            i += 1
        return out

    def addresses(self) -> Iterator[bytes]:
        """Every address (packed), once."""
        last = -1
        for key in self.v4:
            address = key >> _ID_BITS
            if address != last:
                yield address.to_bytes(4, "big")
                last = address
        yield from self.v6


@dataclass(frozen=True, slots=True)
class DnsIndex:
    """Everything the resolver needs to answer for the cluster zone at one model generation.

    stored:         the names kept with their records (the apex, empty non-terminals, and the
                    names of headless and ExternalName services).
    services:       per ClusterIP service name (wire), its `DnsService`: its names (the service,
                    its SRV names, its cluster IPs' PTRs) are made when asked (`service_part`).
    cluster_ptrs:   per cluster IP, the ClusterIP service name(s) its PTR answers with.
    endpoints:      per service name (wire), its `Endpoints`.
    endpoint_ptrs:  per endpoint address, the service name(s) it has a name in.
    `names` is the whole mapping, stored and synthesised (for tests and tools: it enumerates).
    """

    zone: bytes
    ttl: int
    pods_mode: str
    stored: Mapping[bytes, Node]
    services: Mapping[bytes, DnsService]
    cluster_ptrs: PtrOwners
    endpoints: Mapping[bytes, Endpoints]
    endpoint_ptrs: PtrOwners
    soa: RR
    synced: bool
    generation: int

    def lookup(self, name: bytes) -> Node | None:
        node = self.stored.get(name)
        if node is None:
            node = self._service_node(name)
        if node is not None and node is not EMPTY:
            return node
        made = self._endpoint_node(name)
        return made if made is not None else node

    def _service_node(self, name: bytes) -> Node | None:
        """A ClusterIP service's name, SRV name or `_<proto>` name, or a cluster IP's PTR."""
        if _is_reverse(name):
            ptr = self._cluster_ptr(name)
            if ptr is not None:
                return ptr
        services = self.services
        svc = services.get(name)
        if svc is None:
            if len(name) < 2 or name[1] != 0x5F:  # "_": an SRV name, or its `_<proto>` parent
                return None
            name_w = name[name[0] + 1 :]
            svc = services.get(name_w)
            if svc is None:
                if len(name_w) < 2 or name_w[1] != 0x5F:
                    return None
                svc = services.get(name_w[name_w[0] + 1 :])
                if svc is None:
                    return None
        part, _ = service_part(svc, (), svc_zone=b"\x03svc" + self.zone, ttl=self.ttl)
        return part.get(name)

    def _cluster_ptr(self, name: bytes) -> Node | None:
        packed = _unreverse(name)
        if packed is None:
            return None
        owners = self.cluster_ptrs.owners(packed)
        if not owners:
            return None
        if len(owners) > 1:
            owners = sorted(set(owners))
        return Node(tuple(name_rr(name, PTR, self.ttl, owner) for owner in owners), rank=0)

    def _endpoint_node(self, name: bytes) -> Node | None:
        if not name[0]:
            return None
        eps = self.endpoints.get(name[name[0] + 1 :])
        if eps is not None:
            found = eps.addresses(name[: name[0] + 1])
            if found:
                return Node(tuple(_address_rr(name, self.ttl, p) for p in found))
        if not _is_reverse(name):
            return None
        packed = _unreverse(name)
        if packed is None:
            return None
        rrs = []
        for service in self.endpoint_ptrs.owners(packed):
            host = self.endpoints[service].host(packed)
            if host is not None:
                rrs.append(name_rr(name, PTR, self.ttl, host + service))
        if not rrs:
            return None
        if len(rrs) > 1:
            rrs = sorted(_unique(rrs), key=lambda rr: rr.rdata)
        return Node(tuple(rrs), rank=1)

    @property
    def names(self) -> Mapping[bytes, Node]:
        return _Names(self)


class _Names(Mapping[bytes, Node]):
    """Every name of an index, the synthesised endpoint names and PTRs included."""

    def __init__(self, index: DnsIndex) -> None:
        self._index = index

    def __getitem__(self, name: bytes) -> Node:
        node = self._index.lookup(name)
        if node is None:
            raise KeyError(name)
        return node

    def __iter__(self) -> Iterator[bytes]:
        index = self._index
        seen = set(index.stored)
        yield from index.stored
        svc_zone = b"\x03svc" + index.zone
        made = (
            name
            for svc in index.services.values()
            for name in service_part(svc, (), svc_zone=svc_zone, ttl=index.ttl)[0]
        )
        endpoint_names = (
            host + service for service, eps in index.endpoints.items() for _, host in eps.entries()
        )
        ptrs = (
            reverse_packed(packed)
            for table in (index.cluster_ptrs, index.endpoint_ptrs)
            for packed in table.addresses()
        )
        for group in (made, endpoint_names, ptrs):
            for name in group:
                if name not in seen:
                    seen.add(name)
                    yield name

    def __len__(self) -> int:
        return sum(1 for _ in self)


# -- per-service contributions ----------------------------------------------------------------


def _label(text: str) -> bytes:
    raw = text.lower().encode("ascii")
    if not raw or len(raw) > 63 or b"." in raw:
        raise BadName(f"bad DNS label {text!r}")
    return bytes((len(raw),)) + raw


def _dashed(address: str) -> str:
    """CoreDNS's endpoint name for an address without hostname: dots or colons become dashes."""
    return address.replace(".", "-").replace(":", "-")


def _host_label(hostname: str, address: str) -> bytes | None:
    try:
        return _label(hostname or _dashed(address))
    except (BadName, UnicodeEncodeError):
        pass
    try:
        return _label(_dashed(address))
    except (BadName, UnicodeEncodeError):
        return None


def _is_reverse(name: bytes) -> bool:
    return name.endswith(_IN_ADDR) or name.endswith(_IP6)


def _family_ok(address: str, address_type: str) -> bool:
    if address_type == "IPv4":
        return ":" not in address
    if address_type == "IPv6":
        return ":" in address
    return False  # FQDN slices carry no addresses DNS can serve


def _unique(rrs: Iterable[RR]) -> tuple[RR, ...]:
    return tuple(dict.fromkeys(rrs))


def _srv_name(port: DnsPort, name_w: bytes) -> bytes | None:
    try:
        return _label("_" + port.name) + _label("_" + port.protocol) + name_w
    except (BadName, UnicodeEncodeError):
        return None


def _service_wire(namespace: str, name: str, svc_zone: bytes) -> bytes | None:
    try:
        return _label(name) + _label(namespace) + svc_zone
    except (BadName, UnicodeEncodeError):
        return None


def service_part(
    svc: DnsService, slices: tuple[DnsSlice, ...], *, svc_zone: bytes, ttl: int
) -> tuple[dict[bytes, Node], Endpoints | None]:
    """The names one service stores, with their records, and its `Endpoints` (whose names and
    PTRs are synthesised at lookup). `svc_zone` is `svc.<zone>` (wire)."""
    name_w = _service_wire(svc.namespace, svc.name, svc_zone)
    if name_w is None:
        return {}, None
    ns_w = name_w[name_w[0] + 1 :]
    part: dict[bytes, Node] = {ns_w: EMPTY}

    if svc.kind == KIND_EXTERNAL_NAME:
        target = svc.external_name.strip()
        try:
            pack_ip(target)
            return part, None  # CoreDNS serves no record for an IP "external name"
        except ValueError:
            pass
        try:
            target_w = to_wire(target)
        except BadName:
            return part, None
        if target_w != b"\x00":
            part[name_w] = Node((name_rr(name_w, CNAME, ttl, target_w),))
        return part, None

    headless = svc.kind == KIND_HEADLESS
    # address (packed) -> host label (b"": the dashed address), the first hostname wins
    served: dict[bytes, bytes] = {}
    srv_eps: dict[bytes, dict[tuple[int, bytes], None]] = {}  # headless: SRV name -> targets
    bare: list[tuple[int, bytes]] = []  # headless: (port, target) per endpoint address and port
    named: list[tuple[bytes, int]] = []  # headless: the current slice's SRV names and ports
    last: DnsSlice | None = None
    for sl, packed, label in _served(svc, slices):
        host = served.setdefault(packed, label)
        if not headless:
            continue
        if sl is not last:
            last = sl
            named = []
            for p in sl.ports:
                if p.name:
                    srv_w = _srv_name(p, name_w)
                    if srv_w is not None:
                        named.append((srv_w, p.port))
        owner = (host or _dashed_label(packed)) + name_w
        for srv_w, port in named:
            srv_eps.setdefault(srv_w, {})[(port, owner)] = None
        bare.extend((p.port, owner) for p in sl.ports if 0 < p.port < 65536)

    # headless: the endpoints' address records, in model order and by owner (several
    # addresses may share a hostname: dual-stack)
    ep_rrs: list[RR] = []
    by_owner: dict[bytes, list[RR]] = {}
    if headless:
        if not served:
            return part, None  # no ready endpoint: the name does not exist
        for packed, host in served.items():
            rr = _address_rr((host or _dashed_label(packed)) + name_w, ttl, packed)
            ep_rrs.append(rr)
            by_owner.setdefault(rr.owner, []).append(rr)
        service_rrs = _unique(_address_rr(name_w, ttl, packed) for packed in served)
    else:
        ip_rrs = []
        for ip in svc.cluster_ips:
            try:
                ip_rrs.append(a_rr(name_w, ttl, ip))
            except ValueError:
                continue
        service_rrs = _unique(ip_rrs)
        ips = len(service_rrs)
        bare = [(sp.port, name_w) for sp in svc.ports if 0 < sp.port < 65536 for _ in range(ips)]
    part[name_w] = _bare_srv(name_w, service_rrs, bare, ep_rrs, ttl=ttl)

    # SRV
    if headless:
        for srv_w, targets in srv_eps.items():
            weight = max(1, 100 // len(targets))
            srvs = tuple(
                srv_rr(srv_w, ttl, priority=0, weight=weight, port=port, target=owner)
                for port, owner in targets
            )
            glue = _unique(rr for _, owner in targets for rr in by_owner[owner])
            part[srv_w] = Node(srvs, glue)
            part.setdefault(srv_w[srv_w[0] + 1 :], EMPTY)
    else:
        for sp in svc.ports:
            if not sp.name:
                continue
            srv_w = _srv_name(sp, name_w)
            if srv_w is None:
                continue
            rr = srv_rr(srv_w, ttl, priority=0, weight=100, port=sp.port, target=name_w)
            prev = part.get(srv_w)
            part[srv_w] = Node((*prev.rrs, rr) if prev else (rr,), service_rrs)
            part.setdefault(srv_w[srv_w[0] + 1 :], EMPTY)

    # PTR of the cluster IPs (rank 0; the endpoints' PTRs, rank 1, are synthesised)
    for ip in svc.cluster_ips:
        try:
            rev = reverse_wire(ip)
        except ValueError:
            continue
        part[rev] = Node((name_rr(rev, PTR, ttl, name_w),), rank=0)
    return part, _endpoints(served)


def _bare_srv(
    name_w: bytes,
    service_rrs: tuple[RR, ...],
    bare: list[tuple[int, bytes]],
    ep_rrs: list[RR],
    *,
    ttl: int,
) -> Node:
    """The service name's node: its addresses, plus SRV records as CoreDNS serves them there.

    The specification defines SRV only at `_<port>._<proto>.<svc>...`; CoreDNS also answers SRV
    at the bare service name, for every port whatever its name or protocol, and users compare
    with CoreDNS, so kproxy does the same. `bare` holds one (port, target) per CoreDNS service
    entry: per port and cluster IP (ClusterIP; target the service name) or per endpoint address
    and port (headless; target the endpoint's name). Every record gets weight 100/entries,
    rounded down, at least 1; records with the same target and port are one record (so a
    dual-stack ClusterIP service with one port has one SRV of weight 50, as in CoreDNS). The
    additional section holds the targets' addresses.
    """
    if not bare:
        return Node(service_rrs)
    weight = max(1, 100 // len(bare))
    srvs = tuple(
        srv_rr(name_w, ttl, priority=0, weight=weight, port=port, target=target)
        for port, target in dict.fromkeys(bare)
    )
    targets = {target for _, target in bare}
    if targets == {name_w}:
        glue = service_rrs
    else:
        glue = _unique(rr for rr in ep_rrs if rr.owner in targets)
    return Node((*service_rrs, *srvs), glue)


class _PtrTable:
    """A `PtrOwners` being edited by the builder: an apply's IPv4 additions and removals are
    merged into a new sorted array at its end (`merge`); the IPv6 dict is copied before an
    apply changes it (`begin`), so what was published stays as it was."""

    __slots__ = ("_add", "_del", "v4", "v6")

    def __init__(self) -> None:
        self.v4: array[int] = array("Q")
        self.v6: dict[bytes, tuple[int, ...]] = {}
        self._add: array[int] = array("Q")
        self._del: array[int] = array("Q")

    def begin(self) -> None:
        self.v6 = dict(self.v6)

    def add(self, packed: bytes, number: int) -> None:
        if len(packed) == 4:
            self._add.append(int.from_bytes(packed, "big") << _ID_BITS | number)
        else:
            self.v6[packed] = (*self.v6.get(packed, ()), number)

    def remove(self, packed: bytes, number: int) -> None:
        if len(packed) == 4:
            self._del.append(int.from_bytes(packed, "big") << _ID_BITS | number)
        else:
            rest = tuple(k for k in self.v6.get(packed, ()) if k != number)
            if rest:
                self.v6[packed] = rest
            else:
                self.v6.pop(packed, None)

    def merge(self) -> None:
        """A new IPv4 array with this apply's removals and additions."""
        add, remove = self._add, self._del
        if add or remove:
            if len(add) + len(remove) <= 64:  # an endpoint change or two: edit a copy
                merged = array("Q", self.v4)
                for key in remove:
                    i = bisect_left(merged, key)
                    if i < len(merged) and merged[i] == key:
                        del merged[i]
                for key in add:
                    insort(merged, key)
            else:
                gone = set(remove)
                keys = [k for k in self.v4 if k not in gone] if gone else list(self.v4)
                keys.extend(add)
                keys.sort()
                merged = array("Q", keys)
            self.v4 = merged
        self._add, self._del = array("Q"), array("Q")


def _changed_endpoint_names(changed: set[bytes], service: bytes, eps: Endpoints) -> None:
    for packed, host in eps.entries():
        changed.add(host + service)
        changed.add(reverse_packed(packed))


class _Unchanged:
    """The type of `_UNCHANGED`: a service the delta does not change (only its slices)."""


_UNCHANGED = _Unchanged()


def _cluster_addresses(svc: DnsService) -> Iterable[bytes]:
    """The cluster IPs with a PTR (packed, once each), as `service_part` makes them."""
    out: dict[bytes, None] = {}
    for ip in svc.cluster_ips:
        try:
            out[pack_ip(ip)] = None
        except ValueError:
            continue
    return out


# -- the builder ------------------------------------------------------------------------------


class IndexBuilder:
    """Keeps each service and its contribution; produces a new `DnsIndex` per delta.

    Not thread-safe: one thread at a time applies deltas. The indexes it returns are immutable
    and may be read from any thread.

    Stored names come in two kinds: empty non-terminals (shared, reference-counted) and the
    names of headless and ExternalName services, each of which belongs to exactly one service
    (Kubernetes names are unique, and the shapes of service and SRV names cannot collide).
    Nothing else is stored as names: a ClusterIP service's names and its cluster IPs' PTRs are
    made at lookup from its `DnsService` (they depend on nothing else), endpoint names and PTRs
    from each service's `Endpoints` and, per address, the services it is in (`PtrOwners`).

    The builder keeps no endpoint slices: a delta carries the slices of every service it
    changes (`ModelDelta`).
    """

    def __init__(
        self,
        *,
        zone: str = "cluster.local",
        ttl: int = 5,
        pods_mode: str = PODS_INSECURE,
        ns_addresses: Iterable[str] = (),
    ) -> None:
        if pods_mode not in PODS_MODES:
            raise ValueError(f"pods_mode must be one of {PODS_MODES}, not {pods_mode!r}")
        self.zone = to_wire(zone)
        if self.zone == b"\x00":
            raise ValueError("the cluster zone cannot be the root")
        self.ttl = ttl
        self.pods_mode = pods_mode
        self._svc_zone = b"\x03svc" + self.zone
        self._ns_name = b"\x02ns\x03dns" + self.zone
        self._ns_addresses = tuple(ns_addresses)
        # headless and ExternalName services, and the names they store
        self._parts: dict[Ref, tuple[DnsService, dict[bytes, Node]]] = {}
        self._clusterip: dict[bytes, DnsService] = {}  # ClusterIP services, by name (wire)
        self._ents: dict[bytes, int] = {}
        self._eps: dict[bytes, Endpoints] = {}
        # the PTR owners (`PtrOwners`): service numbers, and the endpoints' and cluster IPs'
        # tables (numbers released by an apply are reused from the next one)
        self._ptr_ids: dict[bytes, int] = {}
        self._ptr_names: list[bytes] = []
        self._ptr_free: list[int] = []
        self._released: list[int] = []
        self._eptrs = _PtrTable()
        self._cptrs = _PtrTable()
        self._static = self._static_names(serial=1)
        self._names: dict[bytes, Node] = dict(self._static)
        self._synced = False
        self._generation = 0
        self.index = self._publish()

    # -- static names ------------------------------------------------------------------------
    def _static_names(self, *, serial: int) -> dict[bytes, Node]:
        ttl = self.ttl
        glue: list[RR] = []
        for addr in self._ns_addresses:
            try:
                packed = pack_ip(addr)
            except ValueError:
                continue
            if any(packed):  # not 0.0.0.0 / ::
                glue.append(a_rr(self._ns_name, ttl, addr))
        soa = soa_rr(
            self.zone,
            ttl,
            mname=self._ns_name,
            rname=b"\x0ahostmaster" + self.zone,
            serial=serial,
            minimum=ttl,
        )
        version = b"\x0bdns-version" + self.zone
        return {
            self.zone: Node((soa, name_rr(self.zone, NS, ttl, self._ns_name)), tuple(glue)),
            version: Node((txt_rr(version, DNS_VERSION_TTL, DNS_SCHEMA_VERSION),)),
            self._svc_zone: EMPTY,
            b"\x03pod" + self.zone: EMPTY,
            b"\x03dns" + self.zone: EMPTY,
            self._ns_name: Node(tuple(glue)),
        }

    # -- applying changes --------------------------------------------------------------------
    def apply(
        self, delta: ModelDelta, *, consume: bool = False
    ) -> tuple[DnsIndex, frozenset[bytes] | None]:
        """Apply `delta`; return the new index and the names whose answers changed.

        The changed set is None when every cached answer must go (full rebuild, or the synced
        flag flipped). It always contains the apex, whose SOA serial moves with each generation.
        `consume`: the caller will not use `delta` again, so each service's slices are dropped
        from it once applied (a worker's full build then reuses their memory as it goes, and
        keeps ~2 MB less heap at 10k x 10 than when all of them die at the end).
        """
        everything = delta.full or delta.synced != self._synced
        if delta.full:
            self._parts = {}
            self._clusterip = {}
            self._ents = {}
            self._names = {}
            self._eps = {}
            self._ptr_ids, self._ptr_names, self._ptr_free = {}, [], []
            self._eptrs, self._cptrs = _PtrTable(), _PtrTable()
        else:  # the published maps stay untouched
            self._names = dict(self._names)
            self._clusterip = dict(self._clusterip)
            self._eps = dict(self._eps)
            self._ptr_names = list(self._ptr_names)
            self._eptrs.begin()
            self._cptrs.begin()
        # a full answer-cache flush needs no list of names (at 10k x 10: 200k names of garbage)
        changed: set[bytes] | None = None if everything else set()
        self._static = self._static_names(serial=max(1, delta.generation))
        self._names.update(self._static)
        slices = delta.slices
        take = slices.pop if consume and isinstance(slices, dict) else slices.get
        for ref in delta.touched:
            self._update_service(
                ref,
                delta.services.get(ref, _UNCHANGED),
                take(ref, () if delta.full else None),
                changed,
            )
        self._eptrs.merge()
        self._cptrs.merge()
        for number in self._released:
            self._ptr_names[number] = b""
            self._ptr_free.append(number)
        self._released = []
        self._synced = delta.synced
        self._generation = delta.generation
        self.index = self._publish()
        if changed is None:
            return self.index, None
        changed.add(self.zone)
        return self.index, frozenset(changed)

    def _update_service(
        self,
        ref: Ref,
        new_svc: DnsService | _Unchanged | None,
        slices: tuple[DnsSlice, ...] | None,
        changed: set[bytes] | None,
    ) -> None:
        """Apply one service's change: `new_svc` is its new DnsService (None: deleted) or
        `_UNCHANGED`, `slices` its complete new slices (None: unchanged)."""
        if new_svc is not None and not isinstance(new_svc, _Unchanged) and slices is None:
            raise ValueError(f"the delta changes {ref} without its endpoint slices")
        service = _service_wire(ref.namespace, ref.name, self._svc_zone)
        if service is None:  # a name DNS cannot serve: the service contributes nothing
            return
        # A ClusterIP service (`made`) stores no names: they are made at lookup from its
        # DnsService, and depend on nothing else. Other services store their names (`part`).
        old_svc = self._clusterip.pop(service, None)
        other = self._parts.pop(ref, None)
        old_part = other[1] if other is not None else {}
        if not isinstance(new_svc, _Unchanged):
            svc = new_svc
        else:
            svc = old_svc if old_svc is not None else other[0] if other is not None else None
        made = svc is not None and svc.kind == KIND_CLUSTER_IP
        part: dict[bytes, Node]
        if made:
            assert svc is not None
            self._clusterip[service] = old_svc if old_svc == svc else svc
            part, eps = {}, _cluster_endpoints(svc, slices or ())
        elif svc is not None:
            part, eps = service_part(svc, slices or (), svc_zone=self._svc_zone, ttl=self.ttl)
        else:
            part, eps = {}, None
        if (made and old_svc == svc) or (part and part == old_part):
            # the names did not move (a service whose endpoints changed): keep the objects
            # already published rather than churn the heap with equal ones
            if old_part:
                assert svc is not None
                self._parts[ref] = (svc, old_part)
            self._set_endpoints(service, eps, changed)
            self._release_unused(service)
            return
        if changed is not None:
            old = self._names_of(old_svc) if old_svc is not None else old_part
            new = self._names_of(svc) if made and svc is not None else part
            for name in old.keys() | new.keys():
                if old.get(name) is not EMPTY or new.get(name) is not EMPTY:
                    changed.add(name)
        # a ClusterIP service stores only its namespace's empty non-terminal (shared)
        ns_w = service[service[0] + 1 :]
        old_stored = {ns_w: EMPTY} if old_svc is not None else old_part
        new_stored = {ns_w: EMPTY} if made else part
        if part:
            assert svc is not None
            self._parts[ref] = (svc, part)
        names = self._names
        for name, node in old_stored.items():
            if node is EMPTY:
                count = self._ents.get(name, 0) - 1
                if count > 0:
                    self._ents[name] = count
                else:
                    self._ents.pop(name, None)
            if name not in new_stored:
                self._recompute(name)
        for name, node in new_stored.items():
            if node is EMPTY:
                self._ents[name] = self._ents.get(name, 0) + 1
                if name not in names:
                    names[name] = EMPTY
            else:
                names[name] = node
        # the cluster IPs' PTRs
        if old_svc is not None:
            number = self._ptr_ids[service]
            for packed in _cluster_addresses(old_svc):
                self._cptrs.remove(packed, number)
        if made:
            assert svc is not None
            number = self._service_number(service)
            for packed in _cluster_addresses(svc):
                self._cptrs.add(packed, number)
        self._set_endpoints(service, eps, changed)
        self._release_unused(service)

    def _names_of(self, svc: DnsService) -> dict[bytes, Node]:
        """A ClusterIP service's names, as lookups make them."""
        return service_part(svc, (), svc_zone=self._svc_zone, ttl=self.ttl)[0]

    def _set_endpoints(
        self, service: bytes, eps: Endpoints | None, changed: set[bytes] | None
    ) -> None:
        """Replace a service's `Endpoints`: the PTR owners of its addresses follow."""
        old = self._eps.pop(service, None)
        if old is not None:
            if old == eps:
                self._eps[service] = old
                return
            number = self._ptr_ids[service]
            for packed in old.packed():
                self._eptrs.remove(packed, number)
            if changed is not None:
                _changed_endpoint_names(changed, service, old)
        if eps is None:
            return
        self._eps[service] = eps
        number = self._service_number(service)
        for packed in eps.packed():
            self._eptrs.add(packed, number)
        if changed is not None:
            _changed_endpoint_names(changed, service, eps)

    def _service_number(self, service: bytes) -> int:
        number = self._ptr_ids.get(service)
        if number is not None:
            return number
        if self._ptr_free:
            number = self._ptr_free.pop()
            self._ptr_names[number] = service
        else:
            number = len(self._ptr_names)
            if number > _ID_MASK:
                raise ValueError("more than 16M services with endpoints or cluster IPs")
            self._ptr_names.append(service)
        self._ptr_ids[service] = number
        return number

    def _release_unused(self, service: bytes) -> None:
        """Free a service's number once nothing refers to it (reused from the next apply)."""
        ids = self._ptr_ids
        if service in ids and service not in self._eps and service not in self._clusterip:
            self._released.append(ids.pop(service))

    def _recompute(self, name: bytes) -> None:
        """Set a shared or vanishing name from what is left of it."""
        node: Node | None = self._static.get(name)
        if node is None and self._ents.get(name):
            node = EMPTY
        if node is None:
            self._names.pop(name, None)
        else:
            self._names[name] = node

    def _publish(self) -> DnsIndex:
        return DnsIndex(
            zone=self.zone,
            ttl=self.ttl,
            pods_mode=self.pods_mode,
            # the builder copies these before it changes them: plain dicts are faster to read
            stored=self._names,
            services=self._clusterip,
            cluster_ptrs=PtrOwners(self._cptrs.v4, self._cptrs.v6, self._ptr_names),
            endpoints=self._eps,
            endpoint_ptrs=PtrOwners(self._eptrs.v4, self._eptrs.v6, self._ptr_names),
            soa=self._static[self.zone].rrs[0],
            synced=self._synced,
            generation=self._generation,
        )


def build_index(
    snapshot: Snapshot,
    *,
    zone: str = "cluster.local",
    ttl: int = 5,
    pods_mode: str = PODS_INSECURE,
    ns_addresses: Iterable[str] = (),
) -> DnsIndex:
    """The index for one snapshot, built from scratch."""
    builder = IndexBuilder(zone=zone, ttl=ttl, pods_mode=pods_mode, ns_addresses=ns_addresses)
    index, _ = builder.apply(diff_snapshots(None, snapshot))
    return index
