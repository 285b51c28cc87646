"""The lean, immutable objects kproxy's whole pipeline shares.

These are kproxy's own view of Services, EndpointSlices and the Node: only the fields the dataplane
and DNS use, already validated and normalised (IP strings in canonical form, protocols upper-case).
Everything here is a frozen dataclass, so a snapshot can be handed to the renderers, the DNS index
and the inspection commands without copying and without locks.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import NamedTuple

TCP = "TCP"
UDP = "UDP"
SCTP = "SCTP"
PROTOCOLS = (TCP, UDP, SCTP)

IPV4 = 4
IPV6 = 6


class Ref(NamedTuple):
    """namespace/name of a namespaced object."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def ip_family(address: str) -> int:
    """4 or 6 for a canonical IP address string."""
    return IPV6 if ":" in address else IPV4


def canonical_ip(address: str) -> str:
    """The canonical text of an IP address; ValueError for anything that is not one."""
    return str(ipaddress.ip_address(address.strip()))


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One entry of spec.ports. target_port is a number or a container port name."""

    name: str
    protocol: str
    port: int
    target_port: int | str
    node_port: int = 0


@dataclass(frozen=True, slots=True)
class Service:
    """A Service as kproxy uses it.

    `cluster_ips` is empty for headless and ExternalName services. `load_balancer_ips` holds the
    status ingress IPs kproxy must answer (ingress entries with ipMode Proxy are already dropped).
    `affinity_timeout` is the ClientIP affinity timeout in seconds, 0 when there is no affinity.
    """

    namespace: str
    name: str
    type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()
    headless: bool = False
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    external_name: str = ""
    affinity_timeout: int = 0
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0
    publish_not_ready: bool = False
    topology_aware: bool = False
    ipvs_scheduler: str = ""
    # kube-proxy ignores services labelled service.kubernetes.io/service-proxy-name or
    # service.kubernetes.io/headless; DNS still serves them.
    skip_proxy: bool = False

    @property
    def ref(self) -> Ref:
        return Ref(self.namespace, self.name)

    @property
    def is_external_name(self) -> bool:
        return self.type == "ExternalName"

    @property
    def proxied(self) -> bool:
        """True when the dataplane handles this service (it has a cluster IP)."""
        return bool(self.cluster_ips) and not self.is_external_name and not self.skip_proxy


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of an EndpointSlice with its conditions (nil conditions already defaulted)."""

    address: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    hostname: str = ""
    node_name: str = ""
    zone: str = ""
    zone_hints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    address_type: str = "IPv4"
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()
    trigger_time: float | None = None

    @property
    def ref(self) -> Ref:
        return Ref(self.namespace, self.name)

    @property
    def service_ref(self) -> Ref:
        return Ref(self.namespace, self.service_name)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    zone: str = ""
    addresses: tuple[str, ...] = ()
    deleting: bool = False
    labels: tuple[tuple[str, str], ...] = field(default=())
