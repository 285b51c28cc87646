"""The view layer (kproxy.model.endpoints / decisions / view) against a straightforward reference.

`merge_endpoints`, `categorize` and `decide` take shortcuts for speed (a 4-tuple `EndpointInfo`
reading through to the store's `Endpoint`, a single-slice path without the duplicate dict, the
merged tuple handed out as the cluster / local / reachable sets when it is all of them). Here
random services and slices (ready / serving / terminating endpoints, duplicates within and across
slices, named target ports resolving per slice, topology hints, local and remote endpoints,
traffic policies, external addresses, IPv4 and IPv6) go through both the views and the plain
per-endpoint computation kproxy used before (kube-proxy's endpointslicecache.go and topology.go
written out), and every endpoint set and decision must be equal, in order.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.model.decisions import Verdict
from kproxy.model.objects import (
    IPV4,
    IPV6,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Service,
    ServicePort,
    ip_family,
)
from kproxy.model.view import service_views

NODE = "node-a"

# -- the reference: one record per endpoint, every set computed by filtering ------------------
Ref = tuple[str, int, bool, bool, bool, bool, tuple[str, ...], str, str]
IP, PORT, READY, SERVING, TERMINATING, LOCAL, HINTS = range(7)


def hostport(e: Ref) -> str:
    return f"[{e[IP]}]:{e[PORT]}" if ":" in e[IP] else f"{e[IP]}:{e[PORT]}"


def ref_merge(port: ServicePort, slices: list[EndpointSlice], family: int) -> list[Ref]:
    wanted = "IPv6" if family == IPV6 else "IPv4"
    found: dict[str, Ref] = {}
    for sl in slices:
        if sl.address_type != wanted:
            continue
        target = next(
            (p.port for p in sl.ports if p.name == port.name and p.protocol == port.protocol), None
        )
        if target is None:
            continue
        for ep in sl.endpoints:
            info: Ref = (
                ep.address,
                target,
                ep.ready,
                ep.serving,
                ep.terminating,
                ep.node_name == NODE,
                ep.zone_hints,
                ep.hostname,
                ep.node_name,
            )
            old = found.get(hostport(info))
            if old is None or (info[READY] and not old[READY]):
                found[hostport(info)] = info
    return [found[k] for k in sorted(found, key=lambda h: (len(h), h))]


def ref_usable(eps: list[Ref], *, only_local: bool, zone: str | None) -> list[Ref]:
    pool = [e for e in eps if e[LOCAL]] if only_local else list(eps)
    if zone is not None:
        pool = [e for e in pool if zone in e[HINTS]]
    ready = [e for e in pool if e[READY]]
    return ready or [e for e in pool if e[SERVING] and e[TERMINATING]]


def ref_decision(svc: Service, port: ServicePort, eps: list[Ref], family: int, zone: str) -> Any:
    of = [a for a in (*svc.external_ips, *svc.load_balancer_ips) if ip_family(a) == family]
    lb = [a for a in svc.load_balancer_ips if ip_family(a) == family]
    any_external = bool(
        svc.external_ips or svc.load_balancer_ips or any(p.node_port for p in svc.ports)
    )
    has_external = bool(of or port.node_port)
    uses_cluster = not svc.internal_policy_local or any_external
    uses_local = svc.internal_policy_local or (any_external and svc.external_policy_local)
    cluster = local = None
    if uses_cluster:
        use_zone = None
        ready = [e for e in eps if e[READY]]
        if (
            svc.topology_aware
            and zone
            and ready
            and all(e[HINTS] for e in ready)
            and any(zone in e[HINTS] for e in ready)
        ):
            use_zone = zone
        cluster = ref_usable(eps, only_local=False, zone=use_zone)
    if uses_local:
        local = ref_usable(eps, only_local=True, zone=None)
    if cluster is None:
        reachable = local or []
    elif local is None:
        reachable = cluster
    else:
        seen = {hostport(e) for e in cluster}
        reachable = cluster + [e for e in local if hostport(e) not in seen]
    if cluster is not None:
        has_any = bool(cluster)
    else:
        has_any = any(e[READY] or (e[SERVING] and e[TERMINATING]) for e in eps)
    internal = (local or []) if svc.internal_policy_local else (cluster or [])
    external = (local or []) if svc.external_policy_local else (cluster or [])
    internal_ok = has_any and bool(internal)
    external_ok = has_any and has_external and bool(external)
    no_eps = Verdict.DROP if has_any else Verdict.REJECT
    return {
        "has_endpoints": has_any,
        "internal": internal if internal_ok else [],
        "internal_verdict": Verdict.FORWARD if internal_ok else no_eps,
        "has_external": has_external,
        "external": external if external_ok else [],
        "external_verdict": Verdict.FORWARD if external_ok else no_eps,
        "short_circuit": (cluster or []) if svc.external_policy_local else [],
        "firewall": bool(lb) and bool(svc.load_balancer_source_ranges),
        "cluster": cluster,
        "local": local,
        "all_reachable": reachable,
    }


# -- the views, projected onto the same records -------------------------------------------------
def records(eps: Any) -> list[Ref] | None:
    if eps is None:
        return None
    return [
        (
            e.ip,
            e.port,
            e.ready,
            e.serving,
            e.terminating,
            e.is_local,
            e.zone_hints,
            e.hostname,
            e.node_name,
        )
        for e in eps
    ]


# -- random inputs ------------------------------------------------------------------------------
V4 = ["10.0.0.1", "10.0.0.2", "10.0.0.10", "10.0.1.3", "10.0.0.100"]
V6 = ["fd00::1", "fd00::2", "fd00::a", "fd00::1:0"]


@st.composite
def endpoints(draw: Any, family: int) -> Endpoint:
    ready = draw(st.booleans())
    return Endpoint(
        address=draw(st.sampled_from(V6 if family == IPV6 else V4)),
        ready=ready,
        serving=ready or draw(st.booleans()),
        terminating=draw(st.booleans()),
        hostname=draw(st.sampled_from(["", "web-0"])),
        node_name=draw(st.sampled_from([NODE, "node-b", ""])),
        zone_hints=tuple(draw(st.sets(st.sampled_from(["z1", "z2"])))),
    )


@st.composite
def slices(draw: Any, i: int) -> EndpointSlice:
    family = draw(st.sampled_from([IPV4, IPV6]))
    ports = draw(
        st.lists(
            st.builds(
                EndpointPort,
                st.sampled_from(["", "http"]),
                st.sampled_from(["TCP", "UDP"]),
                st.sampled_from([80, 8080, 9090]),
            ),
            max_size=2,
        )
    )
    return EndpointSlice(
        namespace="ns",
        name=f"svc-{i}",
        service_name="svc",
        address_type="IPv6" if family == IPV6 else "IPv4",
        endpoints=tuple(draw(st.lists(endpoints(family), max_size=6))),
        ports=tuple(ports),
    )


@st.composite
def cases(draw: Any) -> tuple[Service, list[EndpointSlice], str]:
    node_port = draw(st.sampled_from([0, 30080]))
    svc = Service(
        namespace="ns",
        name="svc",
        type=draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"])),
        cluster_ips=("172.30.0.1", "fd01::1"),
        ports=(
            ServicePort("http", "TCP", 80, "web", node_port),
            ServicePort("", draw(st.sampled_from(["TCP", "UDP"])), 81, 8080),
        ),
        external_ips=tuple(draw(st.sets(st.sampled_from(["192.0.2.1", "2001:db8::1"])))),
        load_balancer_ips=tuple(draw(st.sets(st.sampled_from(["198.51.100.1"])))),
        load_balancer_source_ranges=tuple(draw(st.sets(st.sampled_from(["10.0.0.0/8"])))),
        external_policy_local=draw(st.booleans()),
        internal_policy_local=draw(st.booleans()),
        health_check_node_port=30999,
        topology_aware=draw(st.booleans()),
    )
    n = draw(st.integers(min_value=0, max_value=3))
    return svc, [draw(slices(i)) for i in range(n)], draw(st.sampled_from(["", "z1", "z2"]))


@settings(max_examples=400, deadline=None)
@given(cases())
def test_views_equal_the_straightforward_computation(
    case: tuple[Service, list[EndpointSlice], str],
) -> None:
    check(*case)


def _plain(**kw: Any) -> Service:
    fields: dict[str, Any] = {
        "cluster_ips": ("172.30.0.1",),
        "ports": (ServicePort("", "TCP", 80, 8080),),
    }
    return Service("ns", "svc", **{**fields, **kw})


def _ready_slice(*addresses: str) -> EndpointSlice:
    return EndpointSlice(
        "ns",
        "svc-1",
        "svc",
        endpoints=tuple(Endpoint(a, node_name="node-b") for a in addresses),
        ports=(EndpointPort("", "TCP", 8080),),
    )


@pytest.mark.parametrize(
    ("svc", "addresses"),
    [
        (_plain(), ("10.0.0.2", "10.0.0.1")),
        (_plain(), ()),
        (_plain(external_ips=("192.0.2.1",)), ("10.0.0.1",)),
        (_plain(external_ips=("192.0.2.1",)), ()),
        (
            _plain(
                type="LoadBalancer",
                ports=(ServicePort("", "TCP", 80, 8080, 30080),),
                load_balancer_ips=("198.51.100.1",),
                load_balancer_source_ranges=("10.0.0.0/8",),
                health_check_node_port=30999,
                affinity_timeout=300,
            ),
            ("10.0.0.1", "10.0.0.3"),
        ),
    ],
    ids=["clusterip", "clusterip-empty", "external-ip", "external-ip-empty", "lb"],
)
def test_the_all_ready_shortcut_equals_the_straightforward_computation(
    svc: Service, addresses: tuple[str, ...]
) -> None:
    """Cluster policies, no topology, every endpoint ready: the path that skips categorising
    (decide_all_ready), with and without endpoints and external addresses."""
    check(svc, [_ready_slice(*addresses)], "")


def check(svc: Service, sls: list[EndpointSlice], zone: str) -> None:
    for family in (IPV4, IPV6):
        views = service_views(svc, sls, family=family, node_name=NODE, node_zone=zone)
        if not any(ip_family(ip) == family for ip in svc.cluster_ips):
            assert views == ()
            continue
        assert [v.port for v in views] == list(svc.ports)
        for v in views:
            merged = ref_merge(v.port, sls, family)
            assert records(v.endpoints) == merged
            want = ref_decision(svc, v.port, merged, family, zone)
            d = v.decision
            got = {
                "has_endpoints": d.has_endpoints,
                "internal": records(d.internal),
                "internal_verdict": d.internal_verdict,
                "has_external": d.has_external,
                "external": records(d.external),
                "external_verdict": d.external_verdict,
                "short_circuit": records(d.short_circuit),
                "firewall": d.firewall,
                "cluster": records(d.cluster),
                "local": records(d.local),
                "all_reachable": records(d.all_reachable),
            }
            assert got == want
            # the sets share the merged objects (the iptables renderer hashes each once)
            merged_ids = {id(e) for e in v.endpoints}
            for eps in (d.internal, d.external, d.short_circuit, d.all_reachable):
                assert {id(e) for e in eps} <= merged_ids


def test_a_plain_service_shares_one_tuple_for_its_sets() -> None:
    """All ready, cluster policies, no topology: the merged tuple is the cluster, internal and
    reachable set itself (no per-port copies)."""
    svc = Service("ns", "svc", cluster_ips=("172.30.0.1",), ports=(ServicePort("", "TCP", 80, 80),))
    sl = EndpointSlice(
        "ns",
        "svc-1",
        "svc",
        endpoints=tuple(Endpoint(f"10.0.0.{i}", node_name="node-b") for i in (3, 12, 1)),
        ports=(EndpointPort("", "TCP", 8080),),
    )
    (v,) = service_views(svc, [sl], family=IPV4, node_name=NODE)
    assert [e.hostport for e in v.endpoints] == ["10.0.0.1:8080", "10.0.0.3:8080", "10.0.0.12:8080"]
    d = v.decision
    assert d.cluster is v.endpoints and d.internal is v.endpoints
    assert d.all_reachable is v.endpoints
