"""The per-service-port decisions every dataplane mode translates, made once.

kube-proxy makes these decisions in one place (`pkg/proxy/topology.go`, `CategorizeEndpoints`,
plus a few lines at the top of each proxier's per-service loop) and each proxier only writes
them into its dataplane. kproxy does the same: `decide` turns a service port and its categorized
endpoints (kproxy.model.endpoints) into a `PortDecision`; the iptables, IPVS, nftables and
userspace modes read it and make no policy decision of their own.

The vocabulary, for one service port in one IP family on this node:

- *internal* traffic is addressed to the ClusterIP and follows internalTrafficPolicy;
- *external* traffic is addressed to a NodePort, a LoadBalancer ingress IP or an externalIP and
  follows externalTrafficPolicy;
- *has_endpoints* is kube-proxy's hasEndpoints: some endpoint anywhere in the cluster could serve
  the service (ready, or serving+terminating as the fallback). Without any, traffic is REJECTed
  (the client learns at once); with some but none this node may use (a Local policy and no local
  endpoint), traffic is DROPped (a load balancer's health check moves it elsewhere);
- under externalTrafficPolicy Local, traffic from pods and from the node itself to an external
  address is *short-circuited* to the cluster-wide endpoints, as if it had gone out to the load
  balancer and come back (kube-proxy's "pod traffic for ... external destinations" rules);
- external traffic under externalTrafficPolicy Cluster is masqueraded (the endpoint may be on
  another node and must reply through this one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from enum import Enum
from operator import attrgetter
from typing import NamedTuple

from kproxy.model.endpoints import Categorized, EndpointInfo, categorize
from kproxy.model.objects import Service


class Verdict(Enum):
    """What a packet for a service address gets on this node."""

    FORWARD = "forward"  # DNAT (or proxy) to one of the decided endpoints
    REJECT = "reject"  # no endpoint anywhere: ICMP port unreachable / TCP RST
    DROP = "drop"  # endpoints exist, but none this traffic may use on this node


class PortDecision(NamedTuple):
    """Everything a mode needs to know about one service port, decided.

    internal / external: the endpoints that get internal / external traffic (empty unless the
    matching verdict is FORWARD). cluster / local: the cluster-wide and node-local endpoint sets
    after readiness, the terminating fallback and topology (None when no policy uses them);
    each mode that keeps per-policy structures (kube-proxy's KUBE-SVC / KUBE-SVL chains) builds
    one per non-empty set. all_reachable: every endpoint that may get traffic here (conntrack
    cleanup, hairpin masquerade).

    A NamedTuple rather than a frozen dataclass: one is made per service port and family on
    every full sync (10,000s), and a 16-field frozen dataclass costs ~8x as much to make.
    """

    has_endpoints: bool
    internal_local: bool
    internal: tuple[EndpointInfo, ...]
    internal_verdict: Verdict
    external_local: bool
    has_external: bool
    external: tuple[EndpointInfo, ...]
    external_verdict: Verdict
    masquerade_external: bool
    short_circuit: tuple[EndpointInfo, ...]
    firewall: bool
    affinity_timeout: int
    health_check_node_port: int
    cluster: tuple[EndpointInfo, ...] | None
    local: tuple[EndpointInfo, ...] | None
    all_reachable: tuple[EndpointInfo, ...]

    @property
    def no_endpoints_verdict(self) -> Verdict:
        """The verdict for traffic this node cannot serve: REJECT when no endpoint exists
        anywhere, DROP when only the Local policy keeps them out of reach."""
        return Verdict.DROP if self.has_endpoints else Verdict.REJECT

    @property
    def uses_external_chain(self) -> bool:
        """External destinations exist and something can be done with their traffic (kube-proxy
        writes its EXT chain only then; with no endpoints at all they are rejected)."""
        return self.has_endpoints and self.has_external


def _usable(endpoints: Iterable[EndpointInfo]) -> bool:
    return any(e.ready or (e.serving and e.terminating) for e in endpoints)


def decide(
    service: Service,
    endpoints: tuple[EndpointInfo, ...],
    categorized: Categorized,
    *,
    has_external: bool,
    has_load_balancer_ips: bool,
    has_source_ranges: bool,
) -> PortDecision:
    """The decisions for one service port from its merged endpoints and their categorization."""
    cluster = categorized.cluster
    local = categorized.local or ()
    # kube-proxy's hasEndpoints: usable endpoints anywhere, not only on this node
    has_any = bool(cluster) if cluster is not None else _usable(endpoints)
    internal_local = service.internal_policy_local
    external_local = service.external_policy_local

    internal = local if internal_local else (cluster or ())
    external = local if external_local else (cluster or ())
    internal_ok = has_any and bool(internal)
    external_ok = has_any and has_external and bool(external)
    no_eps = Verdict.DROP if has_any else Verdict.REJECT
    hc = service.health_check_node_port
    return PortDecision(
        has_endpoints=has_any,
        internal_local=internal_local,
        internal=internal if internal_ok else (),
        internal_verdict=Verdict.FORWARD if internal_ok else no_eps,
        external_local=external_local,
        has_external=has_external,
        external=external if external_ok else (),
        external_verdict=Verdict.FORWARD if external_ok else no_eps,
        masquerade_external=not external_local,
        short_circuit=(cluster or ()) if external_local else (),
        firewall=has_load_balancer_ips and has_source_ranges,
        affinity_timeout=service.affinity_timeout,
        health_check_node_port=(
            hc if hc and external_local and service.type == "LoadBalancer" else 0
        ),
        cluster=cluster,
        local=categorized.local,
        all_reachable=categorized.all_reachable,
    )


def decide_all_ready(
    service: Service,
    endpoints: tuple[EndpointInfo, ...],
    *,
    has_external: bool,
    has_load_balancer_ips: bool,
    has_source_ranges: bool,
) -> PortDecision:
    """`decide` for the common case, without categorising: a service with Cluster traffic
    policies for both kinds of traffic and no topology hints in use, whose merged endpoints are
    all ready. Then the cluster-wide set is every endpoint, there is no local set, and every
    set handed out is `endpoints` itself (equal to `decide(service, endpoints,
    categorize(...))`: tests/unit/test_views_reference.py)."""
    has_any = bool(endpoints)
    external_ok = has_any and has_external
    verdict = Verdict.FORWARD if has_any else Verdict.REJECT
    no_external = Verdict.DROP if has_any else Verdict.REJECT  # as decide() has it
    return PortDecision(
        has_endpoints=has_any,
        internal_local=False,
        internal=endpoints,
        internal_verdict=verdict,
        external_local=False,
        has_external=has_external,
        external=endpoints if external_ok else (),
        external_verdict=Verdict.FORWARD if external_ok else no_external,
        masquerade_external=True,
        short_circuit=(),
        firewall=has_load_balancer_ips and has_source_ranges,
        affinity_timeout=service.affinity_timeout,
        health_check_node_port=0,
        cluster=endpoints,
        local=None,
        all_reachable=endpoints,
    )


_ready = attrgetter("state.ready")


def decide_port(
    service: Service,
    endpoints: tuple[EndpointInfo, ...],
    *,
    node_zone: str,
    has_external_addresses: bool,
    has_external: bool,
    has_load_balancer_ips: bool,
    has_source_ranges: bool,
) -> PortDecision:
    """The decisions for one service port from its merged endpoints: `decide_all_ready` when
    the service has Cluster policies, no topology and every endpoint is ready (most ports of
    most clusters), else `decide` over the categorised endpoints (`has_external_addresses`:
    the service's, for `categorize`)."""
    cluster_only = not (
        service.internal_policy_local or service.external_policy_local or service.topology_aware
    )
    if cluster_only and all(map(_ready, endpoints)):
        return decide_all_ready(
            service,
            endpoints,
            has_external=has_external,
            has_load_balancer_ips=has_load_balancer_ips,
            has_source_ranges=has_source_ranges,
        )
    return decide(
        service,
        endpoints,
        categorize(service, endpoints, node_zone=node_zone, has_external=has_external_addresses),
        has_external=has_external,
        has_load_balancer_ips=has_load_balancer_ips,
        has_source_ranges=has_source_ranges,
    )


def node_in_source_ranges(
    source_ranges: Iterable[str], node_ips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> bool:
    """Whether a LoadBalancer's source ranges admit one of the node's own addresses: then the
    node may reach the LB IP with the LB IP itself as source (VIP-style load balancers), and
    every mode lets that through too (kube-proxy's allowFromNode)."""
    nets = [ipaddress.ip_network(cidr.strip(), strict=False) for cidr in source_ranges]
    return any(ip in net for net in nets for ip in node_ips if ip.version == net.version)
