"""The iptables renderer: kube-proxy's chain names, probabilities and whole rulesets (golden)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kproxy.model.objects import EndpointPort, Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.view import service_views
from kproxy.render.chains import sep_chain, svc_chain
from kproxy.render.iptables import Renderer, probability, render_ruleset
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

GOLDEN = Path(__file__).parent / "golden"
OPTIONS = ProxyOptions(node_name="node1", cluster_cidrs=("10.244.0.0/16",))


def test_chain_names_match_kube_proxy_vectors() -> None:
    assert svc_chain("ns1/svc1:p80", "tcp") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert svc_chain("ns1/svc1:p80", "TCP") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert sep_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"


@pytest.mark.parametrize(
    ("n", "text"),
    [(1, "1.0000000000"), (2, "0.5000000000"), (3, "0.3333333333"), (7, "0.1428571429")],
)
def test_probability_format(n: int, text: str) -> None:
    assert probability(n) == text


def views_of(svc, *slices, node="node1"):
    return {svc.ref: service_views(svc, slices, family=4, node_name=node)}


CASES = {
    "clusterip-multiport": lambda: views_of(
        make_service(
            "ns1",
            "svc1",
            cluster_ips=("172.30.0.41",),
            ports=(make_port(80, name="p80"), make_port(53, name="dns", protocol="UDP")),
        ),
        make_slice(
            "ns1",
            "svc1",
            endpoints=[make_endpoint("10.180.0.1"), make_endpoint("10.180.0.2")],
            ports=[EndpointPort("p80", "TCP", 8080), EndpointPort("dns", "UDP", 5353)],
        ),
    ),
    "nodeport-lb-sourceranges": lambda: views_of(
        make_service(
            "ns2",
            "web",
            type="LoadBalancer",
            cluster_ips=("172.30.0.42",),
            ports=(make_port(80, name="http", node_port=30080),),
            load_balancer_ips=("1.2.3.4",),
            external_ips=("192.0.2.9",),
            load_balancer_source_ranges=("203.0.113.0/25",),
        ),
        make_slice(
            "ns2",
            "web",
            endpoints=[make_endpoint("10.180.0.3")],
            ports=[EndpointPort("http", "TCP", 80)],
        ),
    ),
    "no-endpoints": lambda: views_of(
        make_service(
            "ns3",
            "empty",
            type="NodePort",
            cluster_ips=("172.30.0.43",),
            ports=(make_port(80, name="p80", node_port=30081),),
        ),
    ),
    "affinity": lambda: views_of(
        make_service("ns4", "sticky", cluster_ips=("172.30.0.44",), affinity_timeout=300),
        make_slice(
            "ns4", "sticky", endpoints=[make_endpoint("10.180.0.4"), make_endpoint("10.180.0.5")]
        ),
    ),
    "etp-local": lambda: views_of(
        make_service(
            "ns5",
            "local",
            type="NodePort",
            cluster_ips=("172.30.0.45",),
            ports=(make_port(80, name="p80", node_port=30082),),
            external_policy_local=True,
        ),
        make_slice(
            "ns5",
            "local",
            endpoints=[
                make_endpoint("10.180.0.6", node_name="node1"),
                make_endpoint("10.180.1.7", node_name="node2"),
            ],
        ),
    ),
    "itp-local-none-here": lambda: views_of(
        make_service("ns6", "itp", cluster_ips=("172.30.0.46",), internal_policy_local=True),
        make_slice("ns6", "itp", endpoints=[make_endpoint("10.180.1.8", node_name="node2")]),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_rulesets(case: str) -> None:
    text = render_ruleset(CASES[case](), OPTIONS)
    path = GOLDEN / f"{case}.rules"
    if os.environ.get("KPROXY_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_service_block_is_stable_and_independent() -> None:
    renderer = Renderer(OPTIONS)
    views = CASES["affinity"]()
    a = renderer.render_service(views[Ref("ns4", "sticky")])
    b = renderer.render_service(views[Ref("ns4", "sticky")])
    assert a == b and a.chains[0].startswith("KUBE-SVC-")
    assert renderer.render_service(()).empty
