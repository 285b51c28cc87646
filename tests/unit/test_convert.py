"""Raw Kubernetes JSON -> model: valid objects, defaults, and bad input that must be skipped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.kube.convert import InvalidObject, parse_endpoint_slice, parse_node, parse_service
from kproxy.kube.ingest import StoreSink
from kproxy.model.objects import Ref
from kproxy.model.store import Store


def svc(name: str = "web", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]}
    base.update(spec)
    return {"metadata": {"namespace": "default", "name": name}, "spec": base}


def eps(name: str, service: str, *endpoints: dict[str, Any], **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {
            "namespace": "default",
            "name": name,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }
    obj.update(extra)
    return obj


def test_service_defaults() -> None:
    s = parse_service(svc())
    assert s.type == "ClusterIP" and s.cluster_ips == ("10.96.0.20",)
    port = s.ports[0]
    assert (port.protocol, port.port, port.target_port, port.node_port) == ("TCP", 80, 80, 0)
    assert s.affinity_timeout == 0 and not s.headless and s.proxied


def test_service_full() -> None:
    s = parse_service(
        svc(
            type="LoadBalancer",
            clusterIPs=["10.96.0.20", "fd00::20"],
            ports=[{"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080}],
            externalIPs=["192.0.2.7"],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
            externalTrafficPolicy="Local",
            healthCheckNodePort=31000,
            loadBalancerSourceRanges=["203.0.113.0/24"],
        )
        | {
            "status": {
                "loadBalancer": {
                    "ingress": [{"ip": "198.51.100.9"}, {"ip": "198.51.100.10", "ipMode": "Proxy"}]
                }
            }
        }
    )
    assert s.cluster_ips == ("10.96.0.20", "fd00::20")
    assert s.ports[0].target_port == "web" and s.ports[0].node_port == 30080
    assert s.load_balancer_ips == ("198.51.100.9",)
    assert s.external_ips == ("192.0.2.7",)
    assert s.affinity_timeout == 60 and s.external_policy_local
    assert s.health_check_node_port == 31000
    assert s.load_balancer_source_ranges == ("203.0.113.0/24",)


def test_headless_external_name_and_skip_labels() -> None:
    assert parse_service(svc(clusterIP="None")).headless
    assert not parse_service(svc(clusterIP="None")).proxied
    ext = parse_service(svc(type="ExternalName", externalName="db.example.com.", clusterIP=""))
    assert ext.external_name == "db.example.com" and not ext.proxied
    labelled = svc()
    labelled["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
    assert parse_service(labelled).skip_proxy and not parse_service(labelled).proxied


@pytest.mark.parametrize(
    "spec",
    [
        {"clusterIP": "10.96.0.300"},
        {"clusterIP": "not-an-ip"},
        {"ports": [{"port": 0}]},
        {"ports": [{"port": 70000}]},
        {"ports": [{"port": "80"}]},
        {"ports": [{"port": 80, "protocol": "ICMP"}]},
        {"ports": [{"port": 80, "targetPort": "Bad_Name!"}]},
        {"ports": [{"port": 80}, {"port": 80}]},
        {"externalIPs": ["1.2.3"]},
        {"type": "Weird"},
        {"type": "ExternalName", "clusterIP": ""},
        {"ports": "80"},
    ],
    ids=[
        "ip-octet",
        "ip-text",
        "port-0",
        "port-high",
        "port-string",
        "protocol",
        "target-name",
        "dup-port",
        "external-ip",
        "type",
        "externalname-empty",
        "ports-not-list",
    ],
)
def test_invalid_services_raise(spec: dict[str, Any]) -> None:
    with pytest.raises(InvalidObject):
        parse_service(svc(**spec))


def test_slice_conditions_default_and_bad_endpoint_skipped() -> None:
    bad: list[str] = []
    sl = parse_endpoint_slice(
        eps(
            "web-1",
            "web",
            {"addresses": ["10.244.1.5"], "nodeName": "n1", "hostname": "web-0"},
            {"addresses": ["10.244.1.6"], "conditions": {"ready": False, "terminating": True}},
            {"addresses": ["10.244.1.999"]},
            {"addresses": ["fd00::1"]},
        ),
        on_bad_endpoint=bad.append,
    )
    assert sl is not None and sl.service_ref == Ref("default", "web")
    assert [e.address for e in sl.endpoints] == ["10.244.1.5", "10.244.1.6"]
    first, second = sl.endpoints
    assert first.ready and first.serving and not first.terminating and first.hostname == "web-0"
    assert not second.ready and not second.serving and second.terminating
    assert len(bad) == 2
    assert sl.ports[0].port == 8080


def test_slice_without_service_label_is_ignored() -> None:
    obj = eps("x", "web")
    del obj["metadata"]["labels"]
    assert parse_endpoint_slice(obj) is None


def test_trigger_time_parsed() -> None:
    obj = eps("x", "web")
    obj["metadata"]["annotations"] = {
        "endpoints.kubernetes.io/last-change-trigger-time": "2026-01-02T03:04:05Z"
    }
    sl = parse_endpoint_slice(obj)
    assert sl is not None and sl.trigger_time == 1767323045.0


def test_node() -> None:
    node = parse_node(
        {
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "192.168.50.11"},
                    {"type": "Hostname", "address": "n1"},
                ]
            },
        }
    )
    assert node.zone == "z1" and node.addresses == ("192.168.50.11",) and not node.deleting


def test_sink_skips_bad_objects_and_keeps_good_ones() -> None:
    store = Store()
    invalid: list[str] = []
    sink = StoreSink(store, node_name="n1", on_invalid=invalid.append)
    sink.replace("Service", [svc("good"), svc("bad", clusterIP="999.1.1.1"), {"spec": 5}])
    sink.replace("EndpointSlice", [eps("good-1", "good", {"addresses": ["10.244.0.5"]})])
    snap = store.peek()
    assert list(snap.services) == [Ref("default", "good")]
    assert invalid == ["Service", "Service"]
    # a later bad update removes the service; a good update brings it back
    sink.apply("Service", "MODIFIED", svc("good", ports=[{"port": -1}]))
    assert Ref("default", "good") not in store.peek().services
    sink.apply("Service", "MODIFIED", svc("good"))
    assert Ref("default", "good") in store.peek().services
    sink.apply("EndpointSlice", "DELETED", eps("good-1", "good"))
    assert store.peek().slices_for(Ref("default", "good")) == ()


def test_sink_replace_that_cannot_be_read_to_the_end_changes_nothing() -> None:
    store = Store()
    events: list[str] = []
    sink = StoreSink(store, node_name="n1", on_event=events.append)
    sink.replace("Service", [svc("old")])

    def broken_list() -> Iterator[dict[str, Any]]:
        yield svc("new")
        raise ConnectionError("page 2 never came")

    with pytest.raises(ConnectionError):
        sink.replace("Service", broken_list())
    assert list(store.peek().services) == [Ref("default", "old")]
    assert events == ["Service"]  # the failed list counted no changes
