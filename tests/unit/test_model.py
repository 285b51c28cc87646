"""The model: slice merging, readiness, terminating fallback, topology, policies, changes."""

from __future__ import annotations

import pytest

from kproxy.model.endpoints import categorize, merge_endpoints
from kproxy.model.objects import EndpointPort, NodeInfo, Ref
from kproxy.model.store import Store
from kproxy.model.view import build_views
from tests.support.builders import make_endpoint, make_port, make_service, make_slice


def ips(endpoints) -> list[str]:
    return [e.hostport for e in endpoints]


def test_several_slices_merge_and_duplicates_prefer_ready() -> None:
    port = make_port(80, name="p80")
    a = make_slice(
        name="a", endpoints=[make_endpoint("10.0.0.1"), make_endpoint("10.0.0.2", ready=False)]
    )
    b = make_slice(name="b", endpoints=[make_endpoint("10.0.0.2"), make_endpoint("10.0.0.3")])
    merged = merge_endpoints(port, [a, b], family=4, node_name="n1")
    assert ips(merged) == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    assert all(e.ready for e in merged)


def test_named_target_port_resolves_per_slice() -> None:
    port = make_port(80, name="http", target="web")
    a = make_slice(
        name="a", endpoints=[make_endpoint("10.0.0.1")], ports=[EndpointPort("http", "TCP", 8080)]
    )
    b = make_slice(
        name="b", endpoints=[make_endpoint("10.0.0.2")], ports=[EndpointPort("http", "TCP", 9090)]
    )
    other = make_slice(
        name="c",
        endpoints=[make_endpoint("10.0.0.3")],
        ports=[EndpointPort("metrics", "TCP", 9100)],
    )
    merged = merge_endpoints(port, [a, b, other], family=4, node_name="")
    assert ips(merged) == ["10.0.0.1:8080", "10.0.0.2:9090"]


def test_protocol_and_family_must_match() -> None:
    port = make_port(53, name="dns", protocol="UDP")
    tcp = make_slice(
        name="a", endpoints=[make_endpoint("10.0.0.1")], ports=[EndpointPort("dns", "TCP", 53)]
    )
    v6 = make_slice(
        name="b",
        endpoints=[make_endpoint("fd00::1")],
        ports=[EndpointPort("dns", "UDP", 53)],
        address_type="IPv6",
    )
    assert merge_endpoints(port, [tcp, v6], family=4, node_name="") == ()
    assert ips(merge_endpoints(port, [tcp, v6], family=6, node_name="")) == ["[fd00::1]:53"]


def test_only_ready_endpoints_get_traffic() -> None:
    svc = make_service()
    eps = merge_endpoints(
        svc.ports[0],
        [
            make_slice(
                endpoints=[
                    make_endpoint("10.0.0.1"),
                    make_endpoint("10.0.0.2", ready=False, serving=False),
                    make_endpoint("10.0.0.3", ready=False, serving=True, terminating=True),
                ]
            )
        ],
        family=4,
        node_name="",
    )
    cat = categorize(svc, eps)
    assert ips(cat.cluster) == ["10.0.0.1:80"]
    assert cat.local is None


def test_terminating_fallback_when_nothing_ready() -> None:
    svc = make_service()
    eps = merge_endpoints(
        svc.ports[0],
        [
            make_slice(
                endpoints=[
                    make_endpoint("10.0.0.2", ready=False, serving=False, terminating=True),
                    make_endpoint("10.0.0.3", ready=False, serving=True, terminating=True),
                ]
            )
        ],
        family=4,
        node_name="",
    )
    assert ips(categorize(svc, eps).cluster) == ["10.0.0.3:80"]


def test_no_serving_endpoint_means_no_endpoints() -> None:
    svc = make_service()
    eps = merge_endpoints(
        svc.ports[0],
        [
            make_slice(
                endpoints=[
                    make_endpoint("10.0.0.2", ready=False, serving=False, terminating=True),
                ]
            )
        ],
        family=4,
        node_name="",
    )
    cat = categorize(svc, eps)
    assert cat.cluster == () and cat.all_reachable == ()


@pytest.mark.parametrize(
    ("etp", "itp", "cluster", "local"),
    [
        (False, False, ["10.0.0.1:80", "10.0.0.2:80"], None),
        (True, False, ["10.0.0.1:80", "10.0.0.2:80"], ["10.0.0.1:80"]),
        (False, True, ["10.0.0.1:80", "10.0.0.2:80"], ["10.0.0.1:80"]),
        (True, True, ["10.0.0.1:80", "10.0.0.2:80"], ["10.0.0.1:80"]),
    ],
    ids=["cluster", "etp-local", "itp-local", "both-local"],
)
def test_traffic_policies(etp: bool, itp: bool, cluster, local) -> None:
    svc = make_service(
        type="NodePort",
        ports=(make_port(80, name="p80", node_port=30080),),
        external_policy_local=etp,
        internal_policy_local=itp,
    )
    eps = merge_endpoints(
        svc.ports[0],
        [
            make_slice(
                endpoints=[
                    make_endpoint("10.0.0.1", node_name="me"),
                    make_endpoint("10.0.0.2", node_name="other"),
                ]
            )
        ],
        family=4,
        node_name="me",
    )
    cat = categorize(svc, eps)
    assert (ips(cat.cluster) if cat.cluster is not None else None) == cluster
    assert (ips(cat.local) if cat.local is not None else None) == local


