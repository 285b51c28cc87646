"""Raw Kubernetes JSON (dicts from the API or from manifests) -> kproxy's model objects.

Pure and strict: every function either returns a valid model object or raises `InvalidObject`
with a reason. No `kubernetes` import here: the API source hands us parsed JSON directly, which
is an order of magnitude faster than the client's generated model classes.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Any

from kproxy.model.objects import (
    PROTOCOLS,
    TCP,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    NodeInfo,
    Service,
    ServicePort,
    canonical_ip,
    ip_family,
)

RawObject = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SKIP_LABELS = ("service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless")
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
IPVS_SCHEDULER_ANNOTATION = "kproxy.io/ipvs-scheduler"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


class InvalidObject(ValueError):
    """A Kubernetes object kproxy cannot use; the message says why."""


def object_ref(obj: RawObject) -> tuple[str, str]:
    """(namespace, name) of a raw object, for log lines; tolerant of garbage."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return ("?", "?")
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or "?"))


def _meta(obj: RawObject) -> tuple[str, str, dict[str, str], dict[str, str]]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        raise InvalidObject("metadata.name is missing")
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if not isinstance(labels, dict) or not isinstance(annotations, dict):
        raise InvalidObject("metadata.labels/annotations must be maps")
    return str(meta.get("namespace") or "default"), str(meta["name"]), labels, annotations


