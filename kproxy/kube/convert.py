"""Raw Kubernetes JSON (dicts from the API or from manifests) -> kproxy's model objects.

Pure and strict: every function either returns a valid model object or raises `InvalidObject`
with a reason. No `kubernetes` import here: the API source hands us parsed JSON directly, which
is an order of magnitude faster than the client's generated model classes.

Objects are checked as the API server validates them (`kproxy.kube.validate`): names, labels,
ports, protocols, addresses. Both sources go through here, so a manifest the API server would
refuse is skipped as a whole, never half-programmed. Two leniencies: a malformed endpoint is
dropped from its slice (the rest of the slice is used), and IPv4 addresses with leading zeros
are read as kube-proxy reads them (decimal) and reported through `on_note`.

Memory: only what the model holds survives; strings that repeat across many objects (namespaces,
service names, node names, zones, protocols) are interned, since the JSON decoder makes a new
copy of each one per object (100k endpoints at 10k services).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from sys import intern
from typing import Any

from kproxy.errors import InputError
from kproxy.kube import validate as V
from kproxy.model.objects import (
    PROTOCOLS,
    TCP,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    NodeInfo,
    Service,
    ServicePort,
    ip_family,
    shared,
)

RawObject = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SKIP_LABELS = ("service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless")
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
IPVS_SCHEDULER_ANNOTATION = "kproxy.io/ipvs-scheduler"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_SLICE_ENDPOINTS = 1000
Note = Callable[[str], None]
_POLICIES = (None, "", "Cluster", "Local")


class InvalidObject(InputError):
    """A Kubernetes object kproxy cannot use; the message says why."""


def object_ref(obj: RawObject) -> tuple[str, str]:
    """(namespace, name) of a raw object, for log lines; tolerant of garbage."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return ("?", "?")
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or "?"))


_NAME_RULES = {
    "Service": V.dns1035_label,
    "EndpointSlice": V.dns1123_subdomain,
    "Node": V.dns1123_subdomain,
}


def _check(err: str, what: str) -> None:
    if err:
        raise InvalidObject(f"{what}: {err}")


def _meta(obj: RawObject, kind: str) -> tuple[str, str, dict[str, str], dict[str, str]]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        raise InvalidObject("metadata.name is missing")
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if not isinstance(labels, dict) or not isinstance(annotations, dict):
        raise InvalidObject("metadata.labels/annotations must be maps")
    name, namespace = meta["name"], meta.get("namespace") or "default"
    if not isinstance(name, str) or not isinstance(namespace, str):
        raise InvalidObject("metadata.name/namespace must be strings")
    _check(_NAME_RULES[kind](name), "metadata.name")
    if kind != "Node":
        _check(V.dns1123_label(namespace), "metadata.namespace")
    _check(V.labels_error(labels), "metadata.labels")
    _check(V.annotations_error(annotations), "metadata.annotations")
    return namespace, name, labels, annotations


def _ip(value: Any, what: str, notes: list[str]) -> str:
    """The canonical text of an address field; leading-zero IPv4 is accepted and noted."""
    if not isinstance(value, str):
        raise InvalidObject(f"{what} {value!r} is not an IP address")
    try:
        canonical, sloppy = V.parse_ip_sloppy(value.strip())
    except ValueError:
        raise InvalidObject(f"{what} {V.short(value)!r} is not an IP address") from None
    if sloppy:
        notes.append(f"{what} {value!r} read as {canonical} (leading zeros are decimal)")
    return canonical


def _report(notes: list[str], on_note: Note | None) -> None:
    if on_note is not None:
        for note in notes:
            on_note(note)


