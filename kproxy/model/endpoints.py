"""Endpoint selection: from a Service port and its EndpointSlices to the endpoints that get traffic.

Two steps, both following kube-proxy (pkg/proxy/endpointslicecache.go and topology.go):

1. `merge_endpoints` joins every slice of a service for one service port: the slice port is matched
   by *name* (the service port's name, "" for an unnamed port) and protocol, and the slice's port
   number is the target port (this is how named targetPorts resolve per pod). Only slices of the
   wanted address family count. An address that appears in several slices is kept once, preferring
   a ready copy.
2. `categorize` applies readiness, terminating fallback, topology hints and the traffic policies and
   returns the endpoint sets each renderer needs.

Cost (every mode builds these for every service on a full sync: 100,000 endpoints at 10k
services x 10): an `EndpointInfo` is a 4-tuple (address, target port, is-local, the store's
shared `EndpointState`, whose conditions, hints and names it reads through), made with
`tuple.__new__` (a frozen dataclass of 9 fields cost ~7x more to make and 1.5x the memory); a
service whose port matches one slice of distinct addresses (nearly all) skips the duplicate
check; and the categorisation hands the merged tuple itself out as the cluster / local /
reachable sets when they are all of it (no copies, and the same objects in every set, which the
renderers rely on).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple

from kproxy.model.objects import IPV6, Endpoint, EndpointSlice, EndpointState, Service, ServicePort


class EndpointInfo(NamedTuple):
    """A resolved endpoint of one service port: address, target port and what the policies need
    (the conditions, hints and names are the store's `Endpoint` record's)."""

    ip: str
    port: int
    is_local: bool
    state: EndpointState

    @property
    def ready(self) -> bool:
        return self.state.ready

    @property
    def serving(self) -> bool:
        return self.state.serving

    @property
    def terminating(self) -> bool:
        return self.state.terminating

    @property
    def zone_hints(self) -> tuple[str, ...]:
        return self.state.zone_hints

    @property
    def hostname(self) -> str:
        return self.state.hostname

    @property
    def node_name(self) -> str:
        return self.state.node_name

    @property
    def hostport(self) -> str:
        """ip:port, with brackets for IPv6 (the text kube-proxy hashes into KUBE-SEP names)."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


_new = tuple.__new__
_address = attrgetter("address")
_node_name = attrgetter("node_name")
_state = attrgetter("state")
_ready = attrgetter("state.ready")


def _info(ep: Endpoint, port: int, node_name: str) -> EndpointInfo:
    state = ep.state
    return _new(
        EndpointInfo, (ep.address, port, bool(node_name) and state.node_name == node_name, state)
    )


def merge_endpoints(
    port: ServicePort,
    slices: Iterable[EndpointSlice],
    *,
    family: int,
    node_name: str,
) -> tuple[EndpointInfo, ...]:
    """All endpoints of `port` across `slices` for one IP family, sorted for stability
    (shortest ip:port first, then by text)."""
    wanted_type = "IPv6" if family == IPV6 else "IPv4"
    name, protocol = port.name, port.protocol
    matched: list[tuple[Sequence[Endpoint], int]] = []
    for sl in slices:
        if sl.address_type != wanted_type:
            continue
        for p in sl.ports:
            if p.name == name and p.protocol == protocol:
                matched.append((sl.endpoints, p.port))
                break
    if not matched:
        return ()
    if len(matched) == 1:
        eps, target = matched[0]
        addresses = list(map(_address, eps))
        by_address = dict(zip(addresses, eps, strict=True))
        n = len(by_address)
        if n == len(addresses):
            # One target port for all, so ordering by (len, ip) is ordering by (len, ip:port)
            # (two stable sorts); all of it in C (map / zip / repeat): this is the loop over
            # every endpoint of the cluster.
            addresses.sort()
            addresses.sort(key=len)
            states = list(map(_state, map(by_address.__getitem__, addresses)))
            local: Iterable[bool]
            if node_name and node_name in map(_node_name, states):
                local = map(node_name.__eq__, map(_node_name, states))
            else:
                local = repeat(False, n)
            return tuple(
                map(
                    _new,
                    repeat(EndpointInfo, n),
                    zip(addresses, repeat(target, n), local, states, strict=True),
                )
            )
    found: dict[str, EndpointInfo] = {}
    for eps, target in matched:
        for ep in eps:
            info = _info(ep, target, node_name)
            key = info.hostport
            old = found.get(key)
            if old is None or (info.state.ready and not old.state.ready):
                found[key] = info
    return tuple(found[k] for k in sorted(found, key=_sort_key))


