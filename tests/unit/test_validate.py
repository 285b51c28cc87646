"""The API server's validation as kproxy applies it to raw objects (issue 12 items 2 and 5):
a table of valid and invalid values per rule, and whole objects that must be skipped or kept."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import pytest

from kproxy.kube import validate as V
from kproxy.kube.convert import InvalidObject, parse_endpoint_slice, parse_node, parse_service
from kproxy.kube.ingest import StoreSink
from kproxy.model.objects import Ref
from kproxy.model.store import Store
from tests.support.objects import make_service_obj, make_slice_obj

LONG = "a" * 10_000

RULES: list[tuple[Callable[[str], str], str, bool]] = [
    (V.dns1035_label, "web", True),
    (V.dns1035_label, "a" * 63, True),
    (V.dns1035_label, "a" * 64, False),
    (V.dns1035_label, LONG, False),
    (V.dns1035_label, "1web", False),  # a Service name must start with a letter
    (V.dns1035_label, "web-", False),
    (V.dns1035_label, "Web", False),
    (V.dns1035_label, "web.x", False),
    (V.dns1123_label, "1web", True),
    (V.dns1123_label, "kube-system", True),
    (V.dns1123_label, "a_b", False),
    (V.dns1123_label, "", False),
    (V.dns1123_subdomain, "web-abc12.x", True),
    (V.dns1123_subdomain, "a" * 253, True),
    (V.dns1123_subdomain, "a" * 254, False),
    (V.dns1123_subdomain, "web..x", False),
    (V.dns1123_subdomain, "-web", False),
    (V.qualified_name, "app", True),
    (V.qualified_name, "kubernetes.io/service-name", True),
    (V.qualified_name, "App_1.x", True),
    (V.qualified_name, "/app", False),
    (V.qualified_name, "Bad.Prefix/app", False),
    (V.qualified_name, "a" * 64, False),
    (V.qualified_name, "app!", False),
    (V.label_value, "", True),
    (V.label_value, "v1.2_beta-3", True),
    (V.label_value, "a" * 64, False),
    (V.label_value, "has space", False),
    (V.label_value, "-x", False),
    (V.port_name, "http", True),
    (V.port_name, "h2c-web", True),
    (V.port_name, "a" * 16, False),
    (V.port_name, "8080", False),  # needs a letter
    (V.port_name, "web--x", False),
    (V.port_name, "-web", False),
    (V.port_name, "Web", False),
]


@pytest.mark.parametrize(
    ("rule", "value", "valid"),
    RULES,
    ids=[f"{r.__name__}-{v[:20]}-{'ok' if ok else 'bad'}" for r, v, ok in RULES],
)
def test_name_rules(rule: Callable[[str], str], value: str, valid: bool) -> None:
    assert (rule(value) == "") is valid, rule(value)


IPS = [
    ("10.96.0.1", "10.96.0.1", False),
    ("172.30.0.041", "172.30.0.41", True),  # decimal, not octal 33
    ("010.000.000.001", "10.0.0.1", True),
    ("192.168.0.0010", "192.168.0.10", True),
    ("::ffff:1.2.3.04", str(ipaddress.ip_address("::ffff:1.2.3.4")), True),
    ("fd00:0::0001", "fd00::1", False),
    ("1.2.3.256", None, False),
    ("1.2.3", None, False),
    ("1.2.3.4.5", None, False),
    ("0x1.2.3.4", None, False),
    ("1.2.3.\u0664", None, False),  # an Arabic-Indic digit four: not an address for Go either
    ("fe80::1%eth0", None, False),
    ("", None, False),
]


@pytest.mark.parametrize(
    ("text", "canonical", "sloppy"), IPS, ids=[t or "empty" for t, _, _ in IPS]
)
def test_sloppy_ip(text: str, canonical: str | None, sloppy: bool) -> None:
    if canonical is None:
        with pytest.raises(ValueError):
            V.parse_ip_sloppy(text)
    else:
        assert V.parse_ip_sloppy(text) == (canonical, sloppy)


def test_sloppy_cidr_and_special_ips() -> None:
    assert V.parse_cidr_sloppy("192.168.000.0/24") == ("192.168.0.0/24", True)
    assert V.parse_cidr_sloppy("10.1.2.3/8") == ("10.0.0.0/8", False)
    for bad in ("10.0.0.0", "10.0.0.0/33", "10.0.0.0/x", "10.0.0.0/-1"):
        with pytest.raises(ValueError):
            V.parse_cidr_sloppy(bad)
    for ip in (
        "0.0.0.0",
        "127.0.0.1",
        "169.254.1.1",
        "224.0.0.5",
        "::",
        "::1",
        "fe80::1",
        "ff02::1",
    ):
        assert V.special_ip(ip), ip
    for ip in ("10.0.0.1", "224.0.1.1", "2001:db8::1", "ff05::1"):
        assert V.special_ip(ip) == "", ip


def service(**spec: Any) -> dict[str, Any]:
    return make_service_obj("default", "web", **spec)


INVALID_SERVICES: list[tuple[str, dict[str, Any]]] = [
    ("name-10k", make_service_obj("default", LONG)),
    ("name-64", make_service_obj("default", "a" * 64)),
    ("name-digit", make_service_obj("default", "1web")),
    ("namespace", make_service_obj("Bad_NS", "web")),
    ("label-value", make_service_obj("default", "web", labels={"app": "has space"})),
    ("label-key", make_service_obj("default", "web", labels={"bad key": "x"})),
    ("port-name", service(ports=[{"name": "HTTP", "port": 80}])),
    ("port-names-missing", service(ports=[{"port": 80}, {"port": 81}])),
    ("port-names-dup", service(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}])),
    ("target-all-digits-name", service(ports=[{"name": "a", "port": 80, "targetPort": "web--x"}])),
    ("port-0", service(ports=[{"name": "a", "port": 0}])),
    ("port-65536", service(ports=[{"name": "a", "port": 65536}])),
    ("target-70000", service(ports=[{"name": "a", "port": 80, "targetPort": 70000}])),
    (
        "nodeport-70000",
        service(type="NodePort", ports=[{"name": "a", "port": 80, "nodePort": 70000}]),
    ),
    ("nodeport-on-clusterip", service(ports=[{"name": "a", "port": 80, "nodePort": 30080}])),
    ("protocol", service(ports=[{"name": "a", "port": 80, "protocol": "tcp"}])),
    ("no-ports", service(ports=[])),
    ("cluster-ip", service(clusterIP="10.96.0.300")),
    (
        "cluster-ips-3",
        service(clusterIP="10.96.0.3", clusterIPs=["10.96.0.3", "fd00::3", "10.96.0.4"]),
    ),
    ("cluster-ip-mismatch", service(clusterIP="10.96.0.3", clusterIPs=["10.96.0.4"])),
    ("external-ip", service(externalIPs=["1.2.3.x"])),
    ("external-ip-loopback", service(externalIPs=["127.0.0.1"])),
    ("source-range", service(type="LoadBalancer", loadBalancerSourceRanges=["10.0.0.0/33"])),
    ("source-range-not-lb", service(loadBalancerSourceRanges=["10.0.0.0/8"])),
    (
        "lb-ingress-ip",
        make_service_obj(
            "default",
            "web",
            type="LoadBalancer",
            status={"loadBalancer": {"ingress": [{"ip": "x"}]}},
        ),
    ),
    ("affinity", service(sessionAffinity="Sticky")),
    (
        "affinity-timeout",
        service(
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}},
        ),
    ),
    ("etp", service(type="NodePort", externalTrafficPolicy="local")),
    ("itp", service(internalTrafficPolicy="Node")),
    ("external-name", service(type="ExternalName", externalName="bad_name.example.com")),
]


@pytest.mark.parametrize(
    "obj", [o for _, o in INVALID_SERVICES], ids=[i for i, _ in INVALID_SERVICES]
)
def test_services_the_api_server_refuses(obj: dict[str, Any]) -> None:
    with pytest.raises(InvalidObject):
        parse_service(obj)


VALID_SERVICES: list[tuple[str, dict[str, Any]]] = [
    ("name-63", make_service_obj("default", "a" * 63)),
    ("headless-no-ports", service(clusterIP="None", ports=[])),
    ("one-unnamed-port", service(ports=[{"port": 80}])),
    (
        "nodeport-high",
        service(type="NodePort", ports=[{"name": "a", "port": 80, "nodePort": 65535}]),
    ),
    (
        "affinity-max",
        service(
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86400}},
        ),
    ),
    (
        "lb-hostname",
        make_service_obj(
            "default",
            "web",
            type="LoadBalancer",
            status={"loadBalancer": {"ingress": [{"hostname": "lb.example.com"}]}},
        ),
    ),
    ("label-empty-value", make_service_obj("default", "web", labels={"example.com/x": ""})),
]


@pytest.mark.parametrize("obj", [o for _, o in VALID_SERVICES], ids=[i for i, _ in VALID_SERVICES])
def test_services_the_api_server_accepts(obj: dict[str, Any]) -> None:
    parse_service(obj)


def test_leading_zero_addresses_are_read_like_kube_proxy_and_noted() -> None:
    notes: list[str] = []
    svc = parse_service(
        service(
            type="LoadBalancer",
            clusterIP="172.30.0.041",
            externalIPs=["192.0.2.010"],
            loadBalancerSourceRanges=["203.0.113.000/24"],
            status={"loadBalancer": {"ingress": [{"ip": "198.51.100.09"}]}},
        ),
        on_note=notes.append,
    )
    assert svc.cluster_ips == ("172.30.0.41",)
    assert svc.external_ips == ("192.0.2.10",)
    assert svc.load_balancer_ips == ("198.51.100.9",)
    assert svc.load_balancer_source_ranges == ("203.0.113.0/24",)
    assert len(notes) == 4 and "172.30.0.041" in notes[0] and "172.30.0.41" in notes[0]
    sl = parse_endpoint_slice(
        make_slice_obj("default", "web-1", "web", ["10.244.001.005"], [("http", 80)]),
        on_note=notes.append,
    )
    assert sl is not None and sl.endpoints[0].address == "10.244.1.5"


def test_slices_and_nodes() -> None:
    ok = make_slice_obj("default", "web-" + "a" * 240, "web", ["10.244.1.5"], [("http", 80)])
    assert parse_endpoint_slice(ok) is not None
    too_long = make_slice_obj("default", "w" * 254, "web", ["10.244.1.5"], [("http", 80)])
    bad_port = make_slice_obj("default", "web-1", "web", ["10.244.1.5"], [("HTTP", 80)])
    bad_label = make_slice_obj("default", "web-1", LONG, ["10.244.1.5"], [("http", 80)])
    for obj in (too_long, bad_port, bad_label):
        with pytest.raises(InvalidObject):
            parse_endpoint_slice(obj)
    # a loopback endpoint is dropped, the rest of the slice kept
    dropped: list[str] = []
    sl = parse_endpoint_slice(
        make_slice_obj("default", "web-1", "web", ["127.0.0.1", "10.244.1.5"], [("http", 80)]),
        on_bad_endpoint=dropped.append,
    )
    assert sl is not None and [e.address for e in sl.endpoints] == ["10.244.1.5"] and dropped
    node = parse_node(
        {
            "metadata": {"name": "node-1"},
            "status": {
                "addresses": [
                    {"type": "ExternalIP", "address": "203.0.113.7"},
                    {"type": "InternalIP", "address": "192.168.050.011"},
                    {"type": "InternalIP", "address": "junk"},
                ]
            },
        }
    )
    assert node.addresses == ("192.168.50.11", "203.0.113.7")
    with pytest.raises(InvalidObject):
        parse_node({"metadata": {"name": "Node_1"}})


def test_sink_logs_one_short_line_per_refused_object_and_notes_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store()
    sink = StoreSink(store, node_name="n1")
    objects = [
        make_service_obj("default", LONG),
        service(ports=[{"name": "http", "port": 99999}])
        | {"metadata": {"namespace": "default", "name": "badport"}},
        make_service_obj("default", "good"),
        make_service_obj("default", "zeros", clusterIP="172.30.0.041"),
    ]
    with caplog.at_level(logging.WARNING, logger="kproxy.kube"):
        sink.replace("Service", objects)
        sink.replace("Service", objects)  # a relist: refusals again, the note not again
    assert set(store.peek().services) == {Ref("default", "good"), Ref("default", "zeros")}
    assert store.peek().services[Ref("default", "zeros")].cluster_ips == ("172.30.0.41",)
    lines = [r.getMessage() for r in caplog.records]
    refused = [ln for ln in lines if ln.startswith("skipping invalid Service")]
    assert len(refused) == 2  # once per object and reason, not again on the relist
    assert all(len(ln) < 400 for ln in refused), max(map(len, refused))
    assert any("(10000 chars)" in ln and "metadata.name" in ln for ln in refused)
    assert any("default/badport" in ln and "99999" in ln for ln in refused)
    zeros = [ln for ln in lines if "172.30.0.041" in ln]
    assert len(zeros) == 1 and "default/zeros" in zeros[0]
    # fixed, then broken again the same way: logged again
    caplog.clear()
    fixed = make_service_obj("default", "badport")
    with caplog.at_level(logging.WARNING, logger="kproxy.kube"):
        sink.apply("Service", "MODIFIED", fixed)
        sink.apply("Service", "MODIFIED", objects[1])
        sink.apply("Service", "MODIFIED", objects[1])
    again = [r.getMessage() for r in caplog.records]
    assert len(again) == 1 and "default/badport" in again[0], again