def _int(value: Any, what: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidObject(f"{what} {value!r} is not an integer in {low}..{high}")
    return value


def _protocol(value: Any, what: str) -> str:
    proto = TCP if value in (None, "") else value
    if proto not in PROTOCOLS:
        raise InvalidObject(f"{what} {value!r} is not TCP, UDP or SCTP")
    return PROTOCOLS[PROTOCOLS.index(proto)]  # the shared constant, not the JSON's copy


def _service_port(raw: Any, index: int, *, with_node_port: bool) -> ServicePort:
    if not isinstance(raw, dict):
        raise InvalidObject(f"spec.ports[{index}] is not a map")
    port = _int(raw.get("port"), f"spec.ports[{index}].port", low=1, high=65535)
    name = raw.get("name") or ""
    if not isinstance(name, str):
        raise InvalidObject(f"spec.ports[{index}].name must be a string")
    if name:
        _check(V.dns1123_label(name), f"spec.ports[{index}].name {V.short(name)!r}")
    target: int | str
    raw_target = raw.get("targetPort")
    if raw_target in (None, "", 0):
        target = port
    elif isinstance(raw_target, str) and raw_target.isdigit():
        target = _int(int(raw_target), f"spec.ports[{index}].targetPort", low=1, high=65535)
    elif isinstance(raw_target, str):
        if err := V.port_name(raw_target):
            raise InvalidObject(
                f"spec.ports[{index}].targetPort {V.short(raw_target)!r} is not a port name: {err}"
            )
        target = raw_target
    else:
        target = _int(raw_target, f"spec.ports[{index}].targetPort", low=1, high=65535)
    node_port = 0
    if raw.get("nodePort") not in (None, 0):
        if not with_node_port:
            raise InvalidObject(
                f"spec.ports[{index}].nodePort may only be used with type NodePort or LoadBalancer"
            )
        node_port = _int(raw.get("nodePort"), f"spec.ports[{index}].nodePort", low=1, high=65535)
    return shared(  # ports repeat across services (names, "http", "metrics"... too)
        ServicePort(
            name=intern(name),
            protocol=_protocol(raw.get("protocol"), f"spec.ports[{index}].protocol"),
            port=port,
            target_port=target,
            node_port=node_port,
        )
    )


def _cidr(value: Any, what: str, notes: list[str]) -> str:
    try:
        canonical, sloppy = V.parse_cidr_sloppy(str(value).strip())
    except ValueError:
        raise InvalidObject(f"{what} {V.short(str(value))!r} is not a CIDR") from None
    if sloppy:
        notes.append(f"{what} {value!r} read as {canonical} (leading zeros are decimal)")
    return canonical


def parse_service(obj: RawObject, *, on_note: Note | None = None) -> Service:
    """A Service object -> `Service`; InvalidObject when it cannot be used.

    `on_note(text)` hears what was accepted only leniently (leading-zero IPv4 addresses)."""
    notes: list[str] = []
    svc = _service(obj, notes)
    _report(notes, on_note)
    return svc


def _service(obj: RawObject, notes: list[str]) -> Service:
    namespace, name, labels, annotations = _meta(obj, "Service")
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
    if len(raw_ips) > 2:
        raise InvalidObject("spec.clusterIPs may hold at most two addresses")
    if spec.get("clusterIP") and raw_ips and spec.get("clusterIP") != raw_ips[0]:
        raise InvalidObject("spec.clusterIP must be the first of spec.clusterIPs")
    headless = bool(raw_ips) and raw_ips[0] == "None"
    cluster_ips: tuple[str, ...] = ()
    if svc_type != "ExternalName" and not headless:
        cluster_ips = tuple(_ip(ip, "spec.clusterIP", notes) for ip in raw_ips)
        if len({ip_family(ip) for ip in cluster_ips}) != len(cluster_ips):
            raise InvalidObject("spec.clusterIPs has two IPs of one family")

    raw_ports = spec.get("ports") or []
    if not isinstance(raw_ports, list):
        raise InvalidObject("spec.ports must be a list")
    with_node_port = svc_type in ("NodePort", "LoadBalancer")
    ports = shared(
        tuple(_service_port(p, i, with_node_port=with_node_port) for i, p in enumerate(raw_ports))
    )
    if len({(p.port, p.protocol) for p in ports}) != len(ports):
        raise InvalidObject("spec.ports repeats a port/protocol")
    if len({p.name for p in ports}) != len(ports):
        raise InvalidObject("spec.ports: every port needs a name of its own when there are several")
    if not ports and svc_type != "ExternalName" and not headless:
        raise InvalidObject("spec.ports is required")
    for field in ("externalTrafficPolicy", "internalTrafficPolicy"):
        if spec.get(field) not in _POLICIES:
            raise InvalidObject(
                f"spec.{field} {V.short(str(spec.get(field)))!r} is not Cluster or Local"
            )
    affinity_kind = spec.get("sessionAffinity")
    if affinity_kind not in (None, "", "None", "ClientIP"):
        raise InvalidObject(
            f"spec.sessionAffinity {V.short(str(affinity_kind))!r} is not None or ClientIP"
        )

    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    source_ranges: tuple[str, ...] = ()
    if svc_type != "ExternalName":
        external_ips = tuple(
            _external_ip(ip, notes) for ip in _list(spec.get("externalIPs"), "spec.externalIPs")
        )
    ranges = _list(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
    if not ranges:
        note = annotations.get(SOURCE_RANGES_ANNOTATION, "")
        ranges = [r for r in str(note).split(",") if r.strip()]
    if ranges and svc_type != "LoadBalancer":
        raise InvalidObject("spec.loadBalancerSourceRanges may only be used with type LoadBalancer")
    if svc_type == "LoadBalancer":
        ingress = (status.get("loadBalancer") or {}).get("ingress") or []
        lb_ips = tuple(_ingress_ips(ingress, notes))
        source_ranges = tuple(_cidr(r, "spec.loadBalancerSourceRanges", notes) for r in ranges)

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
        _check(V.dns1123_subdomain(external_name), "spec.externalName")

    externally_reachable = bool(external_ips or lb_ips or with_node_port)
    hcnp = spec.get("healthCheckNodePort") or 0
    return Service(
        namespace=intern(namespace),
        name=name,
        type=intern(svc_type),
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


SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"


def _list(value: Any, what: str) -> list[Any]:
    if value in (None, ""):
        return []
    if not isinstance(value, list):
        raise InvalidObject(f"{what} must be a list")
    return value


def _external_ip(value: Any, notes: list[str]) -> str:
    ip = _ip(value, "spec.externalIPs", notes)
    _check(V.special_ip(ip), f"spec.externalIPs {ip}")
    return ip


def _ingress_ips(ingress: Any, notes: list[str]) -> list[str]:
    """The ingress IPs kproxy answers (not those with ipMode Proxy); every entry is checked."""
    out = []
    for i, entry in enumerate(_list(ingress, "status.loadBalancer.ingress")):
        if not isinstance(entry, dict):
            raise InvalidObject(f"status.loadBalancer.ingress[{i}] is not a map")
        hostname = entry.get("hostname")
        if hostname:
            _check(V.dns1123_subdomain(str(hostname)), f"status.loadBalancer.ingress[{i}].hostname")
        if entry.get("ipMode") not in (None, "", "VIP", "Proxy"):
            raise InvalidObject(f"status.loadBalancer.ingress[{i}].ipMode is not VIP or Proxy")
        if entry.get("ip"):
            ip = _ip(entry["ip"], f"status.loadBalancer.ingress[{i}].ip", notes)
            if entry.get("ipMode") != "Proxy":
                out.append(ip)
    return out


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_endpoint_slice(
    obj: RawObject, *, on_bad_endpoint: Any = None, on_note: Note | None = None
) -> EndpointSlice | None:
    """An EndpointSlice -> `EndpointSlice`; None when it belongs to no service.

    A malformed endpoint is dropped (and reported through `on_bad_endpoint(reason)`) while the
    rest of the slice is kept; a malformed slice as a whole raises InvalidObject.
    """
    namespace, name, labels, annotations = _meta(obj, "EndpointSlice")
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not service_name:
        return None
    address_type = obj.get("addressType") or "IPv4"
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise InvalidObject(f"addressType {address_type!r} is unknown")
    want_family = 6 if address_type == "IPv6" else 4

    ports: list[EndpointPort] = []
    for i, raw in enumerate(_list(obj.get("ports"), "ports")):
        if not isinstance(raw, dict) or raw.get("port") is None:
            continue  # a nil port means "all ports", which Services never produce
        port_name = raw.get("name") or ""
        if not isinstance(port_name, str):
            raise InvalidObject(f"ports[{i}].name must be a string")
        if port_name:
            _check(V.dns1123_label(port_name), f"ports[{i}].name {V.short(port_name)!r}")
        ports.append(
            shared(
                EndpointPort(
                    name=intern(port_name),
                    protocol=_protocol(raw.get("protocol"), f"ports[{i}].protocol"),
                    port=_int(raw.get("port"), f"ports[{i}].port", low=1, high=65535),
                )
            )
        )
    if len({p.name for p in ports}) != len(ports):
        raise InvalidObject("ports repeats a name")

    raw_endpoints = _list(obj.get("endpoints"), "endpoints")
    if len(raw_endpoints) > MAX_SLICE_ENDPOINTS:
        raise InvalidObject(f"endpoints has {len(raw_endpoints)} items, more than 1000")
    endpoints: list[Endpoint] = []
    notes: list[str] = []
    for i, raw in enumerate(raw_endpoints):
        try:
            endpoints.append(
                _endpoint(raw, i, address_type=address_type, family=want_family, notes=notes)
            )
        except InvalidObject as err:
            if on_bad_endpoint is not None:
                on_bad_endpoint(str(err))
    _report(notes, on_note)
    return EndpointSlice(
        namespace=intern(namespace),
        name=name,
        service_name=intern(str(service_name)),
        address_type=intern(str(address_type)),
        endpoints=tuple(endpoints),
        ports=shared(tuple(ports)),
        trigger_time=_parse_time(annotations.get(TRIGGER_TIME_ANNOTATION)),
    )


def _endpoint(
    raw: Any, index: int, *, address_type: str, family: int, notes: list[str]
) -> Endpoint:
    if not isinstance(raw, dict):
        raise InvalidObject(f"endpoints[{index}] is not a map")
    addresses = raw.get("addresses") or []
    if not isinstance(addresses, list) or not addresses:
        raise InvalidObject(f"endpoints[{index}] has no addresses")
    if address_type == "FQDN":
        address = str(addresses[0])
    else:
        address = _ip(addresses[0], f"endpoints[{index}].addresses[0]", notes)
        if ip_family(address) != family:
            raise InvalidObject(f"endpoints[{index}] address {address} is not {address_type}")
        _check(V.special_ip(address), f"endpoints[{index}] address {address}")
    for field, rule in (("hostname", V.dns1123_label), ("nodeName", V.dns1123_subdomain)):
        value = raw.get(field)
        if value:
            _check(rule(str(value)), f"endpoints[{index}].{field}")
    cond = raw.get("conditions") or {}
    ready = cond.get("ready")
    ready = True if ready is None else bool(ready)
    serving = cond.get("serving")
    serving = ready if serving is None else bool(serving)
    hints = (raw.get("hints") or {}).get("forZones") or []
    return Endpoint(
        address=address,
        ready=ready,
        serving=serving,
        terminating=bool(cond.get("terminating")),
        hostname=str(raw.get("hostname") or ""),
        node_name=intern(str(raw.get("nodeName") or "")),
        zone=intern(str(raw.get("zone") or "")),
        zone_hints=tuple(str(h.get("name")) for h in hints if isinstance(h, dict)),
    )


def parse_node(obj: RawObject, *, on_note: Note | None = None) -> NodeInfo:
    """A Node -> `NodeInfo`: its InternalIP and ExternalIP addresses in that order (the order
    kube-proxy's GetNodeHostIPs uses); an address that is not one is left out (and noted)."""
    _, name, labels, _ = _meta(obj, "Node")
    meta = obj.get("metadata") or {}
    notes: list[str] = []
    by_type: dict[str, list[str]] = {"InternalIP": [], "ExternalIP": []}
    for addr in (obj.get("status") or {}).get("addresses") or []:
        if isinstance(addr, dict) and addr.get("type") in by_type:
            try:
                ip = _ip(addr.get("address"), f"status.addresses {addr.get('type')}", notes)
            except InvalidObject as err:
                notes.append(f"{err}; left out")
                continue
            if ip not in by_type[addr["type"]]:
                by_type[addr["type"]].append(ip)
    _report(notes, on_note)
    addresses = by_type["InternalIP"] + [
        a for a in by_type["ExternalIP"] if a not in by_type["InternalIP"]
    ]
    return NodeInfo(
        name=name,
        zone=str(labels.get(ZONE_LABEL, "")),
        addresses=tuple(addresses),
        deleting=bool(meta.get("deletionTimestamp")),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )
