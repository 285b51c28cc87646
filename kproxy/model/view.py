"""Service ports as the dataplane renderers see them: one `ServicePortView` per service port and
IP family, with its addresses of that family, its endpoints and the decisions every mode
translates (`decision`, kproxy.model.decisions).

Both the iptables and the IPVS renderers consume these views; `kproxy status` and `kproxy explain`
use them to say what *should* be programmed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from kproxy.model.decisions import PortDecision, decide_port
from kproxy.model.endpoints import (
    EndpointInfo,
    has_external_addresses,
    merge_endpoints,
)
from kproxy.model.objects import EndpointSlice, Ref, Service, ServicePort, ip_family
from kproxy.model.store import Snapshot


class ServicePortView(NamedTuple):
    """Everything a dataplane needs about one service port in one IP family (immutable; a
    NamedTuple because every full sync makes one per service port, see PortDecision)."""

    service: Service
    port: ServicePort
    family: int
    cluster_ip: str
    external_ips: tuple[str, ...]
    load_balancer_ips: tuple[str, ...]
    source_ranges: tuple[str, ...]
    endpoints: tuple[EndpointInfo, ...]
    decision: PortDecision

    @property
    def name(self) -> str:
        """kube-proxy's ServicePortName text: ns/svc:portname (no colon for an unnamed port)."""
        base = f"{self.service.namespace}/{self.service.name}"
        return f"{base}:{self.port.name}" if self.port.name else base

    @property
    def protocol(self) -> str:
        return self.port.protocol

    @property
    def node_port(self) -> int:
        return self.port.node_port

    @property
    def has_external(self) -> bool:
        return bool(self.external_ips or self.load_balancer_ips or self.port.node_port)


def _of_family(addresses: Iterable[str], family: int) -> tuple[str, ...]:
    return tuple(a for a in addresses if ip_family(a) == family)


def _cidrs_of_family(cidrs: Iterable[str], family: int) -> tuple[str, ...]:
    return tuple(c for c in cidrs if ipaddress.ip_network(c, strict=False).version == family)


def service_views(
    service: Service,
    slices: Iterable[EndpointSlice],
    *,
    family: int,
    node_name: str,
    node_zone: str = "",
) -> tuple[ServicePortView, ...]:
    """The views of one service for one family; empty when the service is not proxied there."""
    if not service.proxied:
        return ()
    cluster_ip = next((ip for ip in service.cluster_ips if ip_family(ip) == family), None)
    if cluster_ip is None:
        return ()
    slices = tuple(slices)
    # per service, not per port (a plain ClusterIP service has none of them)
    external_ips = _of_family(service.external_ips, family) if service.external_ips else ()
    lb_ips = _of_family(service.load_balancer_ips, family) if service.load_balancer_ips else ()
    source_ranges = (
        _cidrs_of_family(service.load_balancer_source_ranges, family)
        if service.load_balancer_source_ranges
        else ()
    )
    any_external = has_external_addresses(service)
    views = []
    for port in service.ports:
        endpoints = merge_endpoints(port, slices, family=family, node_name=node_name)
        decision = decide_port(
            service,
            endpoints,
            node_zone=node_zone,
            has_external_addresses=any_external,
            has_external=bool(external_ips or lb_ips or port.node_port),
            has_load_balancer_ips=bool(lb_ips),
            has_source_ranges=bool(source_ranges),
        )
        views.append(
            ServicePortView(
                service,
                port,
                family,
                cluster_ip,
                external_ips,
                lb_ips,
                source_ranges,
                endpoints,
                decision,
            )
        )
    return tuple(views)


def build_views(
    snapshot: Snapshot, *, family: int, node_name: str, refs: Iterable[Ref] | None = None
) -> Mapping[Ref, tuple[ServicePortView, ...]]:
    """Views for every proxied service of `snapshot` (or only `refs`), keyed by service.

    A ref of a deleted or unproxied service maps to an empty tuple, so partial syncs can tell
    "remove this service's rules" from "not asked about".
    """
    zone = snapshot.node.zone if snapshot.node else ""
    wanted = snapshot.services.keys() if refs is None else refs
    out: dict[Ref, tuple[ServicePortView, ...]] = {}
    for ref in wanted:
        svc = snapshot.services.get(ref)
        out[ref] = (
            service_views(
                svc, snapshot.slices_for(ref), family=family, node_name=node_name, node_zone=zone
            )
            if svc is not None
            else ()
        )
    return out
