"""The DNS index: which names exist and what records they hold, built fully or incrementally."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import replace
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.dns.index import EMPTY, IndexBuilder, build_index, diff_snapshots
from kproxy.dns.records import AAAA, CNAME, NS, PTR, SOA, SRV, TXT, A, to_text, to_wire
from kproxy.model.objects import EndpointPort, EndpointSlice, Ref, Service
from kproxy.model.store import Snapshot, Store
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

ZONE = "cluster.local"


def snapshot(
    services: Iterable[Service], slices: Iterable[EndpointSlice] = (), *, synced: bool = True
) -> Snapshot:
    groups: dict[Ref, list[EndpointSlice]] = {}
    for sl in slices:
        groups.setdefault(sl.service_ref, []).append(sl)
    return Snapshot(
        services=MappingProxyType({s.ref: s for s in services}),
        slices=MappingProxyType({k: tuple(v) for k, v in groups.items()}),
        synced=synced,
    )


def names(index: object) -> set[str]:
    return {to_text(n) for n in index.names}  # type: ignore[attr-defined]


def records(index: object, name: str, rtype: int) -> list[bytes]:
    node = index.lookup(to_wire(name))  # type: ignore[attr-defined]
    assert node is not None, f"{name} missing"
    return [rr.rdata for rr in node.get(rtype)]


def test_clusterip_service_has_addresses_srv_and_ptr_without_endpoints() -> None:
    svc = make_service(
        "default",
        "web",
        cluster_ips=("10.96.0.5", "fd00::5"),
        ports=(make_port(80, name="http"), make_port(53, name="dns", protocol="UDP")),
    )
    idx = build_index(snapshot([svc]))
    name = "web.default.svc.cluster.local"
    assert records(idx, name, A) == [bytes([10, 96, 0, 5])]
    assert len(records(idx, name, AAAA)) == 1
    srv = records(idx, "_http._tcp." + name, SRV)
    assert len(srv) == 1 and srv[0][4:6] == (80).to_bytes(2, "big")
    assert srv[0][6:] == to_wire(name)
    assert records(idx, "_dns._udp." + name, SRV)
    assert records(idx, "5.0.96.10.in-addr.arpa", PTR) == [to_wire(name)]
    v6_ptr = "5." + "0." * 29 + "d.f.ip6.arpa"
    assert records(idx, v6_ptr, PTR) == [to_wire(name)]


def test_unnamed_ports_get_no_srv() -> None:
    svc = make_service("default", "web", ports=(make_port(80),))
    idx = build_index(snapshot([svc]))
    assert not [n for n in names(idx) if n.startswith("_")]


def test_headless_service_lists_ready_endpoints_with_hostnames_and_srv() -> None:
    svc = make_service(
        "default", "db", headless=True, cluster_ips=(), ports=(make_port(5432, name="pg"),)
    )
    sl = make_slice(
        "default",
        "db",
        endpoints=[
            make_endpoint("10.1.0.1", hostname="db-0"),
            make_endpoint("10.1.0.2"),
            make_endpoint("10.1.0.3", ready=False, hostname="db-2"),
        ],
        ports=[EndpointPort("pg", "TCP", 5433)],
    )
    idx = build_index(snapshot([svc], [sl]))
    base = "db.default.svc.cluster.local"
    assert sorted(records(idx, base, A)) == [bytes([10, 1, 0, 1]), bytes([10, 1, 0, 2])]
    assert records(idx, "db-0." + base, A) == [bytes([10, 1, 0, 1])]
    assert records(idx, "10-1-0-2." + base, A) == [bytes([10, 1, 0, 2])]
    assert idx.lookup(to_wire("db-2." + base)) is None  # not ready: no name
    srv_node = idx.lookup(to_wire("_pg._tcp." + base))
    assert srv_node is not None
    targets = sorted(rr.rdata[6:] for rr in srv_node.get(SRV))
    assert targets == sorted([to_wire("db-0." + base), to_wire("10-1-0-2." + base)])
    assert all(rr.rdata[4:6] == (5433).to_bytes(2, "big") for rr in srv_node.get(SRV))
    assert {rr.owner for rr in srv_node.extra} == {
        to_wire("db-0." + base),
        to_wire("10-1-0-2." + base),
    }
    assert records(idx, "1.0.1.10.in-addr.arpa", PTR) == [to_wire("db-0." + base)]


def test_headless_without_ready_endpoints_does_not_exist() -> None:
    svc = make_service("default", "db", headless=True, cluster_ips=())
    sl = make_slice("default", "db", endpoints=[make_endpoint("10.1.0.3", ready=False)])
    idx = build_index(snapshot([svc], [sl]))
    assert idx.lookup(to_wire("db.default.svc.cluster.local")) is None
    # the namespace still exists (an empty non-terminal)
    assert idx.lookup(to_wire("default.svc.cluster.local")) is EMPTY


def test_publish_not_ready_addresses_lists_every_endpoint() -> None:
    svc = make_service("default", "db", headless=True, cluster_ips=(), publish_not_ready=True)
    sl = make_slice("default", "db", endpoints=[make_endpoint("10.1.0.3", ready=False)])
    idx = build_index(snapshot([svc], [sl]))
    assert records(idx, "db.default.svc.cluster.local", A) == [bytes([10, 1, 0, 3])]


def test_dual_stack_hostname_gets_both_families() -> None:
    svc = make_service("default", "db", headless=True, cluster_ips=())
    v4 = make_slice(
        "default", "db", name="db-v4", endpoints=[make_endpoint("10.1.0.1", hostname="db-0")]
    )
    v6 = make_slice(
        "default",
        "db",
        name="db-v6",
        address_type="IPv6",
        endpoints=[make_endpoint("fd00::1", hostname="db-0")],
    )
    idx = build_index(snapshot([svc], [v4, v6]))
    host = "db-0.db.default.svc.cluster.local"
    assert records(idx, host, A) and records(idx, host, AAAA)


def test_external_name_is_a_cname_and_ip_targets_are_ignored() -> None:
    ext = make_service(
        "default", "ext", type="ExternalName", cluster_ips=(), external_name="Example.COM."
    )
    bad = make_service(
        "default", "bad", type="ExternalName", cluster_ips=(), external_name="1.2.3.4"
    )
    idx = build_index(snapshot([ext, bad]))
    assert records(idx, "ext.default.svc.cluster.local", CNAME) == [to_wire("example.com")]
    assert idx.lookup(to_wire("bad.default.svc.cluster.local")) is None


def test_cluster_ip_ptr_wins_over_endpoint_and_shared_endpoints_get_all_names() -> None:
    a = make_service("ns1", "a", cluster_ips=("10.96.0.1",))
    b = make_service("ns1", "b", cluster_ips=("10.96.0.2",))
    c = make_service("ns1", "c", cluster_ips=("10.96.0.3",))
    shared = [make_endpoint("10.1.0.9")]
    slices = [
        make_slice("ns1", "a", endpoints=[make_endpoint("10.96.0.3")]),  # odd but possible
        make_slice("ns1", "b", endpoints=shared),
        make_slice("ns1", "c", endpoints=shared),
    ]
    idx = build_index(snapshot([a, b, c], slices))
    assert records(idx, "3.0.96.10.in-addr.arpa", PTR) == [to_wire("c.ns1.svc.cluster.local")]
    assert sorted(records(idx, "9.0.1.10.in-addr.arpa", PTR)) == sorted(
        [to_wire("10-1-0-9.b.ns1.svc.cluster.local"), to_wire("10-1-0-9.c.ns1.svc.cluster.local")]
    )


def test_srv_at_the_bare_service_name_like_coredns() -> None:
    name = "web.default.svc.cluster.local"
    web = make_service(
        "default",
        "web",
        cluster_ips=("10.96.0.5", "fd00::5"),
        ports=(make_port(80, name="http"), make_port(53, protocol="UDP")),
    )
    idx = build_index(snapshot([web]))
    node = idx.lookup(to_wire(name))
    assert node is not None
    # 2 ports x 2 cluster IPs: 4 CoreDNS entries, weight 25; one record per port, named or not
    assert sorted(rr.rdata for rr in node.get(SRV)) == [
        struct.pack("!HHH", 0, 25, port) + to_wire(name) for port in (53, 80)
    ]
    assert sorted(node.extra) == sorted(node.get(A) + node.get(AAAA))
    # headless: one record per endpoint and port, the endpoints' addresses as glue
    db = make_service("default", "db", headless=True, cluster_ips=(), ports=(make_port(5432),))
    sl = make_slice(
        "default",
        "db",
        endpoints=[make_endpoint("10.1.0.1", hostname="db-0"), make_endpoint("10.1.0.2")],
        ports=[EndpointPort("", "TCP", 5432), EndpointPort("metrics", "TCP", 9187)],
    )
    idx = build_index(snapshot([db], [sl]))
    node = idx.lookup(to_wire("db.default.svc.cluster.local"))
    assert node is not None
    base = ".db.default.svc.cluster.local"
    assert sorted(rr.rdata for rr in node.get(SRV)) == sorted(
        struct.pack("!HHH", 0, 25, port) + to_wire(host + base)
        for host in ("db-0", "10-1-0-2")
        for port in (5432, 9187)
    )
    assert sorted(rr.rdata for rr in node.extra) == [bytes([10, 1, 0, 1]), bytes([10, 1, 0, 2])]
    # no ports, no SRV
    bare = make_service("default", "bare", cluster_ips=("10.96.0.9",), ports=())
    node = build_index(snapshot([bare])).lookup(to_wire("bare.default.svc.cluster.local"))
    assert node is not None and not node.get(SRV) and not node.extra


def test_apex_records_and_empty_non_terminals() -> None:
    idx = build_index(snapshot([make_service("default", "web")]), ns_addresses=("169.254.20.10",))
    apex = idx.lookup(to_wire(ZONE))
    assert apex is not None and apex.get(SOA) and apex.get(NS)
    assert [rr.rdata for rr in apex.extra] == [bytes([169, 254, 20, 10])]
    assert records(idx, "dns-version.cluster.local", TXT) == [b"\x051.1.0"]
    version = idx.lookup(to_wire("dns-version.cluster.local"))
    assert version is not None and version.rrs[0].ttl == 28800  # CoreDNS's TTL
    for ent in ("svc.cluster.local", "pod.cluster.local", "default.svc.cluster.local"):
        assert idx.lookup(to_wire(ent)) is EMPTY, ent
    assert idx.lookup(to_wire("other.svc.cluster.local")) is None


def test_custom_zone() -> None:
    idx = build_index(snapshot([make_service("default", "web")]), zone="Example.Internal.")
    assert idx.lookup(to_wire("web.default.svc.example.internal")) is not None


def test_bad_names_are_skipped_not_fatal() -> None:
    bad = make_service("default", "x" * 70)
    good = make_service("default", "ok", cluster_ips=("10.96.0.9",))
    idx = build_index(snapshot([bad, good]))
    assert idx.lookup(to_wire("ok.default.svc.cluster.local")) is not None


# -- incremental maintenance -------------------------------------------------------------------


def test_changed_names_cover_what_moved() -> None:
    store = Store()
    store.replace_services([make_service("default", "web", cluster_ips=("10.96.0.5",))])
    store.replace_slices([])
    builder = IndexBuilder()
    prev = store.peek()
    builder.apply(diff_snapshots(None, prev))
    store.set_service(make_service("default", "web", cluster_ips=("10.96.0.6",)))
    cur = store.peek()
    index, changed = builder.apply(diff_snapshots(prev, cur))
    assert changed is not None
    texts = {to_text(n) for n in changed}
    assert {
        "web.default.svc.cluster.local.",
        "5.0.96.10.in-addr.arpa.",
        "6.0.96.10.in-addr.arpa.",
    } <= texts
    assert index.lookup(to_wire("5.0.96.10.in-addr.arpa")) is None
    assert index.lookup(to_wire("6.0.96.10.in-addr.arpa")) is not None


def test_published_index_is_not_mutated_by_later_changes() -> None:
    builder = IndexBuilder()
    first, _ = builder.apply(diff_snapshots(None, snapshot([make_service("default", "web")])))
    before = dict(first.names)
    builder.apply(diff_snapshots(snapshot([make_service("default", "web")]), snapshot([])))
    assert dict(first.names) == before


def test_synced_flag_flip_invalidates_everything() -> None:
    builder = IndexBuilder()
    s0 = snapshot([make_service("default", "web")], synced=False)
    builder.apply(diff_snapshots(None, s0))
    s1 = replace(s0, synced=True)
    index, changed = builder.apply(diff_snapshots(s0, s1))
    assert changed is None and index.synced


NAMESPACES = ["a", "b"]
SERVICE_NAMES = ["s1", "s2", "s3"]
ADDRESSES = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.96.0.1"]


@st.composite
def services(draw: st.DrawFn) -> Service:
    ns = draw(st.sampled_from(NAMESPACES))
    name = draw(st.sampled_from(SERVICE_NAMES))
    kind = draw(st.sampled_from(["clusterip", "headless", "external"]))
    ports = (make_port(80, name=draw(st.sampled_from(["", "http"]))),)
    if kind == "headless":
        return make_service(ns, name, headless=True, cluster_ips=(), ports=ports)
    if kind == "external":
        return make_service(
            ns, name, type="ExternalName", cluster_ips=(), external_name="x.example"
        )
    ip = draw(st.sampled_from(["10.96.0.1", "10.96.0.2", "fd00::1"]))
    return make_service(ns, name, cluster_ips=(ip,), ports=ports)


@st.composite
def slices(draw: st.DrawFn) -> EndpointSlice:
    ns = draw(st.sampled_from(NAMESPACES))
    svc = draw(st.sampled_from(SERVICE_NAMES))
    eps = draw(
        st.lists(
            st.builds(
                make_endpoint,
                st.sampled_from(ADDRESSES),
                ready=st.booleans(),
                hostname=st.sampled_from(["", "h0", "h1"]),
            ),
            max_size=3,
        )
    )
    return make_slice(ns, svc, name=f"{svc}-{draw(st.sampled_from('xy'))}", endpoints=eps)


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, object]]:
    ops = st.one_of(
        st.tuples(st.just("svc"), services()),
        st.tuples(st.just("slice"), slices()),
        st.tuples(
            st.just("del-svc"),
            st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(SERVICE_NAMES)),
        ),
        st.tuples(
            st.just("del-slice"),
            st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(["s1-x", "s2-y", "s3-x"])),
        ),
    )
    return draw(st.lists(ops, min_size=1, max_size=12))


@settings(max_examples=150, deadline=None)
@given(operations())
def test_incremental_index_equals_full_rebuild(ops: list[tuple[str, object]]) -> None:
    store = Store()
    store.replace_services([])
    store.replace_slices([])
    builder = IndexBuilder(ns_addresses=("169.254.20.10",))
    prev = store.peek()
    builder.apply(diff_snapshots(None, prev))
    for kind, arg in ops:
        if kind == "svc":
            store.set_service(arg)  # type: ignore[arg-type]
        elif kind == "slice":
            store.set_slice(arg)  # type: ignore[arg-type]
        elif kind == "del-svc":
            store.delete_service(Ref(*arg))  # type: ignore[misc]
        else:
            store.delete_slice(Ref(*arg))  # type: ignore[misc]
        cur = store.peek()
        incremental, _ = builder.apply(diff_snapshots(prev, cur))
        full = build_index(cur, ns_addresses=("169.254.20.10",))
        assert set(incremental.names) == set(full.names)
        for name, node in full.names.items():
            got = incremental.names[name]
            assert sorted(got.rrs) == sorted(node.rrs), to_text(name)
            assert sorted(got.extra) == sorted(node.extra), to_text(name)
        prev = cur


@pytest.mark.parametrize("address", ["10.1.0.1", "fd00::1"])
def test_endpoint_without_hostname_uses_dashed_address(address: str) -> None:
    svc = make_service("default", "db", headless=True, cluster_ips=())
    family = "IPv6" if ":" in address else "IPv4"
    sl = make_slice("default", "db", address_type=family, endpoints=[make_endpoint(address)])
    idx = build_index(snapshot([svc], [sl]))
    dashed = address.replace(".", "-").replace(":", "-")
    assert idx.lookup(to_wire(f"{dashed}.db.default.svc.cluster.local")) is not None


def test_large_endpoint_changes_keep_every_ptr() -> None:
    """Many endpoint addresses changing at once (the IPv4 PTR table is rebuilt, not edited),
    shared between services, and one service going away: incremental equals a full build."""
    store = Store()
    services = [make_service("default", f"s{i}", cluster_ips=(f"10.96.0.{i}",)) for i in (1, 2)]
    store.replace_services(services)

    def slices(shift: int) -> list[EndpointSlice]:
        def address(k: int) -> str:
            return f"10.1.{(k + shift) // 250}.{(k + shift) % 250 + 1}"

        return [
            make_slice("default", name, endpoints=[make_endpoint(address(k)) for k in range(n)])
            for name, n in (("s1", 150), ("s2", 40))  # s2's addresses are all s1's too
        ]

    store.replace_slices(slices(0))
    builder = IndexBuilder()
    prev = store.peek()
    builder.apply(diff_snapshots(None, prev))
    base = "default.svc.cluster.local"
    shared = to_wire("101.0.1.10.in-addr.arpa")  # 10.1.0.101: in s1 and s2 after the shift
    for step, owners in (
        (lambda: store.replace_slices(slices(100)), ["s1", "s2"]),
        (lambda: store.delete_service(services[1].ref), ["s1"]),
    ):
        step()
        cur = store.peek()
        incremental, changed = builder.apply(diff_snapshots(prev, cur))
        full = build_index(cur)
        assert set(incremental.names) == set(full.names)
        for name, node in full.names.items():
            assert sorted(incremental.names[name].rrs) == sorted(node.rrs), to_text(name)
        assert changed is not None and shared in changed
        ptr = incremental.lookup(shared)
        assert ptr is not None
        assert [rr.rdata for rr in ptr.rrs] == [to_wire(f"10-1-0-101.{o}.{base}") for o in owners]
        assert incremental.lookup(to_wire("1.0.1.10.in-addr.arpa")) is None  # gone in the shift
        prev = cur


def test_services_sharing_a_cluster_ip_share_its_ptr_until_one_goes() -> None:
    """Cluster IP PTRs are made at lookup from a table of owners: two services with the same
    cluster IP (odd, but it happens while a Service is recreated) both answer, in name order;
    removing one leaves the other."""
    store = Store()
    a = make_service("ns1", "b-svc", cluster_ips=("10.96.0.7",))
    b = make_service("ns1", "a-svc", cluster_ips=("10.96.0.7", "fd00::7"))
    store.replace_services([a, b])
    store.replace_slices([make_slice("ns1", "b-svc", endpoints=[make_endpoint("10.96.0.7")])])
    builder = IndexBuilder()
    prev = store.peek()
    index, _ = builder.apply(diff_snapshots(None, prev))
    base = "ns1.svc.cluster.local"
    assert records(index, "7.0.96.10.in-addr.arpa", PTR) == [
        to_wire(f"a-svc.{base}"),
        to_wire(f"b-svc.{base}"),
    ]
    store.delete_service(b.ref)
    cur = store.peek()
    index, changed = builder.apply(diff_snapshots(prev, cur))
    assert changed is not None and to_wire("7.0.96.10.in-addr.arpa") in changed
    assert records(index, "7.0.96.10.in-addr.arpa", PTR) == [to_wire(f"b-svc.{base}")]
    assert index.lookup(to_wire("7." + "0." * 29 + "d.f.ip6.arpa")) is None
    assert index.lookup(to_wire(f"a-svc.{base}")) is None


def test_renamed_port_moves_the_srv_name() -> None:
    store = Store()
    store.replace_services([make_service("ns1", "web", ports=(make_port(80, name="http"),))])
    store.replace_slices([])
    builder = IndexBuilder()
    prev = store.peek()
    builder.apply(diff_snapshots(None, prev))
    store.set_service(make_service("ns1", "web", ports=(make_port(80, name="web"),)))
    index, changed = builder.apply(diff_snapshots(prev, store.peek()))
    old, new = (to_wire(f"_{p}._tcp.web.ns1.svc.cluster.local") for p in ("http", "web"))
    assert changed is not None and {old, new} <= changed
    assert index.lookup(old) is None
    assert records(index, "_web._tcp.web.ns1.svc.cluster.local", SRV)
    assert index.lookup(to_wire("_tcp.web.ns1.svc.cluster.local")) is EMPTY
    assert index.lookup(to_wire("_udp.web.ns1.svc.cluster.local")) is None


def test_a_consumed_delta_builds_the_same_index() -> None:
    """`consume=True` (the worker's own deltas) drops each service's slices from the delta
    as it goes; the index is the one a plain apply builds."""
    web = make_service("ns1", "web", cluster_ips=("10.96.0.5",), ports=(make_port(80, name="h"),))
    db = make_service("ns1", "db", headless=True, cluster_ips=(), ports=(make_port(5432),))
    snap = snapshot(
        [web, db],
        [
            make_slice("ns1", "web", endpoints=[make_endpoint("10.1.0.1", hostname="w0")]),
            make_slice("ns1", "db", endpoints=[make_endpoint("10.1.0.2")]),
        ],
    )
    plain = build_index(snap)
    delta = diff_snapshots(None, snap)
    consumed, _ = IndexBuilder().apply(delta, consume=True)
    assert not delta.slices
    assert set(consumed.names) == set(plain.names)
    for name, node in plain.names.items():
        assert consumed.names[name] == node, to_text(name)
