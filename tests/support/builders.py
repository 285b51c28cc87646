"""Small builders for model objects in tests: make_service(ns, name, **overrides) etc."""

from __future__ import annotations

from typing import Any

from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice, Service, ServicePort
from kproxy.model.store import Store

P80 = (EndpointPort("p80", "TCP", 80),)


def make_port(
    port: int = 80,
    *,
    name: str = "",
    protocol: str = "TCP",
    target: int | str | None = None,
    node_port: int = 0,
) -> ServicePort:
    return ServicePort(
        name=name,
        protocol=protocol,
        port=port,
        target_port=port if target is None else target,
        node_port=node_port,
    )


def make_service(ns: str = "ns1", name: str = "svc1", **overrides: Any) -> Service:
    fields: dict[str, Any] = {
        "type": "ClusterIP",
        "cluster_ips": ("172.30.0.41",),
        "ports": (make_port(80, name="p80"),),
    }
    fields.update(overrides)
    return Service(namespace=ns, name=name, **fields)


def make_endpoint(address: str, **overrides: Any) -> Endpoint:
    return Endpoint(address=address, **overrides)


def make_slice(
    ns: str = "ns1",
    service: str = "svc1",
    *,
    name: str | None = None,
    endpoints: tuple[Endpoint, ...] | list[Endpoint] = (),
    ports: tuple[EndpointPort, ...] | list[EndpointPort] = P80,
    address_type: str = "IPv4",
    trigger_time: float | None = None,
) -> EndpointSlice:
    return EndpointSlice(
        namespace=ns,
        name=name or f"{service}-abcde",
        service_name=service,
        address_type=address_type,
        endpoints=tuple(endpoints),
        ports=tuple(ports),
        trigger_time=trigger_time,
    )


def numbered_store(n: int, **service: Any) -> Store:
    """A store of `n` services s0, s1, ... (ClusterIP 172.30.0.<i+1>, `service` overrides), each
    with one ready endpoint 10.1.0.<i+1>: the proxiers' fake-based unit tests start from it."""
    store = Store()
    store.replace_services(
        [
            make_service(name=f"s{i}", cluster_ips=(f"172.30.0.{i + 1}",), **service)
            for i in range(n)
        ]
    )
    store.replace_slices(
        [
            make_slice(service=f"s{i}", endpoints=[make_endpoint(f"10.1.0.{i + 1}")])
            for i in range(n)
        ]
    )
    return store
