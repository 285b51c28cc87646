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

from kproxy.model.objects import EndpointPort, EndpointSlice, Ref, Service
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView, service_views
from kproxy.render.nftables import (
    HAIRPIN,
    NO_ENDPOINT_SERVICES,
    SERVICE_IPS,
    Element,
    ElementKey,
    FastTexts,
    Owners,
    Renderer,
    ServiceBlock,
    apply_counts,
    delta_ops,
    element_counts,
    full_text,
    is_count_map,
    is_endpoint_map,
    is_service_chain,
    is_service_set,
    new_count_maps,
    ops_text,
    render_ruleset,
    service_input,
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
    return views_of(*overall_objects())


def overall_objects() -> list[tuple[Service, list[EndpointSlice]]]:
    """The services and slices of `overall`."""
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
    # the chainless fast path: a UDP ClusterIP with three endpoints (svc1, two endpoints, is
    # the TCP one) and an iTP Local ClusterIP (its local endpoint only)
    s5 = make_service(
        "ns5",
        "svc5",
        cluster_ips=("172.30.0.45",),
        ports=(make_port(53, name="dns", protocol="UDP"),),
    )
    dns = [EndpointPort(name="dns", port=5353, protocol="UDP")]
    sl5 = make_slice(
        "ns5",
        "svc5",
        endpoints=[e("10.180.0.7"), e("10.180.0.8"), e("10.180.0.9")],
        ports=dns,
    )
    s6 = make_service("ns6", "svc6", cluster_ips=("172.30.0.46",), internal_policy_local=True)
    sl6 = make_slice("ns6", "svc6", endpoints=[e("10.180.0.10", node_name=NODE), e("10.180.0.11")])
    return [(s1, [sl1]), (s2, [sl2]), (s3, [sl3]), (s4, []), (s5, [sl5]), (s6, [sl6])]


def ipv6() -> dict[Ref, tuple[ServicePortView, ...]]:
    return views_of(*ipv6_objects(), family=6)


def ipv6_objects() -> list[tuple[Service, list[EndpointSlice]]]:
    s1 = make_service(
        cluster_ips=("fd00:30::41",),
        type="NodePort",
        ports=(make_port(80, name="p80", node_port=3001),),
    )
    sl1 = make_slice(
        address_type="IPv6",
        endpoints=[make_endpoint("fd00:10::1"), make_endpoint("fd00:10::2")],
    )
    s2 = make_service(  # the fast path
        "ns2",
        "svc2",
        cluster_ips=("fd00:30::42",),
        ports=(make_port(53, name="dns", protocol="UDP"),),
    )
    sl2 = make_slice(
        "ns2",
        "svc2",
        address_type="IPv6",
        endpoints=[make_endpoint("fd00:10::3"), make_endpoint("fd00:10::4")],
        ports=[EndpointPort(name="dns", port=5353, protocol="UDP")],
    )
    return [(s1, [sl1]), (s2, [sl2])]


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
# a NodePort service keeps kube-proxy's chain layout
NP = make_service(type="NodePort", ports=(make_port(80, name="p80", node_port=30080),))


def eps(*addresses: str) -> list[EndpointSlice]:
    return [make_slice(endpoints=[make_endpoint(a) for a in addresses])]


def test_fast_path_endpoint_change_is_element_changes_only() -> None:
    """A ClusterIP service's endpoints are elements of the shared map for their count: one
    more endpoint moves them from cluster-endpoints-1 to cluster-endpoints-2, no rule."""
    before = block((SVC, eps("10.180.0.1")))
    after = block((SVC, eps("10.180.0.1", "10.180.0.2")))
    assert before.chains == () and after.chains == ()
    counts = element_counts([(REF, before)])
    ops, changed = delta_ops({REF: before}, {REF: after}, counts, count_maps={1, 2})
    apply_counts(counts, changed)
    assert ops_text(ops, 4) == (
        "delete element ip kube-proxy cluster-endpoints-1 { 172.30.0.41 . tcp . 80 . 0 }\n"
        "add element ip kube-proxy cluster-endpoints-2 { 172.30.0.41 . tcp . 80 . 0 : "
        "10.180.0.1 . 80 }\n"
        "add element ip kube-proxy cluster-endpoints-2 { 172.30.0.41 . tcp . 80 . 1 : "
        "10.180.0.2 . 80 }\n"
        f"add element ip kube-proxy {HAIRPIN} {{ 10.180.0.2 . 10.180.0.2 }}\n"
    )
    assert counts == element_counts([(REF, after)])


def test_fast_path_creates_the_map_of_a_new_count_first() -> None:
    """Without cluster-endpoints-3 yet, the transaction declares it and its rule before the
    elements; with it, adding a service is elements only."""
    new = block((SVC, eps("10.180.0.1", "10.180.0.2", "10.180.0.3")))
    ops, _ = delta_ops({}, {REF: new}, {}, count_maps={1})
    text = ops_text(ops, 4)
    declare = (
        "add map ip kube-proxy cluster-endpoints-3 { typeof ip daddr . meta l4proto . th dport "
        ". numgen random mod 3 : ip daddr . th dport ; }\n"
        "add rule ip kube-proxy cluster-endpoints dnat ip to ip daddr . meta l4proto . th dport "
        ". numgen random mod 3 map @cluster-endpoints-3\n"
    )
    assert text.startswith(declare)
    assert new_count_maps(ops) == {3}
    ops, _ = delta_ops({}, {REF: new}, {}, count_maps={1, 3})
    assert {op.kind for op in ops} == {"add-element"}
    assert new_count_maps(ops) == set()


def test_ipv6_fast_path_maps() -> None:
    s = make_service(cluster_ips=("fd00:30::41",))
    sl = make_slice(address_type="IPv6", endpoints=[make_endpoint("fd00:10::1")])
    (views,) = views_of((s, [sl]), family=6).values()
    b = Renderer(V6).render_service(views)
    ops, _ = delta_ops({}, {s.ref: b}, {}, family=6)
    text = ops_text(ops, 6)
    assert "typeof ip6 daddr . meta l4proto . th dport . numgen random mod 1 : ip6 daddr" in text
    assert "dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 1 map" in text
    assert "cluster-endpoints-1 { fd00:30::41 . tcp . 80 . 0 : fd00:10::1 . 80 }" in text


@pytest.mark.parametrize(
    ("service", "addresses", "fast"),
    [
        (SVC, ("10.180.0.1",), True),
        (make_service(internal_policy_local=True), ("10.180.0.1",), False),  # none local
        (NP, ("10.180.0.1",), False),
        (make_service(external_ips=("5.6.7.8",)), ("10.180.0.1",), False),
        (
            make_service(type="LoadBalancer", load_balancer_ips=("1.2.3.4",)),
            ("10.180.0.1",),
            False,
        ),
        (make_service(affinity_timeout=10800), ("10.180.0.1",), False),
        (SVC, (), False),  # no endpoints: rejected through no-endpoint-services
    ],
    ids=["clusterip", "itp-local-none-here", "nodeport", "externalip", "lb", "affinity", "none"],
)
def test_which_ports_take_the_fast_path(
    service: Service, addresses: tuple[str, ...], fast: bool
) -> None:
    b = block((service, eps(*addresses)))
    in_maps = [e for e in b.elements if e.set.startswith("cluster-endpoints-")]
    assert bool(in_maps) is fast
    (views,) = views_of((service, eps(*addresses))).values()
    assert (Renderer(V4).fast_texts(views) is not None) is fast  # what a full sync formats
    if fast:  # no chain and no service-ips element: nothing for the kernel to validate
        assert not b.chains and not any(e.set == SERVICE_IPS for e in b.elements)


def shared_keys() -> dict[Ref, tuple[ServicePortView, ...]]:
    """Fast-path services whose elements collide: two ports sharing endpoints (one hairpin
    element per endpoint), two services claiming one ClusterIP port (the first wins), and a
    NodePort service sharing the ClusterIP and endpoints of a fast one."""
    two = make_service("a", "two", ports=(make_port(80, name="http"), make_port(443, name="https")))
    two_eps = make_slice(
        "a",
        "two",
        endpoints=[make_endpoint("10.180.0.1"), make_endpoint("10.180.0.2")],
        ports=[
            EndpointPort(name="http", port=8080, protocol="TCP"),
            EndpointPort(name="https", port=8443, protocol="TCP"),
        ],
    )
    dup = make_service("b", "dup")
    dup_eps = make_slice("b", "dup", endpoints=[make_endpoint("10.180.0.3")])
    np = make_service(
        "c", "np", type="NodePort", ports=(make_port(80, name="p80", node_port=30080),)
    )
    np_eps = make_slice("c", "np", endpoints=[make_endpoint("10.180.0.1")])
    return views_of((SVC, eps("10.180.0.9")), (two, [two_eps]), (dup, [dup_eps]), (np, [np_eps]))


@pytest.mark.parametrize(
    ("make", "options"),
    [(overall, V4), (ipv6, V6), (shared_keys, V4)],
    ids=["overall", "ipv6", "shared-keys"],
)
def test_full_sync_formats_fast_path_services_as_their_blocks_would(
    make: object, options: ProxyOptions
) -> None:
    """A full sync writes a fast-path service from its `fast_texts` and renders its block
    after the input has ended: both must say the same thing, to the byte."""
    assert callable(make)
    views = make()
    renderer = Renderer(options)
    blocks = [renderer.render_service(views[ref]) for ref in sorted(views)]
    inputs = [service_input(renderer, views[ref]) for ref in sorted(views)]
    assert any(isinstance(i, FastTexts) for i in inputs)
    assert full_text(renderer, inputs) == full_text(renderer, blocks)
    for i, b in zip(inputs, blocks, strict=True):
        if isinstance(i, FastTexts):
            assert not b.chains and not b.sets
            assert list(dict.fromkeys(i.elements)) == [
                (e.set, " . ".join(e.key), e.text()) for e in b.elements
            ]


def test_itp_local_fast_path_uses_the_local_endpoints() -> None:
    s = make_service(internal_policy_local=True)
    b = block((s, [make_slice(endpoints=[local("10.180.0.1"), make_endpoint("10.180.0.2")])]))
    assert [e.text() for e in b.elements if e.set.startswith("cluster-endpoints-")] == [
        "172.30.0.41 . tcp . 80 . 0 : 10.180.0.1 . 80"
    ]


def test_gaining_a_node_port_moves_the_service_to_the_chain_layout() -> None:
    fast = block((SVC, eps("10.180.0.1")))
    chained = block((NP, eps("10.180.0.1")))
    counts = element_counts([(REF, fast)])
    ops, changed = delta_ops({REF: fast}, {REF: chained}, counts, count_maps={1})
    apply_counts(counts, changed)
    text = ops_text(ops, 4)
    assert "delete element ip kube-proxy cluster-endpoints-1 { 172.30.0.41 . tcp . 80 . 0 }" in text
    assert "add chain ip kube-proxy service-XPGD46QR-ns1/svc1/tcp/p80" in text
    assert "goto service-XPGD46QR-ns1/svc1/tcp/p80" in text
    assert counts == element_counts([(REF, chained)])
    # and back: the chains go, the element comes back
    ops, _ = delta_ops({REF: chained}, {REF: fast}, counts, count_maps={1})
    text = ops_text(ops, 4)
    assert "delete chain ip kube-proxy service-XPGD46QR-ns1/svc1/tcp/p80" in text
    assert "add element ip kube-proxy cluster-endpoints-1" in text


def test_endpoint_change_is_element_changes_only() -> None:
    """No rule changes: the kernel then skips validating the chains reachable from the hooks."""
    before = block((NP, eps("10.180.0.1")))
    after = block((NP, eps("10.180.0.1", "10.180.0.2")))
    counts = element_counts([(REF, before)])
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
    assert counts == element_counts([(REF, after)])


def test_losing_the_last_endpoint_turns_the_dispatch_into_a_reject() -> None:
    before = block((NP, eps("10.180.0.1")))
    after = block((NP, eps()))
    ops, _ = delta_ops({REF: before}, {REF: after}, element_counts([(REF, before)]))
    text = ops_text(ops, 4)
    # the map element goes before the chain it points at
    assert text.index(f"delete element ip kube-proxy {SERVICE_IPS}") < text.index("delete chain")
    assert (
        f"add element ip kube-proxy {NO_ENDPOINT_SERVICES} {{ 172.30.0.41 . tcp . 80 comment "
        f'"ns1/svc1:p80" : goto reject-chain }}' in text
    )
    # the fast path likewise: its map element goes, the reject element comes
    fast = block((SVC, eps("10.180.0.1")))
    ops, _ = delta_ops({REF: fast}, {REF: block((SVC, eps()))}, element_counts([(REF, fast)]))
    text = ops_text(ops, 4)
    assert "delete element ip kube-proxy cluster-endpoints-1" in text
    assert f"add element ip kube-proxy {NO_ENDPOINT_SERVICES}" in text


def test_new_service_creates_its_chain_before_the_element_that_jumps_to_it() -> None:
    new = block((NP, eps("10.180.0.1")))
    counts: dict[ElementKey, Owners] = {}
    ops, changed = delta_ops({}, {REF: new}, counts)
    apply_counts(counts, changed)
    kinds = [op.kind for op in ops]
    assert kinds.index("add-chain") < kinds.index("add-element")
    assert counts == element_counts([(REF, new)])


def test_shared_elements_stay_while_another_service_uses_them() -> None:
    """Two services backed by one pod share its hairpin element."""
    other = make_service("ns1", "svc2", cluster_ips=("172.30.0.42",))
    eps = [make_endpoint("10.180.0.1")]
    a = block((SVC, [make_slice(endpoints=eps)]))
    b = block((other, [make_slice(service="svc2", endpoints=eps)]))
    counts = element_counts([(REF, a), (other.ref, b)])
    pair = Element(HAIRPIN, ("10.180.0.1", "10.180.0.1"))
    assert counts[pair[:2]] == (REF, pair, other.ref, pair)
    ops, changed = delta_ops({REF: a, other.ref: b}, {REF: ServiceBlock()}, counts)
    apply_counts(counts, changed)
    assert pair not in {op.element for op in ops}
    assert counts[pair[:2]] == (other.ref, pair)


def clashing() -> tuple[ServiceBlock, ServiceBlock, ServiceBlock]:
    """ns1/svc1 and ns1/svc2 claim one externalIP and port (any user can set externalIPs),
    with their own backends; and svc1 again with its port renamed (its element's value, the
    chain, changes)."""
    other = make_service("ns1", "svc2", cluster_ips=("172.30.0.42",), external_ips=("5.6.7.8",))
    first = make_service(external_ips=("5.6.7.8",))
    a = block((first, eps("10.180.0.1")))
    b = block((other, [make_slice(service="svc2", endpoints=[make_endpoint("10.180.0.2")])]))
    renamed = make_service(external_ips=("5.6.7.8",), ports=(make_port(80, name="web"),))
    a2 = block((renamed, [make_slice(endpoints=[make_endpoint("10.180.0.3")], ports=WEB)]))
    return a, b, a2


REF2 = Ref("ns1", "svc2")
WEB = [EndpointPort(name="web", port=80, protocol="TCP")]
EXTERNAL = (SERVICE_IPS, ("5.6.7.8", "tcp", "80"))


def external_of(b: ServiceBlock) -> Element:
    (e,) = (e for e in b.elements if (e.set, e.key) == EXTERNAL)
    return e


def test_a_second_owner_of_a_key_sends_nothing_for_it() -> None:
    """The kernel keeps the first owner's element (name order, as a full sync writes it):
    adding the second service adds its other elements only, no refused duplicate key."""
    a, b, _ = clashing()
    assert external_of(a) != external_of(b)  # same key, other values
    counts = element_counts([(REF, a)])
    ops, changed = delta_ops({REF: a}, {REF2: b}, counts)
    apply_counts(counts, changed)
    assert [
        op.element for op in ops if op.element and (op.element.set, op.element.key) == EXTERNAL
    ] == []
    assert counts == element_counts([(REF, a), (REF2, b)])
    # in the other order too: the first in name order is the one kept
    counts = element_counts([(REF2, b)])
    ops, changed = delta_ops({REF2: b}, {REF: a}, counts)
    apply_counts(counts, changed)
    shared = [op for op in ops if op.element and (op.element.set, op.element.key) == EXTERNAL]
    assert [(op.kind, op.element) for op in shared] == [
        ("delete-element", external_of(b)),
        ("add-element", external_of(a)),
    ]
    assert counts == element_counts([(REF, a), (REF2, b)])


def test_deleting_the_winner_adds_the_next_owners_element_at_once() -> None:
    a, b, _ = clashing()
    counts = element_counts([(REF, a), (REF2, b)])
    ops, changed = delta_ops({REF: a, REF2: b}, {REF: ServiceBlock()}, counts)
    apply_counts(counts, changed)
    shared = [op for op in ops if op.element and (op.element.set, op.element.key) == EXTERNAL]
    assert [(op.kind, op.element) for op in shared] == [
        ("delete-element", external_of(a)),
        ("add-element", external_of(b)),
    ]
    text = ops_text(ops, 4)
    # the winner's element goes before its chain, the next one's comes in the same text
    assert text.index("delete element ip kube-proxy service-ips { 5.6.7.8") < text.index(
        "delete chain"
    )
    assert (
        'add element ip kube-proxy service-ips { 5.6.7.8 . tcp . 80 comment "ns1/svc2:p80"' in text
    )
    assert counts == element_counts([(REF2, b)])
    # and the loser going sends nothing for the key
    counts = element_counts([(REF, a), (REF2, b)])
    ops, changed = delta_ops({REF: a, REF2: b}, {REF2: ServiceBlock()}, counts)
    apply_counts(counts, changed)
    assert not [op for op in ops if op.element and (op.element.set, op.element.key) == EXTERNAL]
    assert counts == element_counts([(REF, a)])


def test_a_winners_value_change_is_delete_and_add_and_a_losers_is_nothing() -> None:
    a, b, a2 = clashing()
    assert external_of(a) != external_of(a2)  # another external chain
    counts = element_counts([(REF, a), (REF2, b)])
    ops, changed = delta_ops({REF: a, REF2: b}, {REF: a2}, counts)
    apply_counts(counts, changed)
    shared = [op for op in ops if op.element and (op.element.set, op.element.key) == EXTERNAL]
    assert [(op.kind, op.element) for op in shared] == [
        ("delete-element", external_of(a)),
        ("add-element", external_of(a2)),
    ]
    assert counts == element_counts([(REF, a2), (REF2, b)])


def test_fast_path_keys_and_hairpin_follow_the_first_owner() -> None:
    """Two fast-path services claiming one ClusterIP port: the cluster-endpoints-N keys are
    the first's; when it goes, the second's endpoints replace them in one transaction, and
    a hairpin element both share stays."""
    twin = make_service("ns1", "svc2")  # the same ClusterIP 172.30.0.41:80
    a = block((SVC, eps("10.180.0.1", "10.180.0.2")))
    b = block(
        (
            twin,
            [
                make_slice(
                    service="svc2",
                    endpoints=[make_endpoint("10.180.0.1"), make_endpoint("10.180.0.3")],
                )
            ],
        )
    )
    counts = element_counts([(REF, a)])
    ops, changed = delta_ops({REF: a}, {REF2: b}, counts, count_maps={2})
    apply_counts(counts, changed)
    # only svc2's own hairpin element: its map keys and cluster IP are svc1's
    assert (
        ops_text(ops, 4) == f"add element ip kube-proxy {HAIRPIN} {{ 10.180.0.3 . 10.180.0.3 }}\n"
    )
    ops, changed = delta_ops({REF: a, REF2: b}, {REF: ServiceBlock()}, counts, count_maps={2})
    apply_counts(counts, changed)
    text = ops_text(ops, 4)
    assert text == (
        "delete element ip kube-proxy cluster-endpoints-2 { 172.30.0.41 . tcp . 80 . 1 }\n"
        f"delete element ip kube-proxy {HAIRPIN} {{ 10.180.0.2 . 10.180.0.2 }}\n"
        "add element ip kube-proxy cluster-endpoints-2 { 172.30.0.41 . tcp . 80 . 1 : "
        "10.180.0.3 . 80 }\n"
    )
    assert counts == element_counts([(REF2, b)])


def test_unchanged_service_sends_nothing() -> None:
    a = block((SVC, [make_slice(endpoints=[make_endpoint("10.180.0.1")])]))
    assert delta_ops({REF: a}, {REF: a}, element_counts([(REF, a)]))[0] == []


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


@pytest.mark.parametrize(
    ("name", "count"),
    [("cluster-endpoints-3", True), ("cluster-endpoints-10", True), ("cluster-endpoints", False)],
)
def test_count_maps_are_told_from_service_sets(name: str, count: bool) -> None:
    assert is_count_map(name) is count
    assert not is_service_set(name) and not is_endpoint_map(name)
    assert not is_service_chain(name)
