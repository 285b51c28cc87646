"""Builders of raw Kubernetes API JSON (what the apiserver or a manifest would hold), for tests.

Every builder returns a fresh dict that `kproxy.kube.convert` accepts, with small, readable
defaults; keyword overrides change what a test cares about.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

RawObject = dict[str, Any]
PortSpec = Mapping[str, Any] | tuple[str, int] | tuple[str, int, str]
EndpointSpec = str | Mapping[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def default_cluster_ip(namespace: str, name: str) -> str:
    """A stable ClusterIP in 10.96.0.0/16 derived from the name (collisions are unlikely)."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    return f"10.96.{digest[0]}.{max(digest[1], 1)}"


def _meta(
    namespace: str | None,
    name: str,
    labels: Mapping[str, str] | None,
    annotations: Mapping[str, str] | None,
) -> RawObject:
    meta: RawObject = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def make_service_obj(
    ns: str,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    status: Mapping[str, Any] | None = None,
    **spec: Any,
) -> RawObject:
    """A v1 Service; every other keyword is a `spec` field in API spelling (clusterIP, type,
    ports, externalIPs, externalTrafficPolicy, sessionAffinity, selector, ...).

    Defaults: type ClusterIP, a stable clusterIP, one port {name: http, TCP 80 -> 80},
    selector app=<name>. `clusterIP="None"` makes it headless; a given clusterIP also sets
    clusterIPs (unless given).
    """
    body: RawObject = {
        "type": "ClusterIP",
        "clusterIP": default_cluster_ip(ns, name),
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}],
        "selector": {"app": name},
        "sessionAffinity": "None",
    }
    if spec.get("type") == "ExternalName":
        body.pop("clusterIP")
        body.pop("selector")
    body.update(spec)
    if "clusterIP" in body and "clusterIPs" not in spec:
        body["clusterIPs"] = [body["clusterIP"]]
    if "clusterIP" in body and "ipFamilies" not in spec and body["clusterIP"] != "None":
        body["ipFamilies"] = ["IPv6" if ":" in body["clusterIP"] else "IPv4"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ns, name, labels, annotations),
        "spec": body,
        "status": dict(status) if status is not None else {"loadBalancer": {}},
    }


def _slice_port(spec: PortSpec) -> RawObject:
    if isinstance(spec, Mapping):
        return {"protocol": "TCP", **spec}
    name, port, *proto = spec
    return {"name": name, "port": port, "protocol": proto[0] if proto else "TCP"}


def _endpoint(spec: EndpointSpec) -> RawObject:
    """'10.0.0.1' or a shorthand dict {ip, ready, serving, terminating, node, hostname, zone}
    (or an API-form dict with `addresses`, passed through)."""
    if isinstance(spec, str):
        spec = {"ip": spec}
    if "addresses" in spec:
        return dict(spec)
    ready = spec.get("ready", True)
    ep: RawObject = {
        "addresses": [spec["ip"]],
        "conditions": {
            "ready": ready,
            "serving": spec.get("serving", ready),
            "terminating": spec.get("terminating", False),
        },
    }
    for short, field in (("node", "nodeName"), ("hostname", "hostname"), ("zone", "zone")):
        if spec.get(short):
            ep[field] = spec[short]
    if spec.get("pod"):
        ep["targetRef"] = {"kind": "Pod", "name": spec["pod"], "namespace": spec.get("ns", "")}
    return ep


def make_slice_obj(
    ns: str,
    name: str,
    service: str,
    endpoints: Iterable[EndpointSpec] = (),
    ports: Iterable[PortSpec] | None = None,
    *,
    address_type: str | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> RawObject:
    """A discovery.k8s.io/v1 EndpointSlice of `service` (label kubernetes.io/service-name).

    endpoints: IPs, or dicts (see `_endpoint`); ports: dicts in API form or (name, port[, proto]);
    the default port {name: http, TCP 80} matches `make_service_obj`'s default.
    """
    eps = [_endpoint(e) for e in endpoints]
    if address_type is None:
        first = eps[0]["addresses"][0] if eps else ""
        address_type = "IPv6" if ":" in first else "IPv4"
    all_labels = {SERVICE_NAME_LABEL: service, "endpointslice.kubernetes.io/managed-by": "test"}
    all_labels.update(labels or {})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _meta(ns, name, all_labels, annotations),
        "addressType": address_type,
        "endpoints": eps,
        "ports": [_slice_port(p) for p in (ports if ports is not None else [("http", 80)])],
    }


def make_node_obj(
    name: str,
    addresses: Iterable[str] = ("192.168.50.10",),
    *,
    labels: Mapping[str, str] | None = None,
    pod_cidr: str | None = None,
) -> RawObject:
    """A v1 Node with InternalIP addresses."""
    spec: RawObject = {}
    if pod_cidr:
        spec["podCIDR"] = pod_cidr
        spec["podCIDRs"] = [pod_cidr]
    all_labels = {"kubernetes.io/hostname": name, **(labels or {})}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": _meta(None, name, all_labels, None),
        "spec": spec,
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]},
    }


# -- the "web" LoadBalancer service of the end-to-end tests (iptables, nftables, userspace, IPVS) --
WEB_VIP = "10.96.0.80"
WEB_LB_IP = "203.0.113.10"
WEB_EXT_IP = "198.51.100.10"


def web_service(**spec: Any) -> RawObject:
    """default/web: LoadBalancer at WEB_VIP with http 80/TCP (node port 30080) and dns
    53->5353/UDP (30053), external IP WEB_EXT_IP and ingress WEB_LB_IP; `spec` overrides."""
    body: dict[str, Any] = {
        "type": "LoadBalancer",
        "clusterIP": WEB_VIP,
        "ports": [
            {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": 30080},
            {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30053},
        ],
        "externalIPs": [WEB_EXT_IP],
    }
    body.update(spec)
    return make_service_obj(
        "default", "web", status={"loadBalancer": {"ingress": [{"ip": WEB_LB_IP}]}}, **body
    )


WEB_SLICE_PORTS: tuple[PortSpec, ...] = (("http", 80, "TCP"), ("dns", 5353, "UDP"))


def web_slice(
    pods: Iterable[Any], *, name: str = "web-abc12", ports: Iterable[PortSpec] = WEB_SLICE_PORTS
) -> RawObject:
    """An EndpointSlice of default/web listing `pods` (lab pods: ip, node, name) as ready
    endpoints, on web_service's target ports (http 80/TCP, dns 5353/UDP) unless `ports`."""
    endpoints = [{"ip": p.ip, "node": p.node.name, "pod": p.name} for p in pods]
    return make_slice_obj("default", name, "web", endpoints, list(ports))