def test_local_terminating_fallback_is_per_node() -> None:
    svc = make_service(internal_policy_local=True)
    eps = merge_endpoints(
        svc.ports[0],
        [
            make_slice(
                endpoints=[
                    make_endpoint("10.0.0.1", node_name="other"),
                    make_endpoint(
                        "10.0.0.2", node_name="me", ready=False, serving=True, terminating=True
                    ),
                ]
            )
        ],
        family=4,
        node_name="me",
    )
    assert ips(categorize(svc, eps).local) == ["10.0.0.2:80"]


def test_topology_hints_used_only_when_complete_and_matching() -> None:
    svc = make_service(topology_aware=True)

    def eps(*hints):
        return merge_endpoints(
            svc.ports[0],
            [
                make_slice(
                    endpoints=[
                        make_endpoint(f"10.0.0.{i + 1}", zone_hints=h) for i, h in enumerate(hints)
                    ]
                )
            ],
            family=4,
            node_name="",
        )

    assert ips(categorize(svc, eps(("a",), ("b",)), node_zone="a").cluster) == ["10.0.0.1:80"]
    # one ready endpoint without hints: hints ignored
    assert len(categorize(svc, eps(("a",), ()), node_zone="a").cluster) == 2
    # no hint for this zone: hints ignored
    assert len(categorize(svc, eps(("b",), ("b",)), node_zone="a").cluster) == 2
    # not opted in: hints ignored
    plain = make_service()
    assert len(categorize(plain, eps(("a",), ("b",)), node_zone="a").cluster) == 2


def test_store_tracks_changed_services() -> None:
    store = Store()
    store.replace_services([make_service("ns1", "a"), make_service("ns1", "b")])
    store.replace_slices([])
    snap, changes = store.take()
    assert snap.synced and changes.services == {Ref("ns1", "a"), Ref("ns1", "b")}
    store.set_slice(make_slice("ns1", "a", endpoints=[make_endpoint("10.0.0.1")]))
    store.set_service(make_service("ns1", "b"))  # unchanged: no change recorded
    snap, changes = store.take()
    assert changes.services == {Ref("ns1", "a")}
    assert [e.address for e in snap.slices_for(Ref("ns1", "a"))[0].endpoints] == ["10.0.0.1"]
    store.delete_service(Ref("ns1", "b"))
    store.delete_slice(Ref("ns1", "a-abcde"))
    snap, changes = store.take()
    assert changes.services == {Ref("ns1", "a"), Ref("ns1", "b")}
    assert Ref("ns1", "b") not in snap.services and snap.slices_for(Ref("ns1", "a")) == ()


def test_store_replace_after_relist_diffs() -> None:
    store = Store()
    store.replace_services([make_service("ns1", "a"), make_service("ns1", "b")])
    store.take()
    store.replace_services([make_service("ns1", "a"), make_service("ns1", "c")])
    _, changes = store.take()
    assert changes.services == {Ref("ns1", "b"), Ref("ns1", "c")}


def test_store_node_and_sync_state() -> None:
    store = Store()
    assert not store.synced
    store.replace_services([])
    assert not store.synced
    store.replace_slices([])
    assert store.synced
    store.set_node(NodeInfo(name="n1", zone="a"))
    snap, changes = store.take()
    assert changes.node_changed and snap.node is not None and snap.node.zone == "a"


def test_views_per_family_and_deleted_refs() -> None:
    store = Store()
    svc = make_service(
        cluster_ips=("172.30.0.41", "fd00::41"),
        external_ips=("1.2.3.4", "2001:db8::4"),
    )
    store.replace_services([svc, make_service("ns1", "headless", cluster_ips=(), headless=True)])
    store.replace_slices([])
    snap = store.peek()
    v4 = build_views(snap, family=4, node_name="")
    v6 = build_views(snap, family=6, node_name="")
    assert v4[svc.ref][0].cluster_ip == "172.30.0.41" and v4[svc.ref][0].external_ips == (
        "1.2.3.4",
    )
    assert v6[svc.ref][0].cluster_ip == "fd00::41" and v6[svc.ref][0].external_ips == (
        "2001:db8::4",
    )
    assert v4[Ref("ns1", "headless")] == ()
    assert build_views(snap, family=4, node_name="", refs=[Ref("ns1", "gone")]) == {
        Ref("ns1", "gone"): ()
    }
    assert v4[svc.ref][0].name == "ns1/svc1:p80"


def test_snapshots_group_slices_per_service_and_never_change_afterwards() -> None:
    store = Store()
    a1 = make_slice(name="a-1", endpoints=[make_endpoint("10.0.0.1")])
    a2 = make_slice(name="a-2", endpoints=[make_endpoint("10.0.0.2")])
    b1 = make_slice(service="svc2", name="b-1", endpoints=[make_endpoint("10.0.1.1")])
    store.replace_slices([a1, a2, b1])
    first, _ = store.take()
    assert first.slices == {Ref("ns1", "svc1"): (a1, a2), Ref("ns1", "svc2"): (b1,)}

    # a slice edited, one deleted, one moved to another service (its label changed)
    a1_new = make_slice(name="a-1", endpoints=[make_endpoint("10.0.0.9")])
    store.set_slice(a1_new)
    store.delete_slice(b1.ref)
    moved = make_slice(service="svc3", name="a-2", endpoints=[make_endpoint("10.0.0.2")])
    store.set_slice(moved)
    second, changes = store.take()
    assert second.slices == {Ref("ns1", "svc1"): (a1_new,), Ref("ns1", "svc3"): (moved,)}
    assert changes.services == {Ref("ns1", n) for n in ("svc1", "svc2", "svc3")}
    # the earlier snapshot is untouched
    assert first.slices == {Ref("ns1", "svc1"): (a1, a2), Ref("ns1", "svc2"): (b1,)}