def _ip(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidObject(f"{what} {value!r} is not an IP address")
    try:
        return canonical_ip(value)
    except ValueError:
        raise InvalidObject(f"{what} {value!r} is not an IP address") from None


def _int(value: Any, what: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidObject(f"{what} {value!r} is not an integer in {low}..{high}")
    return value


def _protocol(value: Any, what: str) -> str:
    proto = TCP if value in (None, "") else value
    if proto not in PROTOCOLS:
        raise InvalidObject(f"{what} {value!r} is not TCP, UDP or SCTP")
    return str(proto)


def _service_port(raw: Any, index: int, *, with_node_port: bool) -> ServicePort:
    if not isinstance(raw, dict):
        raise InvalidObject(f"spec.ports[{index}] is not a map")
    port = _int(raw.get("port"), f"spec.ports[{index}].port", low=1, high=65535)
    name = raw.get("name") or ""
    if not isinstance(name, str):
        raise InvalidObject(f"spec.ports[{index}].name must be a string")
    target: int | str
    raw_target = raw.get("targetPort")
    if raw_target in (None, "", 0):
        target = port
    elif isinstance(raw_target, str) and raw_target.isdigit():
        target = _int(int(raw_target), f"spec.ports[{index}].targetPort", low=1, high=65535)
    elif isinstance(raw_target, str):
        if not _PORT_NAME.match(raw_target):
            raise InvalidObject(f"spec.ports[{index}].targetPort {raw_target!r} is not a port name")
        target = raw_target
    else:
        target = _int(raw_target, f"spec.ports[{index}].targetPort", low=1, high=65535)
    node_port = 0
    if with_node_port and raw.get("nodePort") not in (None, 0):
        node_port = _int(raw.get("nodePort"), f"spec.ports[{index}].nodePort", low=1, high=65535)
    return ServicePort(
        name=name,
        protocol=_protocol(raw.get("protocol"), f"spec.ports[{index}].protocol"),
        port=port,
        target_port=target,
        node_port=node_port,
    )


def _cidr(value: Any, what: str) -> str:
    try:
        return str(ipaddress.ip_network(str(value).strip(), strict=False))
    except ValueError:
        raise InvalidObject(f"{what} {value!r} is not a CIDR") from None


def parse_service(obj: RawObject) -> Service:
    """A Service object -> `Service`; InvalidObject when it cannot be used."""
    namespace, name, labels, annotations = _meta(obj)
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not isinstance(spec, dict) or not isinstance(status, dict):
        raise InvalidObject("spec/status must be maps")
    svc_type = spec.get("type") or "ClusterIP"
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise InvalidObject(f"spec.type {svc_type!r} is unknown")

    raw_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not isinstance(raw_ips, list):
        raise InvalidObject("spec.clusterIPs must be a list")
    headless = bool(raw_ips) and raw_ips[0] == "None"
    cluster_ips: tuple[str, ...] = ()
    if svc_type != "ExternalName" and not headless:
        cluster_ips = tuple(_ip(ip, "spec.clusterIP") for ip in raw_ips)
        if len({ip_family(ip) for ip in cluster_ips}) != len(cluster_ips):
            raise InvalidObject("spec.clusterIPs has two IPs of one family")

    raw_ports = spec.get("ports") or []
    if not isinstance(raw_ports, list):
        raise InvalidObject("spec.ports must be a list")
    with_node_port = svc_type in ("NodePort", "LoadBalancer")
    ports = tuple(
        _service_port(p, i, with_node_port=with_node_port) for i, p in enumerate(raw_ports)
    )
    if len({(p.port, p.protocol) for p in ports}) != len(ports):
        raise InvalidObject("spec.ports repeats a port/protocol")

    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    source_ranges: tuple[str, ...] = ()
    if svc_type != "ExternalName":
        external_ips = tuple(_ip(ip, "spec.externalIPs") for ip in spec.get("externalIPs") or [])
    if svc_type == "LoadBalancer":
        ingress = (status.get("loadBalancer") or {}).get("ingress") or []
        lb_ips = tuple(
            _ip(i["ip"], "status.loadBalancer.ingress.ip")
            for i in ingress
            if isinstance(i, dict) and i.get("ip") and i.get("ipMode") != "Proxy"
        )
        ranges = spec.get("loadBalancerSourceRanges") or []
        if not ranges:
            note = annotations.get("service.beta.kubernetes.io/load-balancer-source-ranges", "")
            ranges = [r for r in str(note).split(",") if r.strip()]
        source_ranges = tuple(_cidr(r, "spec.loadBalancerSourceRanges") for r in ranges)

    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get(
            "timeoutSeconds"
        )
        affinity = (
            DEFAULT_AFFINITY_TIMEOUT
            if cfg is None
            else _int(cfg, "sessionAffinityConfig.clientIP.timeoutSeconds", low=1, high=86400)
        )

    external_name = ""
    if svc_type == "ExternalName":
        external_name = str(spec.get("externalName") or "").rstrip(".")
        if not external_name:
            raise InvalidObject("spec.externalName is empty")

    externally_reachable = bool(external_ips or lb_ips or with_node_port)
    hcnp = spec.get("healthCheckNodePort") or 0
    return Service(
        namespace=namespace,
        name=name,
        type=svc_type,
        cluster_ips=cluster_ips,
        headless=headless,
        ports=ports,
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        load_balancer_source_ranges=source_ranges,
        external_name=external_name,
        affinity_timeout=affinity,
        external_policy_local=externally_reachable and spec.get("externalTrafficPolicy") == "Local",
        internal_policy_local=spec.get("internalTrafficPolicy") == "Local",
        health_check_node_port=_int(hcnp, "spec.healthCheckNodePort", low=0, high=65535),
        publish_not_ready=bool(spec.get("publishNotReadyAddresses")),
        topology_aware=bool(spec.get("trafficDistribution"))
        or annotations.get("service.kubernetes.io/topology-mode", "").lower() == "auto"
        or annotations.get("service.kubernetes.io/topology-aware-hints", "").lower() == "auto",
        ipvs_scheduler=str(annotations.get(IPVS_SCHEDULER_ANNOTATION, "")),
        skip_proxy=any(label in labels for label in SKIP_LABELS),
    )


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_endpoint_slice(obj: RawObject, *, on_bad_endpoint: Any = None) -> EndpointSlice | None:
    """An EndpointSlice -> `EndpointSlice`; None when it belongs to no service.

    A malformed endpoint is dropped (and reported through `on_bad_endpoint(reason)`) while the
    rest of the slice is kept; a malformed slice as a whole raises InvalidObject.
    """
    namespace, name, labels, annotations = _meta(obj)
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not service_name:
        return None
    address_type = obj.get("addressType") or "IPv4"
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise InvalidObject(f"addressType {address_type!r} is unknown")
    want_family = 6 if address_type == "IPv6" else 4

    ports: list[EndpointPort] = []
    for i, raw in enumerate(obj.get("ports") or []):
        if not isinstance(raw, dict) or raw.get("port") is None:
            continue  # a nil port means "all ports", which Services never produce
        ports.append(
            EndpointPort(
                name=str(raw.get("name") or ""),
                protocol=_protocol(raw.get("protocol"), f"ports[{i}].protocol"),
                port=_int(raw.get("port"), f"ports[{i}].port", low=1, high=65535),
            )
        )

    endpoints: list[Endpoint] = []
    for i, raw in enumerate(obj.get("endpoints") or []):
        try:
            endpoints.append(_endpoint(raw, i, address_type=address_type, family=want_family))
        except InvalidObject as err:
            if on_bad_endpoint is not None:
                on_bad_endpoint(str(err))
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=str(service_name),
        address_type=str(address_type),
        endpoints=tuple(endpoints),
        ports=tuple(ports),
        trigger_time=_parse_time(annotations.get(TRIGGER_TIME_ANNOTATION)),
    )


def _endpoint(raw: Any, index: int, *, address_type: str, family: int) -> Endpoint:
    if not isinstance(raw, dict):
        raise InvalidObject(f"endpoints[{index}] is not a map")
    addresses = raw.get("addresses") or []
    if not isinstance(addresses, list) or not addresses:
        raise InvalidObject(f"endpoints[{index}] has no addresses")
    if address_type == "FQDN":
        address = str(addresses[0])
    else:
        address = _ip(addresses[0], f"endpoints[{index}].addresses[0]")
        if ip_family(address) != family:
            raise InvalidObject(f"endpoints[{index}] address {address} is not {address_type}")
    cond = raw.get("conditions") or {}
    ready = cond.get("ready")
    ready = True if ready is None else bool(ready)
    serving = cond.get("serving")
    serving = ready if serving is None else bool(serving)
    hints = (raw.get("hints") or {}).get("forZones") or []
    target = raw.get("targetRef") or {}
    return Endpoint(
        address=address,
        ready=ready,
        serving=serving,
        terminating=bool(cond.get("terminating")),
        hostname=str(raw.get("hostname") or ""),
        node_name=str(raw.get("nodeName") or ""),
        zone=str(raw.get("zone") or ""),
        zone_hints=tuple(str(h.get("name")) for h in hints if isinstance(h, dict)),
        target_name=str(target.get("name") or "") if isinstance(target, dict) else "",
    )


def parse_node(obj: RawObject) -> NodeInfo:
    _, name, labels, _ = _meta(obj)
    meta = obj.get("metadata") or {}
    addresses = []
    for addr in (obj.get("status") or {}).get("addresses") or []:
        if isinstance(addr, dict) and addr.get("type") in ("InternalIP", "ExternalIP"):
            try:
                addresses.append(canonical_ip(str(addr.get("address"))))
            except ValueError:
                continue
    return NodeInfo(
        name=name,
        zone=str(labels.get(ZONE_LABEL, "")),
        addresses=tuple(addresses),
        deleting=bool(meta.get("deletionTimestamp")),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )
