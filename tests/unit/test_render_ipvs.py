"""IPVS mode's pure core: desired virtual servers, kube-ipvs0 addresses, ipset contents, the
companion iptables rules, and the diff against a kernel table (graceful termination, ownership)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest

from kproxy.model.objects import EndpointPort, EndpointSlice, Service
from kproxy.model.options import ProxyOptions
from kproxy.model.view import service_views
from kproxy.render import ipvs as R
from kproxy.render import ipvs_diff as D
from kproxy.render import ipvs_rules as RR
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

NODE = "node1"
NODE_IP = "192.168.50.11"
OPTS = ProxyOptions(
    family=4, node_name=NODE, node_ips=(NODE_IP, "127.0.0.1"), cluster_cidrs=("10.244.0.0/16",)
)


def local(ip: str, **kw: Any) -> Any:
    return make_endpoint(ip, node_name=NODE, **kw)


def remote(ip: str, **kw: Any) -> Any:
    return make_endpoint(ip, node_name="node2", **kw)


def render(
    svc: Service,
    slices: Sequence[EndpointSlice] = (),
    *,
    options: ProxyOptions = OPTS,
    scheduler: str = "rr",
) -> R.DesiredIPVS:
    views = service_views(svc, slices, family=options.family, node_name=NODE)
    return R.render_desired({svc.ref: views}, options, scheduler=scheduler)


def vs(desired: R.DesiredIPVS, address: str, port: int, proto: str = "TCP") -> R.VirtualServer:
    return desired.servers[R.VSKey(address, proto, port)]


def dest_ips(server: R.VirtualServer) -> set[str]:
    return {d.address for d in server.dests}


def three_pods(**kw: Any) -> EndpointSlice:
    return make_slice(
        endpoints=[local("10.244.1.11"), remote("10.244.2.11"), remote("10.244.2.12")], **kw
    )


# -- virtual servers -----------------------------------------------------------------------------
def test_cluster_ip_gets_one_virtual_server_with_every_ready_endpoint() -> None:
    d = render(make_service(), [three_pods()])
    assert set(d.servers) == {R.VSKey("172.30.0.41", "TCP", 80)}
    server = vs(d, "172.30.0.41", 80)
    assert server.scheduler == "rr" and server.flags == 0 and server.timeout == 0
    assert dest_ips(server) == {"10.244.1.11", "10.244.2.11", "10.244.2.12"}
    assert {(x.port, x.weight) for x in server.dests} == {(80, 1)}
    assert d.bind == {"172.30.0.41"}
    assert d.sets[R.CLUSTER_IP_SET] == {"172.30.0.41,tcp:80"}
    assert d.sets[R.IPVS_IPS] == {"172.30.0.41"}


def test_target_port_comes_from_the_slice() -> None:
    svc = make_service(ports=(make_port(80, name="p80", target="http"),))
    sl = make_slice(endpoints=[remote("10.244.2.11")], ports=(EndpointPort("p80", "TCP", 8080),))
    assert [(x.address, x.port) for x in vs(render(svc, [sl]), "172.30.0.41", 80).dests] == [
        ("10.244.2.11", 8080)
    ]


def test_not_ready_endpoints_are_left_out_and_terminating_ones_are_the_fallback() -> None:
    sl = make_slice(
        endpoints=[
            remote("10.244.2.11"),
            remote("10.244.2.12", ready=False, serving=False),
            remote("10.244.2.13", ready=False, serving=True, terminating=True),
        ]
    )
    assert dest_ips(vs(render(make_service(), [sl]), "172.30.0.41", 80)) == {"10.244.2.11"}
    only_terminating = make_slice(
        endpoints=[remote("10.244.2.13", ready=False, serving=True, terminating=True)]
    )
    d = render(make_service(), [only_terminating])
    assert dest_ips(vs(d, "172.30.0.41", 80)) == {"10.244.2.13"}
    assert not d.sets[R.NO_ENDPOINTS]


@pytest.mark.parametrize(
    ("annotation", "default", "expected"),
    [("", "rr", "rr"), ("", "wlc", "wlc"), ("sh", "rr", "sh"), ("bogus", "lc", "lc")],
    ids=["default-rr", "flag-default", "annotation", "invalid-annotation"],
)
def test_scheduler_from_annotation_else_default(
    annotation: str, default: str, expected: str
) -> None:
    d = render(make_service(ipvs_scheduler=annotation), [three_pods()], scheduler=default)
    assert vs(d, "172.30.0.41", 80).scheduler == expected


def test_mh_scheduler_hashes_on_source_port_as_kube_proxy_does() -> None:
    server = vs(render(make_service(ipvs_scheduler="mh"), [three_pods()]), "172.30.0.41", 80)
    assert server.flags & R.FLAG_SCHED2


def test_client_ip_affinity_is_persistence_with_the_timeout() -> None:
    svc = make_service(
        type="NodePort",
        affinity_timeout=10800,
        ports=(make_port(80, name="p80", node_port=30080),),
    )
    d = render(svc, [three_pods()])
    assert {(s.persistent, s.timeout) for s in d.servers.values()} == {(True, 10800)}


def test_several_ports_and_protocols_get_one_virtual_server_each() -> None:
    svc = make_service(
        ports=(make_port(53, name="dns", protocol="UDP"), make_port(53, name="dns-tcp"))
    )
    sl = make_slice(
        endpoints=[remote("10.244.2.11")],
        ports=(EndpointPort("dns", "UDP", 5353), EndpointPort("dns-tcp", "TCP", 5353)),
    )
    d = render(svc, [sl])
    assert set(d.servers) == {R.VSKey("172.30.0.41", "UDP", 53), R.VSKey("172.30.0.41", "TCP", 53)}
    assert d.sets[R.CLUSTER_IP_SET] == {"172.30.0.41,udp:53", "172.30.0.41,tcp:53"}
    assert d.bind == {"172.30.0.41"}


# -- NodePort ------------------------------------------------------------------------------------
def nodeport_service(**kw: Any) -> Service:
    return make_service(type="NodePort", ports=(make_port(80, name="p80", node_port=30080),), **kw)


def test_node_port_gets_a_virtual_server_per_node_address_but_never_on_loopback() -> None:
    d = render(nodeport_service(), [three_pods()])
    assert set(d.servers) == {R.VSKey("172.30.0.41", "TCP", 80), R.VSKey(NODE_IP, "TCP", 30080)}
    assert dest_ips(vs(d, NODE_IP, 30080)) == dest_ips(vs(d, "172.30.0.41", 80))
    assert d.sets[R.NODE_PORT_TCP] == {"30080"}
    assert not d.sets[R.NODE_PORT_LOCAL_TCP]
    assert NODE_IP not in d.bind


def test_nodeport_addresses_restrict_where_node_ports_listen() -> None:
    opts = ProxyOptions(
        family=4,
        node_name=NODE,
        node_ips=(NODE_IP, "10.0.0.5"),
        nodeport_ips=("10.0.0.5",),
    )
    d = render(nodeport_service(), [three_pods()], options=opts)
    assert {k.address for k in d.servers if k.port == 30080} == {"10.0.0.5"}


def test_udp_node_port_uses_the_udp_set() -> None:
    svc = make_service(
        type="NodePort", ports=(make_port(53, name="p80", protocol="UDP", node_port=30053),)
    )
    sl = make_slice(endpoints=[remote("10.244.2.11")], ports=(EndpointPort("p80", "UDP", 53),))
    d = render(svc, [sl])
    assert d.sets[R.NODE_PORT_UDP] == {"30053"} and not d.sets[R.NODE_PORT_TCP]


def test_external_policy_local_uses_local_endpoints_and_the_local_sets() -> None:
    d = render(nodeport_service(external_policy_local=True), [three_pods()])
    assert dest_ips(vs(d, NODE_IP, 30080)) == {"10.244.1.11"}
    # ClusterIP traffic still goes everywhere
    assert len(vs(d, "172.30.0.41", 80).dests) == 3
    assert d.sets[R.NODE_PORT_LOCAL_TCP] == {"30080"} and d.sets[R.NODE_PORT_TCP] == {"30080"}
    assert not d.sets[R.EXTERNAL_NO_LOCAL]


def test_external_policy_local_without_local_endpoints_drops_outside_traffic_only() -> None:
    sl = make_slice(endpoints=[remote("10.244.2.11"), remote("10.244.2.12")])
    d = render(nodeport_service(external_policy_local=True), [sl])
    # pods and the node keep reaching the service through the cluster-wide endpoints ...
    assert dest_ips(vs(d, NODE_IP, 30080)) == {"10.244.2.11", "10.244.2.12"}
    # ... and the companion rules drop traffic from outside the cluster
    assert d.sets[R.EXTERNAL_NO_LOCAL] == {f"{NODE_IP},tcp:30080"}
    assert not d.sets[R.NO_ENDPOINTS]


def test_health_check_node_port_is_in_its_set() -> None:
    # the API server allocates a health-check node port only to LoadBalancer + eTP Local
    # services (kube-proxy's NeedsHealthCheck); every mode honours it only there
    svc = lb_service(external_policy_local=True, health_check_node_port=32000)
    assert render(svc, [three_pods()]).sets[R.HEALTH_CHECK_NODE_PORT] == {"32000"}
    stray = nodeport_service(external_policy_local=True, health_check_node_port=32000)
    assert not render(stray, [three_pods()]).sets[R.HEALTH_CHECK_NODE_PORT]


# -- externalIPs and LoadBalancer IPs ------------------------------------------------------------
def test_external_ips_are_bound_unless_they_are_node_addresses() -> None:
    svc = make_service(external_ips=("203.0.113.7", NODE_IP))
    d = render(svc, [three_pods()])
    assert {R.VSKey("203.0.113.7", "TCP", 80), R.VSKey(NODE_IP, "TCP", 80)} <= set(d.servers)
    assert d.bind == {"172.30.0.41", "203.0.113.7"}
    assert d.sets[R.EXTERNAL_IP_SET] == {"203.0.113.7,tcp:80", f"{NODE_IP},tcp:80"}
    assert not d.sets[R.EXTERNAL_IP_LOCAL]


def test_external_ips_with_local_policy_go_to_the_local_set() -> None:
    d = render(
        make_service(external_ips=("203.0.113.7",), external_policy_local=True), [three_pods()]
    )
    assert d.sets[R.EXTERNAL_IP_LOCAL] == {"203.0.113.7,tcp:80"}
    assert not d.sets[R.EXTERNAL_IP_SET]
    assert dest_ips(vs(d, "203.0.113.7", 80)) == {"10.244.1.11"}


def lb_service(**kw: Any) -> Service:
    return make_service(
        type="LoadBalancer",
        ports=(make_port(80, name="p80", node_port=30080),),
        load_balancer_ips=("198.51.100.9",),
        **kw,
    )


def test_load_balancer_ip_is_a_bound_virtual_server_in_the_lb_set() -> None:
    d = render(lb_service(), [three_pods()])
    assert len(vs(d, "198.51.100.9", 80).dests) == 3
    assert "198.51.100.9" in d.bind
    assert d.sets[R.LB_SET] == {"198.51.100.9,tcp:80"}
    assert not d.sets[R.LB_FW] and not d.sets[R.LB_LOCAL]


def test_source_ranges_fill_the_firewall_sets() -> None:
    d = render(
        lb_service(load_balancer_source_ranges=("10.0.0.0/8", "203.0.113.5/32")), [three_pods()]
    )
    assert d.sets[R.LB_FW] == {"198.51.100.9,tcp:80"}
    assert d.sets[R.LB_SOURCE_CIDR] == {
        "198.51.100.9,tcp:80,10.0.0.0/8",
        "198.51.100.9,tcp:80,203.0.113.5",  # host prefixes print bare in `ipset save`
    }
    assert not d.sets[R.LB_SOURCE_IP]


def test_source_range_covering_the_node_lets_the_node_through() -> None:
    d = render(lb_service(load_balancer_source_ranges=("192.168.50.0/24",)), [three_pods()])
    assert d.sets[R.LB_SOURCE_IP] == {"198.51.100.9,tcp:80,198.51.100.9"}


def test_a_source_range_of_everything_means_no_filtering() -> None:
    d = render(lb_service(load_balancer_source_ranges=("10.0.0.0/8", "0.0.0.0/0")), [three_pods()])
    assert not d.sets[R.LB_FW] and not d.sets[R.LB_SOURCE_CIDR]


def test_load_balancer_with_local_policy() -> None:
    d = render(lb_service(external_policy_local=True), [three_pods()])
    assert d.sets[R.LB_LOCAL] == {"198.51.100.9,tcp:80"}
    assert dest_ips(vs(d, "198.51.100.9", 80)) == {"10.244.1.11"}


# -- internalTrafficPolicy, no endpoints, hairpin -----------------------------------------------
def test_internal_policy_local_uses_local_endpoints_for_the_cluster_ip() -> None:
    d = render(make_service(internal_policy_local=True), [three_pods()])
    assert dest_ips(vs(d, "172.30.0.41", 80)) == {"10.244.1.11"}


def test_internal_policy_local_without_local_endpoints_drops() -> None:
    sl = make_slice(endpoints=[remote("10.244.2.11")])
    d = render(make_service(internal_policy_local=True), [sl])
    assert vs(d, "172.30.0.41", 80).dests == ()
    assert d.sets[R.NO_LOCAL_ENDPOINTS] == {"172.30.0.41,tcp:80"}
    assert not d.sets[R.NO_ENDPOINTS]


def test_service_without_endpoints_is_rejected_on_every_destination() -> None:
    svc = lb_service(external_ips=("203.0.113.7",))
    d = render(svc, [])
    assert all(not s.dests for s in d.servers.values())
    assert d.sets[R.NO_ENDPOINTS] == {
        "172.30.0.41,tcp:80",
        "203.0.113.7,tcp:80",
        "198.51.100.9,tcp:80",
        f"{NODE_IP},tcp:30080",
    }
    # the VIPs stay bound, so the kernel keeps answering for them
    assert d.bind == {"172.30.0.41", "203.0.113.7", "198.51.100.9"}


def test_local_endpoints_are_in_the_hairpin_set() -> None:
    d = render(make_service(), [three_pods()])
    assert d.sets[R.LOOP_BACK] == {"10.244.1.11,tcp:80,10.244.1.11"}


# -- several services, IPv6 ----------------------------------------------------------------------
def test_two_services_claiming_one_virtual_server_first_wins_and_is_reported() -> None:
    a = make_service("ns1", "a", external_ips=("203.0.113.7",))
    b = make_service("ns1", "b", cluster_ips=("172.30.0.42",), external_ips=("203.0.113.7",))
    sa = make_slice(service="a", endpoints=[remote("10.244.2.11")])
    sb = make_slice(service="b", endpoints=[remote("10.244.2.99")])
    views = {
        a.ref: service_views(a, [sa], family=4, node_name=NODE),
        b.ref: service_views(b, [sb], family=4, node_name=NODE),
    }
    d = R.render_desired(views, OPTS)
    assert dest_ips(vs(d, "203.0.113.7", 80)) == {"10.244.2.11"}
    assert len(d.conflicts) == 1 and "ns1/a" in d.conflicts[0] and "ns1/b" in d.conflicts[0]


def test_ipv6_service() -> None:
    opts = ProxyOptions(family=6, node_name=NODE, node_ips=("fd00:50::11",))
    svc = nodeport_service(cluster_ips=("fd00:96::41",))
    sl = make_slice(endpoints=[local("fd00:10:244:1::11")], address_type="IPv6")
    d = render(svc, [sl], options=opts)
    assert set(d.servers) == {
        R.VSKey("fd00:96::41", "TCP", 80),
        R.VSKey("fd00:50::11", "TCP", 30080),
    }
    assert d.sets[R.CLUSTER_IP_SET] == {"fd00:96::41,tcp:80"}
    assert R.SET_SPECS[R.CLUSTER_IP_SET].name(6) == "KUBE-6-CLUSTER-IP"
    assert R.SET_SPECS[R.NODE_PORT_LOCAL_SCTP].name(6) == "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"
    assert all(len(n) <= 31 for n in R.set_names(6))
    assert str(R.VSKey("fd00:96::41", "TCP", 80)) == "TCP [fd00:96::41]:80"


def test_unproxied_services_contribute_nothing() -> None:
    headless = make_service(cluster_ips=(), headless=True)
    d = render(headless, [three_pods()])
    assert not d.servers and not d.bind and not any(d.sets.values())


# -- companion rules -----------------------------------------------------------------------------
def referenced_sets(text: str) -> set[str]:
    return set(re.findall(r"--match-set (\S+)", text))


@pytest.mark.parametrize("family", [4, 6])
def test_companion_rules_reference_only_kproxy_sets_of_their_family(family: int) -> None:
    text = RR.companion_rules(ProxyOptions(family=family, cluster_cidrs=()))
    assert referenced_sets(text) <= set(R.set_names(family))
    assert len(referenced_sets(text)) >= 15


def test_every_jump_target_is_declared_or_builtin() -> None:
    text = RR.companion_rules(OPTS)
    declared = set(re.findall(r"^:(\S+)", text, re.M))
    targets = set(re.findall(r"-j (\S+)", text))
    builtin = {"ACCEPT", "DROP", "RETURN", "REJECT", "MARK", "MASQUERADE"}
    assert targets <= declared | builtin
    assert {h.target for h in RR.HOOKS} <= declared


def test_companion_rules_do_not_grow_with_services() -> None:
    # The rules depend on the options only: nothing per service is in them.
    text = RR.companion_rules(OPTS)
    assert "172.30.0.41" not in text and text.count("\n-A ") < 60


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (OPTS, "! -s 10.244.0.0/16 -m comment"),
        (ProxyOptions(masquerade_all=True), "KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"),
        (ProxyOptions(), "KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ"),
        (
            ProxyOptions(cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16")),
            "KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ-OFFCLUSTER",
        ),
    ],
    ids=["one-cidr", "masquerade-all", "no-cidr", "two-cidrs"],
)
def test_cluster_ip_masquerade_variants(options: ProxyOptions, expected: str) -> None:
    assert expected in RR.companion_rules(options)


def test_node_ports_restricted_to_nodeport_addresses() -> None:
    text = RR.companion_rules(ProxyOptions(nodeport_ips=("10.0.0.5",)))
    assert "-A KUBE-SERVICES -d 10.0.0.5/32 -j KUBE-NODE-PORT" in text
    assert "--dst-type LOCAL -j KUBE-NODE-PORT" not in text


def test_no_endpoint_verdicts_only_touch_new_connections() -> None:
    text = RR.companion_rules(OPTS)
    for set_name in (R.NO_ENDPOINTS, R.NO_LOCAL_ENDPOINTS, R.EXTERNAL_NO_LOCAL):
        (line,) = [x for x in text.splitlines() if f"--match-set {set_name} " in x]
        assert "--ctstate NEW" in line


def test_hooks_for_input_put_the_ipvs_filter_first() -> None:
    assert [h.target for h in RR.hooks_for("filter", "INPUT")] == [
        "KUBE-IPVS-FILTER",
        "KUBE-PROXY-FIREWALL",
        "KUBE-NODE-PORT",
    ]


# -- the diff ------------------------------------------------------------------------------------
K = R.VSKey("172.30.0.41", "TCP", 80)
KU = R.VSKey("172.30.0.41", "UDP", 53)


def want(key: R.VSKey = K, *ips: str, scheduler: str = "rr", **kw: Any) -> R.VirtualServer:
    return R.VirtualServer(
        key=key, scheduler=scheduler, dests=tuple(R.Dest(ip, 8080) for ip in ips), **kw
    )


def seen(
    key: R.VSKey = K, *dests: D.ObservedDest, scheduler: str = "rr", flags: int = R.FLAG_HASHED
) -> D.ObservedVS:
    return D.ObservedVS(key=key, scheduler=scheduler, flags=flags, dests=dests)


def od(ip: str, weight: int = 1, active: int = 0, inactive: int = 0) -> D.ObservedDest:
    return D.ObservedDest(ip, 8080, weight, active, inactive)


def everything(key: R.VSKey) -> bool:
    return True


def nothing(key: R.VSKey) -> bool:
    return False


def diff(
    desired: Sequence[R.VirtualServer], observed: Sequence[D.ObservedVS], owned: Any = everything
) -> D.Plan:
    return D.diff_ipvs({v.key: v for v in desired}, {o.key: o for o in observed}, owned=owned)


def test_from_empty_adds_services_with_their_real_servers() -> None:
    plan = diff([want(K, "10.244.1.11", "10.244.2.11")], [])
    assert [type(op).__name__ for op in plan.ops] == ["AddVS"]
    assert plan.dests_added == 2
    assert not plan.draining


def test_matching_table_needs_nothing() -> None:
    plan = diff([want(K, "10.244.1.11")], [seen(K, od("10.244.1.11"))])
    assert plan.empty


def test_changed_scheduler_or_persistence_edits_the_service_in_place() -> None:
    assert diff([want(K, scheduler="wrr")], [seen(K)]).count(D.EditVS) == 1
    sticky = want(K, flags=R.FLAG_PERSISTENT, timeout=60)
    assert diff([sticky], [seen(K)]).count(D.EditVS) == 1
    again = D.ObservedVS(K, "rr", R.FLAG_PERSISTENT | R.FLAG_HASHED, 60)
    assert diff([sticky], [again]).empty


def test_removed_tcp_endpoint_drains_with_weight_zero_first() -> None:
    plan = diff([want(K, "10.244.1.11")], [seen(K, od("10.244.1.11"), od("10.244.2.11", active=2))])
    (op,) = plan.ops
    assert isinstance(op, D.EditDest) and op.dest == R.Dest("10.244.2.11", 8080, 0)
    assert plan.draining == {K}


def test_draining_endpoint_with_connections_is_left_alone() -> None:
    plan = diff([want(K)], [seen(K, od("10.244.2.11", weight=0, inactive=1))])
    assert plan.empty and plan.draining == {K}


def test_drained_endpoint_is_deleted() -> None:
    plan = diff([want(K)], [seen(K, od("10.244.2.11", weight=0))])
    assert plan.ops == (D.DelDest(K, "10.244.2.11", 8080),)
    assert not plan.draining


def test_removed_endpoint_without_connections_is_deleted_at_once() -> None:
    plan = diff([want(K)], [seen(K, od("10.244.2.11"))])
    assert plan.ops == (D.DelDest(K, "10.244.2.11", 8080),)


def test_udp_endpoint_is_deleted_at_once_even_with_connections() -> None:
    plan = diff([want(KU)], [seen(KU, od("10.244.2.11", active=3))])
    assert plan.ops == (D.DelDest(KU, "10.244.2.11", 8080),)
    assert not plan.draining


def test_returning_endpoint_is_restored_to_weight_one() -> None:
    plan = diff([want(K, "10.244.2.11")], [seen(K, od("10.244.2.11", weight=0, active=1))])
    assert plan.ops == (D.EditDest(K, R.Dest("10.244.2.11", 8080, 1)),)


def test_deleted_service_is_removed_only_when_owned() -> None:
    stale = seen(K, od("10.244.2.11"))
    assert diff([], [stale]).ops == (D.DelVS(K),)
    assert diff([], [stale], owned=nothing).empty


def test_ops_are_ordered_deletes_adds_edits() -> None:
    other = R.VSKey("172.30.0.99", "TCP", 80)
    plan = diff(
        [
            want(K, "10.244.1.11", scheduler="wrr"),
            want(R.VSKey("172.30.0.50", "TCP", 80), "10.244.1.12"),
        ],
        [seen(K, od("10.244.2.11")), seen(other)],
    )
    kinds = [type(op).__name__ for op in plan.ops]
    assert kinds == ["DelVS", "AddVS", "EditVS", "DelDest", "AddDest"]


def test_ownership_from_kernel_state() -> None:
    owned = D.owner_predicate(
        bound=["172.30.0.41"],
        sets={
            R.LB_SET: ["198.51.100.9,tcp:80"],
            R.NODE_PORT_UDP: ["30053"],
            R.NODE_PORT_TCP: ["30080"],
        },
    )
    assert owned(R.VSKey("172.30.0.41", "UDP", 5353))  # bound on kube-ipvs0
    assert owned(R.VSKey("198.51.100.9", "TCP", 80))  # in KUBE-LOAD-BALANCER
    assert owned(R.VSKey(NODE_IP, "UDP", 30053))  # a nodePort of ours
    assert not owned(R.VSKey(NODE_IP, "TCP", 30053))  # wrong protocol
    assert not owned(R.VSKey("10.1.2.3", "TCP", 80))  # someone else's


def test_ipvsadm_rules_text() -> None:
    server = R.VirtualServer(
        key=K,
        scheduler="mh",
        flags=R.FLAG_PERSISTENT | R.FLAG_SCHED2,
        timeout=60,
        dests=(R.Dest("10.244.1.11", 8080),),
    )
    assert R.ipvsadm_rules([server]) == (
        "-A -t 172.30.0.41:80 -s mh -b mh-port -p 60\n"
        "-a -t 172.30.0.41:80 -r 10.244.1.11:8080 -m -w 1\n"
    )


# -- the node's addresses as the proxier and `kproxy status` see them ------------------------------
def test_node_options_leave_the_vips_on_kube_ipvs0_out_of_the_node_addresses() -> None:
    from dataclasses import replace

    from kproxy.backends.ipvs import node_options

    amap = {
        "lo": {"127.0.0.1"},
        "eth0": {NODE_IP},
        "eth1": {"10.0.9.11"},
        R.DUMMY_DEVICE: {"10.96.0.10", "203.0.113.10"},
    }
    bound, opts = node_options(OPTS, amap)
    assert bound == {"10.96.0.10", "203.0.113.10"}
    assert set(opts.node_ips) == {"127.0.0.1", NODE_IP, "10.0.9.11"}
    assert opts.nodeport_ips is None  # NodePorts on every node address

    svc = make_service(type="NodePort", ports=(make_port(80, name="p80", node_port=30080),))
    keys = set(render(svc, options=opts).servers)
    assert {(k.address, k.port) for k in keys if k.port == 30080} == {
        (NODE_IP, 30080),
        ("10.0.9.11", 30080),
    }  # not on the VIPs, not on loopback

    # --nodeport-addresses picks among the node's addresses, never a VIP
    limited = replace(OPTS, nodeport_ips=(), nodeport_cidrs=("10.0.0.0/8",))
    _bound, opts = node_options(limited, amap)
    assert opts.nodeport_ips == ("10.0.9.11",)