def _sort_key(hostport: str) -> tuple[int, str]:
    return (len(hostport), hostport)


class Categorized(NamedTuple):
    """The endpoint sets of one service port after policies.

    cluster: endpoints for traffic under Cluster policy (None when no policy uses them).
    local:   endpoints for traffic under Local policy (None when no policy uses them).
    all_reachable: the union, i.e. every endpoint that may receive traffic on this node (used for
                   the "has endpoints" decision and conntrack cleanup).
    """

    cluster: tuple[EndpointInfo, ...] | None
    local: tuple[EndpointInfo, ...] | None
    all_reachable: tuple[EndpointInfo, ...]


def _usable(
    endpoints: tuple[EndpointInfo, ...], only_local: bool, zone: str | None
) -> tuple[EndpointInfo, ...]:
    """Ready endpoints, or serving+terminating ones when none is ready (KEP-1669 fallback).
    The result is `endpoints` itself when that is all of them."""
    pool = endpoints
    if only_local:
        pool = tuple(e for e in pool if e.is_local)
    if zone is not None:
        pool = tuple(e for e in pool if zone in e.state.zone_hints)
    if all(map(_ready, pool)):
        return pool
    ready = tuple(e for e in pool if e.state.ready)
    if ready:
        return ready
    return tuple(e for e in pool if e.state.serving and e.state.terminating)


def _topology_zone(
    service: Service, endpoints: Sequence[EndpointInfo], node_zone: str
) -> str | None:
    """The zone to filter on, or None: hints are used only when every ready endpoint has hints
    and at least one hint names this node's zone (kube-proxy's canUseTopology)."""
    if not service.topology_aware or not node_zone:
        return None
    ready = [e.state for e in endpoints if e.state.ready]
    if not ready or any(not e.zone_hints for e in ready):
        return None
    if not any(node_zone in e.zone_hints for e in ready):
        return None
    return node_zone


def has_external_addresses(service: Service) -> bool:
    """Whether some port of `service` takes external traffic (externalIPs, LoadBalancer ingress
    IPs, a NodePort), in any family."""
    return bool(
        service.external_ips or service.load_balancer_ips or any(p.node_port for p in service.ports)
    )


def categorize(
    service: Service,
    endpoints: Sequence[EndpointInfo],
    *,
    node_zone: str = "",
    has_external: bool | None = None,
) -> Categorized:
    """Apply readiness, the terminating fallback, topology hints and traffic policies.

    Service traffic from inside the cluster follows internalTrafficPolicy; external traffic
    (NodePort, LoadBalancer, externalIPs) follows externalTrafficPolicy. Local policy ignores
    topology, as in kube-proxy. `has_external`: `has_external_addresses(service)`, when the
    caller has it already.
    """
    if has_external is None:
        has_external = has_external_addresses(service)
    eps = endpoints if type(endpoints) is tuple else tuple(endpoints)
    # External traffic from pods and the node itself short-circuits to the cluster endpoints
    # even under externalTrafficPolicy Local (kube-proxy's UsesClusterEndpoints).
    uses_cluster = not service.internal_policy_local or has_external
    uses_local = service.internal_policy_local or (has_external and service.external_policy_local)

    cluster: tuple[EndpointInfo, ...] | None = None
    local: tuple[EndpointInfo, ...] | None = None
    if uses_cluster:
        zone = _topology_zone(service, eps, node_zone) if service.topology_aware else None
        cluster = _usable(eps, False, zone)
    if uses_local:
        local = _usable(eps, True, None)

    if cluster is None:
        reachable = local or ()
    elif local is None or not local or local is cluster:
        reachable = cluster
    else:
        seen = {e.hostport for e in cluster}
        rest = tuple(e for e in local if e.hostport not in seen)
        reachable = cluster + rest if rest else cluster
    return Categorized(cluster, local, reachable)
