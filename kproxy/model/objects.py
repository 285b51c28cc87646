"""The lean, immutable objects kproxy's whole pipeline shares.

These are kproxy's own view of Services, EndpointSlices and the Node: only the fields the dataplane
and DNS use, already validated and normalised (IP strings in canonical form, protocols upper-case).
Everything here is a frozen dataclass, so a snapshot can be handed to the renderers, the DNS index
and the inspection commands without copying and without locks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, TypeVar

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


_shared: dict[object, object] = {}
_MAX_SHARED = 1 << 16
H = TypeVar("H", bound=Hashable)


def shared(value: H) -> H:
    """One object for every equal copy of an immutable value that repeats across the model's
    objects (service and slice ports and their tuples: at 10k services most are alike), like
    `sys.intern` for strings. The table keeps at most 65,536 values; past that, values are
    returned as they are."""
    got = _shared.get(value)
    if got is not None:
        return got  # type: ignore[return-value]
    if len(_shared) < _MAX_SHARED:
        _shared[value] = value
    return value


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
class EndpointState:
    """What an endpoint of an EndpointSlice has besides its address: its conditions (nil ones
    already defaulted), hostname, node, zone and topology hints. Endpoints share these: most
    of a cluster's endpoints are ready pods on one of a few nodes and zones, so `Endpoint`
    keeps one interned `EndpointState` instead of seven fields of its own."""

    ready: bool = True
    serving: bool = True
    terminating: bool = False
    hostname: str = ""
    node_name: str = ""
    zone: str = ""
    zone_hints: tuple[str, ...] = ()


_StateKey = tuple[bool, bool, bool, str, str, str, tuple[str, ...]]
_states: dict[_StateKey, EndpointState] = {}


def endpoint_state(
    *,
    ready: bool = True,
    serving: bool = True,
    terminating: bool = False,
    hostname: str = "",
    node_name: str = "",
    zone: str = "",
    zone_hints: tuple[str, ...] = (),
) -> EndpointState:
    """The shared `EndpointState` with these values. Interned only without a hostname (the
    combinations of conditions, nodes, zones and hints are few, hostnames are per pod), so the
    table stays as small as the cluster's set of nodes and zones."""
    key = (ready, serving, terminating, hostname, node_name, zone, zone_hints)
    state = _states.get(key)
    if state is None:
        state = EndpointState(*key)
        if not hostname and len(_states) < _MAX_STATES:
            _states[key] = state
    return state


_MAX_STATES = 1 << 16
_READY = endpoint_state()


@dataclass(frozen=True, slots=True, init=False)
class Endpoint:
    """One address of an EndpointSlice with its conditions (nil conditions already defaulted).

    Made like a record of all its fields (`Endpoint(address, ready=..., node_name=...)`) and read
    the same way (`ep.ready`, `ep.node_name`, ...), but it holds two: the address and the
    shared `EndpointState` (48 bytes instead of 96; at 10k services x 10 endpoints the store
    holds 100,000 of them)."""

    address: str
    state: EndpointState

    # what kproxy.model.codec writes and reads: the fields as the constructor takes them
    __codec_fields__: ClassVar[tuple[str, ...]] = (
        "address",
        "ready",
        "serving",
        "terminating",
        "hostname",
        "node_name",
        "zone",
        "zone_hints",
    )

    def __init__(
        self,
        address: str,
        state: EndpointState | None = None,
        *,
        ready: bool = True,
        serving: bool = True,
        terminating: bool = False,
        hostname: str = "",
        node_name: str = "",
        zone: str = "",
        zone_hints: tuple[str, ...] = (),
    ) -> None:
        if state is None:
            if (
                ready
                and serving
                and not (terminating or hostname or node_name or zone or zone_hints)
            ):
                state = _READY
            else:
                state = endpoint_state(
                    ready=ready,
                    serving=serving,
                    terminating=terminating,
                    hostname=hostname,
                    node_name=node_name,
                    zone=zone,
                    zone_hints=tuple(zone_hints),
                )
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "state", state)

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
    def hostname(self) -> str:
        return self.state.hostname

    @property
    def node_name(self) -> str:
        return self.state.node_name

    @property
    def zone(self) -> str:
        return self.state.zone

    @property
    def zone_hints(self) -> tuple[str, ...]:
        return self.state.zone_hints


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
