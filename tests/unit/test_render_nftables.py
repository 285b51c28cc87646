"""The nftables renderer: whole rulesets against reviewed golden files (kube-proxy's names and
decisions, kproxy's jump-free endpoint selection), and the deltas partial syncs send.

Golden files (tests/unit/golden/nftables-*.nft) are `nft -f` input. Each was loaded into a
scratch namespace with nft 1.0.6 and read back with `nft list table` while reviewing it.
Regenerate with KPROXY_UPDATE_GOLDEN=1 only after reviewing the diff line by line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from kproxy.model.objects import EndpointSlice, Ref, Service
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView, service_views
from kproxy.render.nftables import (
    HAIRPIN,
    NO_ENDPOINT_SERVICES,
    SERVICE_IPS,
    Element,
    Renderer,
    ServiceBlock,
    apply_counts,
    delta_ops,
    element_counts,
    is_service_chain,
    ops_text,
    render_ruleset,
)
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

GOLDEN = Path(__file__).parent / "golden"
NODE = "node1"
V4 = ProxyOptions(node_name=NODE, node_ips=("192.168.0.2",), cluster_cidrs=("10.0.0.0/8",))
V6 = ProxyOptions(family=6, node_name=NODE, node_ips=("fd00::2",), cluster_cidrs=("fd00:10::/64",))


def views_of(
    *pairs: tuple[Service, Sequence[EndpointSlice]], family: int = 4
) -> dict[Ref, tuple[ServicePortView, ...]]:
    return {s.ref: service_views(s, sl, family=family, node_name=NODE) for s, sl in pairs}


def local(address: str) -> object:
    return make_endpoint(address, node_name=NODE)


def overall() -> dict[Ref, tuple[ServicePortView, ...]]:
    """kube-proxy's TestOverallNFTablesRules shapes: ClusterIP, LB with eTP Local, externalIP,
    source ranges and a health check, ClientIP affinity, a UDP service without endpoints."""
    e = make_endpoint
    s1 = make_service()
    sl1 = make_slice(endpoints=[e("10.180.0.1"), e("10.180.0.2", node_name=NODE)])
    s2 = make_service(
        "ns2",
        "svc2",
        cluster_ips=("172.30.0.42",),
        type="LoadBalancer",
        ports=(make_port(80, name="p80", node_port=3001),),
        external_policy_local=True,
        load_balancer_ips=("1.2.3.4",),
        load_balancer_source_ranges=("203.0.113.0/25", "192.168.0.0/24"),
        external_ips=("5.6.7.8",),
        health_check_node_port=30000,
    )
    sl2 = make_slice("ns2", "svc2", endpoints=[e("10.180.0.3", node_name=NODE), e("10.180.0.4")])
    s3 = make_service("ns3", "svc3", cluster_ips=("172.30.0.43",), affinity_timeout=10800)
    sl3 = make_slice("ns3", "svc3", endpoints=[e("10.180.0.5"), e("10.180.0.6")])
    s4 = make_service(
        "ns4",
        "svc4",
        cluster_ips=("172.30.0.44",),
        ports=(make_port(53, name="dns", protocol="UDP", node_port=3053),),
    )
    return views_of((s1, [sl1]), (s2, [sl2]), (s3, [sl3]), (s4, []))


def ipv6() -> dict[Ref, tuple[ServicePortView, ...]]:
    s1 = make_service(
        cluster_ips=("fd00:30::41",),
        type="NodePort",
        ports=(make_port(80, name="p80", node_port=3001),),
    )
    sl1 = make_slice(
        address_type="IPv6",
        endpoints=[make_endpoint("fd00:10::1"), make_endpoint("fd00:10::2")],
    )
    return views_of((s1, [sl1]), family=6)


CASES = {
    "overall": (overall, V4),
    "ipv6": (ipv6, V6),
    "masquerade-all-nodeport-ips": (
        overall,
        ProxyOptions(node_name=NODE, masquerade_all=True, nodeport_ips=("192.168.0.2",)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_ruleset(case: str) -> None:
    make, options = CASES[case]
    text = render_ruleset(make(), options)
    path = GOLDEN / f"nftables-{case}.nft"
    if os.environ.get("KPROXY_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def block(*pairs: tuple[Service, Sequence[EndpointSlice]]) -> ServiceBlock:
    (views,) = views_of(*pairs).values()
    return Renderer(V4).render_service(views)


SVC = make_service()
REF = SVC.ref


def test_endpoint_change_is_element_changes_only() -> None:
    """No rule changes: the kernel then skips validating the chains reachable from the hooks."""
    before = block((SVC, [make_slice(endpoints=[make_endpoint("10.180.0.1")])]))
    after = block(
        (SVC, [make_slice(endpoints=[make_endpoint("10.180.0.1"), make_endpoint("10.180.0.2")])])
    )
    counts = element_counts([before])
    ops, changed = delta_ops({REF: before}, {REF: after}, counts)
    apply_counts(counts, changed)
    text = ops_text(ops, 4)
    m = "endpoints-XPGD46QR-ns1/svc1/tcp/p80"
    assert text == (
        f"delete element ip kube-proxy {m} {{ 0-65535 }}\n"
        f"add element ip kube-proxy {HAIRPIN} {{ 10.180.0.2 . 10.180.0.2 }}\n"
        f"add element ip kube-proxy {m} {{ 0-32767 : 10.180.0.1 . 80 }}\n"
        f"add element ip kube-proxy {m} {{ 32768-65535 : 10.180.0.2 . 80 }}\n"
    )
    assert counts == element_counts([after])


def test_losing_the_last_endpoint_turns_the_dispatch_into_a_reject() -> None:
    before = block((SVC, [make_slice(endpoints=[make_endpoint("10.180.0.1")])]))
    after = block((SVC, [make_slice(endpoints=[])]))
    ops, _ = delta_ops({REF: before}, {REF: after}, element_counts([before]))
    text = ops_text(ops, 4)
    # the map element goes before the chain it points at
    assert text.index(f"delete element ip kube-proxy {SERVICE_IPS}") < text.index("delete chain")
    assert (
        f"add element ip kube-proxy {NO_ENDPOINT_SERVICES} {{ 172.30.0.41 . tcp . 80 comment "
        f'"ns1/svc1:p80" : goto reject-chain }}' in text
    )


def test_new_service_creates_its_chain_before_the_element_that_jumps_to_it() -> None:
    new = block((SVC, [make_slice(endpoints=[make_endpoint("10.180.0.1")])]))
    counts: dict[Element, int] = {}
    ops, changed = delta_ops({}, {REF: new}, counts)
    apply_counts(counts, changed)
    kinds = [op.kind for op in ops]
    assert kinds.index("add-chain") < kinds.index("add-element")
    assert counts == element_counts([new])


def test_shared_elements_stay_while_another_service_uses_them() -> None:
    """Two services backed by one pod share its hairpin element."""
    other = make_service("ns1", "svc2", cluster_ips=("172.30.0.42",))
    eps = [make_endpoint("10.180.0.1")]
    a = block((SVC, [make_slice(endpoints=eps)]))
    b = block((other, [make_slice(service="svc2", endpoints=eps)]))
    counts = element_counts([a, b])
    pair = Element(HAIRPIN, ("10.180.0.1", "10.180.0.1"))
    assert counts[pair] == 2
    ops, changed = delta_ops({REF: a, other.ref: b}, {REF: ServiceBlock()}, counts)
    apply_counts(counts, changed)
    assert pair not in {op.element for op in ops}
    assert counts[pair] == 1


def test_unchanged_service_sends_nothing() -> None:
    a = block((SVC, [make_slice(endpoints=[make_endpoint("10.180.0.1")])]))
    assert delta_ops({REF: a}, {REF: a}, element_counts([a]))[0] == []


@pytest.mark.parametrize(
    ("name", "owned"),
    [
        ("service-XPGD46QR-ns1/svc1/tcp/p80", True),
        ("endpoint-NY72AAES-ns3/svc3/tcp/p80__10.180.0.5/80", True),
        ("service-endpoints-check", False),
        ("firewall-check", False),
        ("services", False),
    ],
)
def test_service_chains_are_told_from_fixed_chains(name: str, owned: bool) -> None:
    assert is_service_chain(name) is owned
