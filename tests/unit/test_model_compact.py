"""The model's compact records: an Endpoint keeps its address and one shared state, and
conversion shares equal port records across services and slices, without changing what any
reader sees."""

from __future__ import annotations

from typing import Any

from kproxy.kube.convert import parse_endpoint_slice, parse_service
from kproxy.model.objects import Endpoint


def test_endpoint_reads_back_its_fields_and_shares_its_state() -> None:
    """An Endpoint is built and read field by field, though it stores its address and one
    shared state: equal endpoints are equal, and endpoints on one node share one state object
    (a hostname makes its own)."""
    import pickle

    from kproxy.model.codec import decode, encode

    fields: dict[str, Any] = {
        "ready": False,
        "serving": True,
        "terminating": True,
        "node_name": "node-7",
        "zone": "z1",
        "zone_hints": ("z1", "z2"),
    }
    a = Endpoint("10.0.0.1", **fields)
    b = Endpoint("10.0.0.2", **fields)
    assert (a.address, a.ready, a.serving, a.terminating, a.hostname) == (
        "10.0.0.1",
        False,
        True,
        True,
        "",
    )
    assert (a.node_name, a.zone, a.zone_hints) == ("node-7", "z1", ("z1", "z2"))
    assert a.state is b.state
    assert a == Endpoint("10.0.0.1", **fields) and a != b
    assert a != Endpoint("10.0.0.1", **{**fields, "ready": True})
    assert Endpoint("10.0.0.1") == Endpoint("10.0.0.1", ready=True, serving=True)
    web0 = Endpoint("10.0.0.3", hostname="web-0")
    assert web0.hostname == "web-0" and web0.ready
    assert pickle.loads(pickle.dumps(a)) == a
    # the codec writes what differs from the constructor's defaults (serving=True does not)
    written = {k: v for k, v in fields.items() if k != "serving"}
    assert encode(a) == {"address": "10.0.0.1", **written, "zone_hints": ["z1", "z2"]}
    assert decode(Endpoint, encode(a)) == a


def _service(i: int, node_port: int = 0) -> dict[str, Any]:
    port: dict[str, Any] = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
    if node_port:
        port["nodePort"] = node_port
    return {
        "metadata": {"namespace": "ns", "name": f"svc-{i}"},
        "spec": {
            "type": "NodePort" if node_port else "ClusterIP",
            "clusterIP": f"172.30.0.{i}",
            "clusterIPs": [f"172.30.0.{i}"],
            "ports": [port],
        },
    }


def _slice(i: int) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": f"svc-{i}-abc",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [f"10.0.{i}.1"], "conditions": {"ready": True}, "nodeName": "n1"}
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def test_conversion_shares_equal_ports() -> None:
    a, b = parse_service(_service(1)), parse_service(_service(2))
    assert a.ports == b.ports and a.ports is b.ports and a.ports[0] is b.ports[0]
    c = parse_service(_service(3, node_port=30080))
    assert c.ports[0].node_port == 30080 and a.ports[0].node_port == 0
    s1, s2 = parse_endpoint_slice(_slice(1)), parse_endpoint_slice(_slice(2))
    assert s1.ports is s2.ports and s1.ports[0].port == 8080
    assert s1.endpoints[0].state is s2.endpoints[0].state
    assert s1.endpoints[0].node_name == "n1" and s1.endpoints[0].address == "10.0.1.1"
