"""Endpoint selection: from a Service port and its EndpointSlices to the endpoints that get traffic.

Two steps, both following kube-proxy (pkg/proxy/endpointslicecache.go and topology.go):

1. `merge_endpoints` joins every slice of a service for one service port: the slice port is matched
   by *name* (the service port's name, "" for an unnamed port) and protocol, and the slice's port
   number is the target port (this is how named targetPorts resolve per pod). Only slices of the
   wanted address family count. An address that appears in several slices is kept once, preferring
   a ready copy.
2. `categorize` applies readiness, terminating fallback, topology hints and the traffic policies and
   returns the endpoint sets each renderer needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kproxy.model.objects import IPV6, EndpointSlice, Service, ServicePort


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """A resolved endpoint of one service port: address, target port and what the policies need."""

    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    is_local: bool
    zone_hints: tuple[str, ...] = ()
    hostname: str = ""
    node_name: str = ""

    @property
    def hostport(self) -> str:
        """ip:port, with brackets for IPv6 (the text kube-proxy hashes into KUBE-SEP names)."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def merge_endpoints(
    port: ServicePort,
    slices: Iterable[EndpointSlice],
    *,
    family: int,
    node_name: str,
) -> tuple[EndpointInfo, ...]:
    """All endpoints of `port` across `slices` for one IP family, sorted for stability."""
    wanted_type = "IPv6" if family == IPV6 else "IPv4"
    found: dict[str, EndpointInfo] = {}
    for sl in slices:
        if sl.address_type != wanted_type:
            continue
        target = next(
            (p.port for p in sl.ports if p.name == port.name and p.protocol == port.protocol), None
        )
        if target is None:
            continue
        for ep in sl.endpoints:
            info = EndpointInfo(
                ip=ep.address,
                port=target,
                ready=ep.ready,
                serving=ep.serving,
                terminating=ep.terminating,
                is_local=bool(node_name) and ep.node_name == node_name,
                zone_hints=ep.zone_hints,
                hostname=ep.hostname,
                node_name=ep.node_name,
            )
            key = info.hostport
            old = found.get(key)
            if old is None or (info.ready and not old.ready):
                found[key] = info
    return tuple(found[k] for k in sorted(found, key=_sort_key))


def _sort_key(hostport: str) -> tuple[int, str]:
    return (len(hostport), hostport)


@dataclass(frozen=True, slots=True)
class Categorized:
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
    endpoints: Sequence[EndpointInfo], *, only_local: bool, zone: str | None
) -> tuple[EndpointInfo, ...]:
    """Ready endpoints, or serving+terminating ones when none is ready (KEP-1669 fallback)."""
    pool = [e for e in endpoints if e.is_local] if only_local else list(endpoints)
    if zone is not None:
        pool = [e for e in pool if zone in e.zone_hints]
    ready = tuple(e for e in pool if e.ready)
    if ready:
        return ready
    return tuple(e for e in pool if e.serving and e.terminating)


def _topology_zone(
    service: Service, endpoints: Sequence[EndpointInfo], node_zone: str
) -> str | None:
    """The zone to filter on, or None: hints are used only when every ready endpoint has hints
    and at least one hint names this node's zone (kube-proxy's canUseTopology)."""
    if not service.topology_aware or not node_zone:
        return None
    ready = [e for e in endpoints if e.ready]
    if not ready or any(not e.zone_hints for e in ready):
        return None
    if not any(node_zone in e.zone_hints for e in ready):
        return None
    return node_zone


def categorize(
    service: Service,
    endpoints: Sequence[EndpointInfo],
    *,
    node_zone: str = "",
) -> Categorized:
    """Apply readiness, the terminating fallback, topology hints and traffic policies.

    Service traffic from inside the cluster follows internalTrafficPolicy; external traffic
    (NodePort, LoadBalancer, externalIPs) follows externalTrafficPolicy. Local policy ignores
    topology, as in kube-proxy.
    """
    has_external = bool(
        service.external_ips or service.load_balancer_ips or any(p.node_port for p in service.ports)
    )
    # External traffic from pods and the node itself short-circuits to the cluster endpoints
    # even under externalTrafficPolicy Local (kube-proxy's UsesClusterEndpoints).
    uses_cluster = not service.internal_policy_local or has_external
    uses_local = service.internal_policy_local or (has_external and service.external_policy_local)

    cluster: tuple[EndpointInfo, ...] | None = None
    local: tuple[EndpointInfo, ...] | None = None
    if uses_cluster:
        zone = _topology_zone(service, endpoints, node_zone)
        cluster = _usable(endpoints, only_local=False, zone=zone)
    if uses_local:
        local = _usable(endpoints, only_local=True, zone=None)

    if cluster is None:
        reachable = local or ()
    elif local is None:
        reachable = cluster
    else:
        seen = {e.hostport for e in cluster}
        reachable = cluster + tuple(e for e in local if e.hostport not in seen)
    return Categorized(cluster=cluster, local=local, all_reachable=reachable)
