"""The packet tracer against rulesets kproxy renders: packet-flow checks in the style of
kube-proxy's proxier_test.go (source, destination, port -> DNAT targets, REJECT/DROP, masquerade),
including its own tables in its address conventions, plus the parser on real `iptables-save -c`
text and on iptables-restore edits, and the generic chain semantics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.inspect import iptrace as T
from kproxy.model.objects import EndpointPort, EndpointSlice, Service
from kproxy.model.options import ProxyOptions
from kproxy.model.view import service_views
from kproxy.render import chains as C
from kproxy.render.iptables import render_ruleset
from kproxy.render.ipvs import render_desired
from tests.support.builders import make_endpoint, make_port, make_service, make_slice
from tests.support.rulesets import as_installed, ipvs_companions_as_installed

NODE = "node1"
NODE_IP = "192.168.50.11"
GATEWAY = "10.244.1.1"
VIP = "172.30.0.41"
CLIENT = "192.168.50.2"  # off-cluster, not local
POD = "10.244.1.50"  # some pod in the cluster CIDR, not an endpoint
LOCAL = (NODE_IP, GATEWAY, "127.0.0.1")
OPTS = ProxyOptions(family=4, node_name=NODE, node_ips=(NODE_IP,), cluster_cidrs=("10.244.0.0/16",))
ENV = T.Environment(local_addresses=frozenset(LOCAL))


def ruleset(
    *services: tuple[Service, Sequence[EndpointSlice]], options: ProxyOptions = OPTS
) -> T.Ruleset:
    views = {
        svc.ref: service_views(svc, slices, family=options.family, node_name=NODE)
        for svc, slices in services
    }
    return as_installed(render_ruleset(views, options))


def local(ip: str, **kw: Any) -> Any:
    return make_endpoint(ip, node_name=NODE, **kw)


def remote(ip: str, **kw: Any) -> Any:
    return make_endpoint(ip, node_name="node2", **kw)


THREE = ("10.244.1.11", "10.244.2.11", "10.244.2.12")


def three_pods() -> EndpointSlice:
    return make_slice(endpoints=[local(THREE[0]), remote(THREE[1]), remote(THREE[2])])


def trace(
    rs: T.Ruleset,
    src: str,
    dst: str,
    port: int,
    *,
    hook: str = T.PREROUTING,
    proto: str = "tcp",
    env: T.Environment = ENV,
) -> tuple[T.Outcome, ...]:
    outcomes = T.trace_packet(rs, T.Packet(src, dst, port, proto), hook=hook, env=env)
    assert math.isclose(sum(o.probability for o in outcomes), 1.0, abs_tol=1e-9)
    return outcomes


def targets(outcomes: Sequence[T.Outcome]) -> dict[str, float]:
    out: dict[str, float] = {}
    for o in outcomes:
        out[o.dnat] = out.get(o.dnat, 0.0) + o.probability
    return out


def nodeport_service(**kw: Any) -> Service:
    return make_service(type="NodePort", ports=(make_port(80, name="p80", node_port=30080),), **kw)


# -- ClusterIP ---------------------------------------------------------------------------------
def test_cluster_ip_with_three_endpoints_splits_evenly() -> None:
    rs = ruleset((make_service(), [three_pods()]))
    outcomes = trace(rs, POD, VIP, 80)
    got = targets(outcomes)
    assert set(got) == {f"{ip}:80" for ip in THREE}
    for p in got.values():
        assert math.isclose(p, 1 / 3, abs_tol=1e-6)
    for o in outcomes:
        assert o.verdict == "accept" and not o.masquerade and o.filter_chain == "FORWARD"
        assert o.after.dst in THREE and o.after.dport == 80


def test_random_rules_show_the_branches_not_taken() -> None:
    rs = ruleset((make_service(), [three_pods()]))
    last = next(o for o in trace(rs, POD, VIP, 80) if o.dnat == f"{THREE[2]}:80")
    passed = [s for s in last.steps if not s.taken]
    assert len(passed) == 2 and all(s.chain.startswith(C.SVC_PREFIX) for s in passed)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=40))
def test_any_number_of_endpoints_gets_an_equal_share(n: int) -> None:
    ips = [f"10.244.2.{i + 1}" for i in range(n)]
    rs = ruleset((make_service(), [make_slice(endpoints=[remote(ip) for ip in ips])]))
    got = targets(trace(rs, POD, VIP, 80))
    assert set(got) == {f"{ip}:80" for ip in ips}
    assert all(math.isclose(p, 1 / n, abs_tol=1e-6) for p in got.values())


def test_cluster_ip_from_the_node_is_masqueraded() -> None:
    rs = ruleset((make_service(), [three_pods()]))
    outcomes = trace(rs, NODE_IP, VIP, 80, hook=T.OUTPUT)
    assert set(targets(outcomes)) == {f"{ip}:80" for ip in THREE}
    for o in outcomes:
        assert o.filter_chain == "OUTPUT" and o.masquerade
        assert o.mark_by is not None and o.mark_by.chain.startswith(C.SVC_PREFIX)
        assert o.masquerade_rule is not None and o.masquerade_rule.target == "MASQUERADE"


def test_wrong_port_or_address_is_not_touched() -> None:
    rs = ruleset((make_service(), [three_pods()]))
    for dst, port in ((VIP, 81), ("172.30.0.42", 80)):
        (o,) = trace(rs, POD, dst, port)
        assert o.dnat == "" and o.verdict == "accept" and not o.masquerade
        assert not any(C.is_service_chain(s.chain) for s in o.steps)


def test_udp_packet_does_not_match_a_tcp_port() -> None:
    rs = ruleset((make_service(), [three_pods()]))
    (o,) = trace(rs, POD, VIP, 80, proto="udp")
    assert o.dnat == ""


def test_pod_reaching_itself_is_masqueraded_hairpin() -> None:
    rs = ruleset((make_service(), [make_slice(endpoints=[local(THREE[0])])]))
    (o,) = trace(rs, THREE[0], VIP, 80)
    assert o.dnat == f"{THREE[0]}:80" and o.masquerade
    assert o.mark_by is not None and o.mark_by.chain.startswith(C.SEP_PREFIX)


def test_no_endpoints_is_rejected_by_filter() -> None:
    rs = ruleset((make_service(), [make_slice(endpoints=[])]))
    for hook, src in ((T.PREROUTING, POD), (T.OUTPUT, NODE_IP)):
        (o,) = trace(rs, src, VIP, 80, hook=hook)
        assert o.verdict == "reject" and o.dnat == ""
        assert o.verdict_rule is not None and "has no endpoints" in o.verdict_rule.comment
        assert o.verdict_rule.chain == C.SERVICES and o.verdict_rule.table == "filter"


def test_several_cluster_cidrs_return_before_marking() -> None:
    opts = ProxyOptions(
        family=4,
        node_name=NODE,
        node_ips=(NODE_IP,),
        cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16"),
    )
    rs = ruleset((make_service(), [three_pods()]), options=opts)
    assert all(not o.masquerade for o in trace(rs, "10.245.3.3", VIP, 80))
    assert all(o.masquerade for o in trace(rs, CLIENT, VIP, 80))


# -- external traffic --------------------------------------------------------------------------
def test_nodeport_from_outside_reaches_every_endpoint_masqueraded() -> None:
    rs = ruleset((nodeport_service(), [three_pods()]))
    outcomes = trace(rs, CLIENT, NODE_IP, 30080)
    got = targets(outcomes)
    assert set(got) == {f"{ip}:80" for ip in THREE}
    assert all(math.isclose(p, 1 / 3, abs_tol=1e-6) for p in got.values())
    for o in outcomes:
        assert o.masquerade and o.verdict == "accept"
        assert o.mark_by is not None and o.mark_by.chain.startswith(C.EXT_PREFIX)


def test_nodeport_on_another_address_or_loopback_is_not_translated() -> None:
    rs = ruleset((nodeport_service(), [three_pods()]))
    (o,) = trace(rs, CLIENT, "192.168.50.99", 30080)
    assert o.dnat == ""
    (o,) = trace(rs, NODE_IP, "127.0.0.1", 30080, hook=T.OUTPUT)
    assert o.dnat == ""


def test_external_policy_local_keeps_the_client_address() -> None:
    rs = ruleset((nodeport_service(external_policy_local=True), [three_pods()]))
    outcomes = trace(rs, CLIENT, NODE_IP, 30080)
    assert set(targets(outcomes)) == {f"{THREE[0]}:80"}  # the local endpoint only
    assert all(not o.masquerade for o in outcomes)
    assert any(s.chain.startswith(C.SVL_PREFIX) for s in outcomes[0].steps)
    # the ClusterIP still uses every endpoint
    assert set(targets(trace(rs, POD, VIP, 80))) == {f"{ip}:80" for ip in THREE}


def test_external_policy_local_without_local_endpoints_drops_external_traffic() -> None:
    svc = nodeport_service(external_policy_local=True)
    rs = ruleset((svc, [make_slice(endpoints=[remote(THREE[1])])]))
    (o,) = trace(rs, CLIENT, NODE_IP, 30080)
    assert o.verdict == "drop" and o.dnat == ""
    assert o.verdict_rule is not None and "has no local endpoints" in o.verdict_rule.comment
    assert o.filter_chain == "INPUT"
    assert set(targets(trace(rs, POD, VIP, 80))) == {f"{THREE[1]}:80"}


def test_external_ip_from_a_pod_short_circuits_under_local_policy() -> None:
    svc = make_service(external_ips=("198.51.100.10",), external_policy_local=True)
    rs = ruleset((svc, [three_pods()]))
    # a pod: as if it went out to the external IP and back, so every endpoint
    assert set(targets(trace(rs, POD, "198.51.100.10", 80))) == {f"{ip}:80" for ip in THREE}
    # from outside: local endpoints only, source preserved
    outcomes = trace(rs, CLIENT, "198.51.100.10", 80)
    assert set(targets(outcomes)) == {f"{THREE[0]}:80"} and not outcomes[0].masquerade


def lb_service(ranges: tuple[str, ...]) -> Service:
    return make_service(
        type="LoadBalancer",
        load_balancer_ips=("203.0.113.10",),
        load_balancer_source_ranges=ranges,
        ports=(make_port(80, name="p80", node_port=30080),),
    )


def test_source_ranges_admit_listed_sources_and_drop_the_rest() -> None:
    rs = ruleset((lb_service(("192.168.50.0/28",)), [three_pods()]))
    allowed = trace(rs, CLIENT, "203.0.113.10", 80)
    assert set(targets(allowed)) == {f"{ip}:80" for ip in THREE}
    assert all(o.masquerade for o in allowed)
    (o,) = trace(rs, "198.51.100.77", "203.0.113.10", 80)
    assert o.verdict == "drop" and o.dnat == ""
    assert o.verdict_rule is not None and o.verdict_rule.chain == C.PROXY_FIREWALL
    # the NodePort is not filtered by source ranges
    assert trace(rs, "198.51.100.77", NODE_IP, 30080)[0].dnat


# -- affinity ----------------------------------------------------------------------------------
def test_affinity_new_client_is_spread_and_remembered() -> None:
    rs = ruleset((make_service(affinity_timeout=600), [three_pods()]))
    outcomes = trace(rs, POD, VIP, 80)
    assert set(targets(outcomes)) == {f"{ip}:80" for ip in THREE}
    for o in outcomes:
        assert not o.pinned
        (name,) = o.recent_set
        assert name.startswith(C.SEP_PREFIX)
        assert rs.recent_seconds(name) == 600


def test_affinity_known_client_is_pinned() -> None:
    rs = ruleset((make_service(affinity_timeout=600), [three_pods()]))
    fresh = trace(rs, POD, VIP, 80)
    chosen = fresh[1]
    env = T.Environment(
        local_addresses=frozenset(LOCAL), recent={chosen.recent_set[0]: frozenset({POD})}
    )
    (o,) = trace(rs, POD, VIP, 80, env=env)
    assert o.dnat == chosen.dnat and o.pinned == chosen.recent_set
    # another client is not pinned
    assert len(trace(rs, "10.244.3.3", VIP, 80, env=env)) == 3


# -- kube-proxy's packet-flow tables ------------------------------------------------------------
# The cases of kube-proxy's proxier_test.go, in its address conventions: pods 10.0.0.0/8,
# ClusterIPs 172.30.0.0/16, node 192.168.0.2 (also 192.168.1.2, 192.168.99.11), LB IPs 1.2.3.4
# and 5.6.7.8, clients off the cluster in 203.0.113.0/24, of which 203.0.113.0/25 is in the LB
# source range.
K_NODE_IP, K_NODE_IP_ALT, K_NODE_EXTERNAL_IP = "192.168.0.2", "192.168.1.2", "192.168.99.11"
K_NODE_IPS = (K_NODE_IP, K_NODE_IP_ALT, K_NODE_EXTERNAL_IP)
K_POD = "10.0.0.2"
K_CLIENT = "203.0.113.2"
K_CLIENT_BLOCKED = "203.0.113.130"
K_OPTS = ProxyOptions(node_name=NODE, node_ips=(K_NODE_IP,), cluster_cidrs=("10.0.0.0/8",))


@dataclass(frozen=True)
class Flow:
    name: str
    src: str
    dst: str
    port: int
    output: str  # T.flow_output: "ip:port, ...", "DROP", "REJECT" or "" (untouched)
    masq: bool = False
    proto: str = "tcp"


def check(rs: T.Ruleset, flows: Sequence[Flow], *, local: Sequence[str] = K_NODE_IPS) -> None:
    """Each flow enters at nat OUTPUT when its source is a node address, else at PREROUTING."""
    env = T.Environment(local_addresses=frozenset(local))
    errors = []
    for f in flows:
        hook = T.OUTPUT if env.is_local(f.src) else T.PREROUTING
        outcomes = trace(rs, f.src, f.dst, f.port, hook=hook, proto=f.proto, env=env)
        got, masq = T.flow_output(outcomes), {o.masquerade for o in outcomes}
        if got != f.output or (f.output not in ("DROP", "REJECT") and masq != {f.masq}):
            path = "\n    ".join(
                f"{s.chain} {s.rule.text}" for o in outcomes for s in o.steps if s.rule
            )
            errors.append(
                f"{f.name}: {f.src} -> {f.dst}:{f.port}/{f.proto}: expected {f.output!r} "
                f"masq={f.masq}, got {got!r} masq={masq}\n    {path}"
            )
    assert not errors, "\n".join(errors)


def test_flow_cluster_ip_ports_and_protocols() -> None:
    rs = ruleset(
        (
            make_service("ns1", "svc1", ports=(make_port(80, name="http"),)),
            [
                make_slice(
                    "ns1",
                    "svc1",
                    endpoints=[local("10.180.0.1")],
                    ports=[EndpointPort("http", "TCP", 80)],
                )
            ],
        ),
        (
            make_service(
                "ns2",
                "svc2",
                cluster_ips=("172.30.0.42",),
                ports=(
                    make_port(80, name="http"),
                    make_port(443, name="https", target=8443),
                    make_port(53, name="dns-udp", protocol="UDP"),
                    make_port(53, name="dns-tcp", target=5353),
                    make_port(53, name="dns-sctp", protocol="SCTP"),
                ),
            ),
            [
                make_slice(
                    "ns2",
                    "svc2",
                    endpoints=[local("10.180.0.1"), remote("10.180.2.1")],
                    ports=[
                        EndpointPort("http", "TCP", 80),
                        EndpointPort("https", "TCP", 8443),
                        EndpointPort("dns-udp", "UDP", 53),
                        EndpointPort("dns-tcp", "TCP", 5353),
                        EndpointPort("dns-sctp", "SCTP", 53),
                    ],
                )
            ],
        ),
        options=K_OPTS,
    )
    both = "10.180.0.1:{0}, 10.180.2.1:{0}"
    check(
        rs,
        [
            Flow("simple clusterIP", "10.180.0.2", VIP, 80, "10.180.0.1:80"),
            Flow("hairpin to cluster IP", "10.180.0.1", VIP, 80, "10.180.0.1:80", True),
            Flow("multiple endpoints", "10.180.0.2", "172.30.0.42", 80, both.format(80)),
            Flow("targetPort", "10.180.0.2", "172.30.0.42", 443, both.format(8443)),
            Flow("same port, TCP", "10.180.0.2", "172.30.0.42", 53, both.format(5353)),
            Flow("same port, UDP", "10.180.0.2", "172.30.0.42", 53, both.format(53), proto="udp"),
            Flow("same port, SCTP", "10.180.0.2", "172.30.0.42", 53, both.format(53), proto="sctp"),
            Flow("TCP-only port, UDP", "10.180.0.2", "172.30.0.42", 80, "", proto="udp"),
            Flow("svc1 has no 443", "10.180.0.2", VIP, 443, ""),
            Flow("off-cluster client is masqueraded", K_CLIENT, VIP, 80, "10.180.0.1:80", True),
        ],
    )


def test_flow_masquerade_all_marks_pod_traffic_too() -> None:
    opts = ProxyOptions(node_name=NODE, masquerade_all=True)
    rs = ruleset(
        (make_service(), [make_slice(endpoints=[make_endpoint("10.180.0.1")])]), options=opts
    )
    check(rs, [Flow("pod to cluster IP", K_POD, VIP, 80, "10.180.0.1:80", True)])


def test_flow_without_cluster_cidr_only_hairpin_is_masqueraded() -> None:
    opts = ProxyOptions(node_name=NODE)
    rs = ruleset(
        (make_service(), [make_slice(endpoints=[make_endpoint("10.180.0.1")])]), options=opts
    )
    check(
        rs,
        [
            Flow("off-cluster client", K_CLIENT, VIP, 80, "10.180.0.1:80", False),
            Flow("hairpin", "10.180.0.1", VIP, 80, "10.180.0.1:80", True),
        ],
    )


def test_flow_no_endpoints_reject_on_every_address() -> None:
    svc = make_service(
        type="LoadBalancer",
        external_ips=(K_NODE_EXTERNAL_IP,),
        load_balancer_ips=("1.2.3.4",),
        ports=(make_port(80, name="p80", node_port=3001),),
    )
    check(
        ruleset((svc, []), options=K_OPTS),
        [
            Flow("pod to cluster IP", K_POD, VIP, 80, "REJECT"),
            Flow("external to external IP", K_CLIENT, K_NODE_EXTERNAL_IP, 80, "REJECT"),
            Flow("pod to NodePort", K_POD, K_NODE_IP, 3001, "REJECT"),
            Flow("external to NodePort", K_CLIENT, K_NODE_IP, 3001, "REJECT"),
            Flow("pod to LoadBalancer IP", K_POD, "1.2.3.4", 80, "REJECT"),
            Flow("external to LoadBalancer IP", K_CLIENT, "1.2.3.4", 80, "REJECT"),
            Flow("node to cluster IP", K_NODE_IP, VIP, 80, "REJECT"),
        ],
    )


def test_flow_load_balancer_with_source_ranges() -> None:
    svc = make_service(
        type="LoadBalancer",
        ports=(make_port(80, name="p80", node_port=3001),),
        load_balancer_ips=("1.2.3.4", "5.6.7.8"),
        load_balancer_source_ranges=("192.168.0.0/24", "203.0.113.0/25"),
    )
    rs = ruleset((svc, [make_slice(endpoints=[make_endpoint("10.180.0.1")])]), options=K_OPTS)
    ep = "10.180.0.1:80"
    check(
        rs,
        [
            Flow("pod to cluster IP", K_POD, VIP, 80, ep),
            Flow("external to nodePort", K_CLIENT, K_NODE_IP, 3001, ep, True),
            Flow("nodePort bypasses source ranges", K_CLIENT_BLOCKED, K_NODE_IP, 3001, ep, True),
            Flow("accepted external to LB1", K_CLIENT, "1.2.3.4", 80, ep, True),
            Flow("accepted external to LB2", K_CLIENT, "5.6.7.8", 80, ep, True),
            Flow("blocked external to LB1", K_CLIENT_BLOCKED, "1.2.3.4", 80, "DROP"),
            Flow("blocked external to LB2", K_CLIENT_BLOCKED, "5.6.7.8", 80, "DROP"),
            Flow("pod to LB1 (not in the ranges)", K_POD, "1.2.3.4", 80, "DROP"),
            Flow("node to LB1 (node IP in the ranges)", K_NODE_IP, "1.2.3.4", 80, ep, True),
            Flow("node to LB2, SNATted to LB2", "5.6.7.8", "5.6.7.8", 80, ep, True),
        ],
    )


@pytest.mark.parametrize(
    ("family", "nodeport_ips", "alt_allowed"),
    [
        (4, None, True),
        (4, (K_NODE_IP, "127.0.0.1"), False),
        (6, None, True),
        (6, ("2001:db8::1",), False),
    ],
    ids=["v4-all-addresses", "v4-nodeport-addresses", "v6-all-addresses", "v6-nodeport-addresses"],
)
def test_flow_node_ports(
    family: int, nodeport_ips: tuple[str, ...] | None, alt_allowed: bool
) -> None:
    if family == 4:
        vip, eps, pod, client, node, alt, lo = (
            VIP,
            ("10.180.0.1", "10.180.2.1"),
            K_POD,
            K_CLIENT,
            K_NODE_IP,
            K_NODE_IP_ALT,
            "127.0.0.1",
        )
        cidr, local_ips, fmt = "10.0.0.0/8", list(K_NODE_IPS), "{}:80"
    else:
        vip, eps, pod, client, node, alt, lo = (
            "fd00:172:30::41",
            ("fd00:10:180::1", "fd00:10:180::2:1"),
            "fd00:10::2",
            "2600:5200::1",
            "2001:db8::1",
            "2001:db8:1::2",
            "::1",
        )
        cidr, local_ips, fmt = "fd00:10::/64", ["2001:db8::1", "2001:db8:1::2"], "[{}]:80"
    opts = ProxyOptions(
        family=family,
        node_name=NODE,
        node_ips=(node,),
        nodeport_ips=nodeport_ips,
        cluster_cidrs=(cidr,),
    )
    svc = make_service(
        type="NodePort", cluster_ips=(vip,), ports=(make_port(80, name="p80", node_port=3001),)
    )
    eps_slice = make_slice(
        endpoints=[make_endpoint(eps[0]), local(eps[1])],
        address_type="IPv4" if family == 4 else "IPv6",
    )
    both = ", ".join(fmt.format(e) for e in eps)
    check(
        ruleset((svc, [eps_slice]), options=opts),
        [
            Flow("pod to cluster IP", pod, vip, 80, both),
            Flow("external to nodePort", client, node, 3001, both, True),
            Flow("node to nodePort", node, node, 3001, both, True),
            Flow("localhost to nodePort is ignored", lo, lo, 3001, ""),
            Flow("secondary address", client, alt, 3001, both if alt_allowed else "", alt_allowed),
        ],
        local=local_ips,
    )


def test_flow_external_ips_under_cluster_policy() -> None:
    svc = make_service(external_ips=("192.168.99.33",))
    eps = [make_endpoint("10.180.0.4"), local("10.180.0.5")]
    rs = ruleset((svc, [make_slice(endpoints=eps)]), options=K_OPTS)
    both = "10.180.0.4:80, 10.180.0.5:80"
    check(
        rs,
        [
            Flow("external to external IP", K_CLIENT, "192.168.99.33", 80, both, True),
            # Cluster policy: anything to an external destination is masqueraded
            Flow("pod to external IP", K_POD, "192.168.99.33", 80, both, True),
            Flow("external IP on another port", K_CLIENT, "192.168.99.33", 81, ""),
        ],
    )


def etp_local(*endpoints: Any) -> T.Ruleset:
    svc = make_service(
        type="LoadBalancer",
        ports=(make_port(80, name="p80", node_port=3001),),
        load_balancer_ips=("1.2.3.4",),
        external_ips=("192.168.99.22",),
        external_policy_local=True,
        health_check_node_port=30000,
    )
    return ruleset((svc, [make_slice(endpoints=list(endpoints))]), options=K_OPTS)


def test_flow_external_traffic_policy_local() -> None:
    rs = etp_local(local("10.180.0.1"), remote("10.180.2.1"))
    here, both = "10.180.0.1:80", "10.180.0.1:80, 10.180.2.1:80"
    check(
        rs,
        [
            Flow("pod to cluster IP", K_POD, VIP, 80, both),
            Flow("external to NodePort: local only, source kept", K_CLIENT, K_NODE_IP, 3001, here),
            Flow("external to LB IP", K_CLIENT, "1.2.3.4", 80, here),
            Flow("external to external IP", K_CLIENT, "192.168.99.22", 80, here),
            Flow("pod to LB IP: short-circuit, all", K_POD, "1.2.3.4", 80, both),
            Flow("pod to NodePort", K_POD, K_NODE_IP, 3001, both),
            Flow("node to NodePort: all, masqueraded", K_NODE_IP, K_NODE_IP, 3001, both, True),
            Flow("node to LB IP", K_NODE_IP, "1.2.3.4", 80, both, True),
        ],
    )


def test_flow_external_traffic_policy_local_without_local_endpoints() -> None:
    rs = etp_local(remote("10.180.2.1"))
    there = "10.180.2.1:80"
    check(
        rs,
        [
            Flow("external to NodePort", K_CLIENT, K_NODE_IP, 3001, "DROP"),
            Flow("external to LB IP", K_CLIENT, "1.2.3.4", 80, "DROP"),
            Flow("external to external IP", K_CLIENT, "192.168.99.22", 80, "DROP"),
            Flow("pod to LB IP still works", K_POD, "1.2.3.4", 80, there),
            Flow("node to NodePort still works", K_NODE_IP, K_NODE_IP, 3001, there, True),
            Flow("pod to cluster IP", K_POD, VIP, 80, there),
        ],
    )


def test_flow_internal_traffic_policy_local() -> None:
    svc = make_service(internal_policy_local=True)
    with_local = ruleset(
        (svc, [make_slice(endpoints=[local("10.180.0.1"), remote("10.180.2.1")])]), options=K_OPTS
    )
    check(with_local, [Flow("only the local endpoint", K_POD, VIP, 80, "10.180.0.1:80")])
    without = ruleset((svc, [make_slice(endpoints=[remote("10.180.2.1")])]), options=K_OPTS)
    check(
        without,
        [
            Flow("no local endpoint: dropped, not rejected", K_POD, VIP, 80, "DROP"),
            Flow("from the node too", K_NODE_IP, VIP, 80, "DROP"),
        ],
    )


def test_flow_terminating_endpoints_fallback() -> None:
    def go(*eps: Any) -> T.Ruleset:
        return ruleset((make_service(), [make_slice(endpoints=list(eps))]), options=K_OPTS)

    ready, terminating, gone = (
        local("10.180.0.1"),
        local("10.180.0.2", ready=False, terminating=True),
        local("10.180.0.3", ready=False, serving=False, terminating=True),
    )
    check(go(ready, terminating, gone), [Flow("ready wins", K_POD, VIP, 80, "10.180.0.1:80")])
    check(go(terminating, gone), [Flow("serving+terminating", K_POD, VIP, 80, "10.180.0.2:80")])
    check(go(gone), [Flow("none serving: reject", K_POD, VIP, 80, "REJECT")])
    # Local policy falls back per node: a remote ready endpoint does not help here
    svc = make_service(
        type="NodePort",
        ports=(make_port(80, name="p80", node_port=3001),),
        external_policy_local=True,
    )
    rs = ruleset((svc, [make_slice(endpoints=[remote("10.180.2.1"), terminating])]), options=K_OPTS)
    check(
        rs,
        [
            Flow("external: local terminating one", K_CLIENT, K_NODE_IP, 3001, "10.180.0.2:80"),
            Flow("pod: cluster-wide ready one", K_POD, VIP, 80, "10.180.2.1:80"),
        ],
    )


# -- IPVS companion rules ----------------------------------------------------------------------
def test_ipvs_companion_rules_with_ipset_membership() -> None:
    svc = make_service()
    empty = make_service(name="empty", cluster_ips=("172.30.0.42",))
    views = {
        svc.ref: service_views(svc, [three_pods()], family=4, node_name=NODE),
        empty.ref: service_views(empty, [make_slice(service="empty")], family=4, node_name=NODE),
    }
    desired = render_desired(views, OPTS)
    rs = ipvs_companions_as_installed(OPTS)
    env = T.Environment(local_addresses=frozenset((*LOCAL, *desired.bind)), sets=dict(desired.sets))
    # off-cluster client to the ClusterIP: accepted in nat (IPVS translates later), marked
    (o,) = trace(rs, CLIENT, VIP, 80, env=env)
    assert o.dnat == "" and o.verdict == "accept" and o.filter_chain == "INPUT" and o.marked
    (o,) = trace(rs, POD, VIP, 80, env=env)
    assert not o.marked and o.verdict == "accept"
    (o,) = trace(rs, POD, "172.30.0.42", 80, env=env)
    assert o.verdict == "reject"
    # without the ipset contents nothing matches, and the trace says why
    (o,) = trace(rs, CLIENT, VIP, 80, env=T.Environment(local_addresses=frozenset(LOCAL)))
    assert not o.marked and any("ipset" in n for n in o.notes)


# -- parser and chain semantics ----------------------------------------------------------------
SAVED = """# Generated by iptables-save v1.8.9 (nf_tables) on Sun Nov 22 04:51:07 2026
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-A - [0:0]
:KUBE-SEP-B - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-X - [0:0]
[10:600] -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
[0:0] -A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
[10:600] -A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
[10:600] -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
[0:0] -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
[10:600] -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
[10:600] -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
[0:0] -A KUBE-SEP-A -s 10.244.1.11/32 -m comment --comment "default/x:http" -j KUBE-MARK-MASQ
[4:240] -A KUBE-SEP-A -p tcp -m comment --comment "default/x:http" -m tcp -j DNAT --to-destination 10.244.1.11:80
[0:0] -A KUBE-SEP-B -s 10.244.1.12/32 -m comment --comment "default/x:http" -j KUBE-MARK-MASQ
[6:360] -A KUBE-SEP-B -p tcp -m comment --comment "default/x:http" -m tcp -j DNAT --to-destination 10.244.1.12:80
[0:0] -A KUBE-SERVICES -d 10.96.0.80/32 -p tcp -m comment --comment "default/x:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-X
[0:0] -A KUBE-SERVICES ! -d 127.0.0.0/8 -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
[0:0] -A KUBE-SVC-X ! -s 10.244.0.0/16 -d 10.96.0.80/32 -p tcp -m comment --comment "default/x:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
[4:240] -A KUBE-SVC-X -m comment --comment "default/x:http -> 10.244.1.11:80" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-A
[6:360] -A KUBE-SVC-X -m comment --comment "default/x:http -> 10.244.1.12:80" -j KUBE-SEP-B
COMMIT
"""  # noqa: E501


def test_saved_text_with_counters_parses() -> None:
    rs = T.parse_save(SAVED)
    dnat = rs.rules("nat", "KUBE-SEP-B")[1]
    assert (dnat.pkts, dnat.bytes) == (6, 360)
    assert dnat.target == "DNAT" and dnat.option("--to-destination") == "10.244.1.12:80"
    assert dnat.comment == "default/x:http" and dnat.index == 2
    rule = rs.rules("nat", "KUBE-SVC-X")[0]
    assert [(c.kind, c.negate) for c in rule.conditions if c.kind in ("src", "dst")] == [
        ("src", True),
        ("dst", False),
    ]
    assert rs.rules("nat", "KUBE-SVC-X")[1].probability == 0.5
    assert rs.chain("nat", "PREROUTING") is not None
    assert rs.chain("nat", "PREROUTING").policy == "ACCEPT"  # type: ignore[union-attr]
    assert not rs.chain("nat", "KUBE-SVC-X").builtin  # type: ignore[union-attr]


def test_saved_text_traces_like_the_rendered_text() -> None:
    rs = T.parse_save(SAVED)
    outcomes = trace(rs, POD, "10.96.0.80", 80)
    assert targets(outcomes) == pytest.approx({"10.244.1.11:80": 0.5, "10.244.1.12:80": 0.5})
    # a reference to a chain that does not exist is reported, not followed
    (o,) = trace(rs, CLIENT, NODE_IP, 30080)
    assert o.dnat == "" and any("KUBE-NODEPORTS" in n for n in o.notes)


def test_flushed_endpoint_chain_falls_through_to_the_next_rule() -> None:
    text = SAVED.replace(
        '[4:240] -A KUBE-SEP-A -p tcp -m comment --comment "default/x:http" -m tcp -j DNAT '
        "--to-destination 10.244.1.11:80\n",
        "",
    )
    outcomes = trace(T.parse_save(text), POD, "10.96.0.80", 80)
    # the half that went into the empty chain came back and took the last rule
    assert targets(outcomes) == pytest.approx({"10.244.1.12:80": 1.0})


def test_goto_return_and_loops() -> None:
    text = """*filter
:INPUT ACCEPT [0:0]
:A - [0:0]
:B - [0:0]
:LOOP - [0:0]
-A INPUT -p udp -j LOOP
-A INPUT -p tcp -g A
-A INPUT -j DROP
-A A -d 10.0.0.1 -j RETURN
-A A -j B
-A B -m mark --mark 0x1/0x1 -j REJECT --reject-with icmp-port-unreachable
-A LOOP -j LOOP
COMMIT
"""
    rs = T.parse_save(text)

    def verdict(dst: str, proto: str = "tcp", mark: int = 0) -> str:
        (w,) = T.walk(rs, "filter", "INPUT", T.Packet(CLIENT, dst, 1, proto, mark=mark))
        return w.verdict

    # goto: a RETURN from A goes back past INPUT's caller: the policy applies, not the DROP
    assert verdict("10.0.0.1") == "ACCEPT"
    assert verdict("10.0.0.2") == "ACCEPT"
    assert verdict("10.0.0.2", mark=1) == "REJECT"
    (w,) = T.walk(rs, "filter", "INPUT", T.Packet(CLIENT, "10.0.0.2", 1, "udp"))
    assert w.verdict == "DROP" and any("deeper" in n for n in w.notes)


@pytest.mark.parametrize(
    ("spec", "before", "after"),
    [
        ("--set-xmark 0x4000/0x4000", 0x1, 0x4001),
        ("--set-xmark 0x4000/0x0", 0x4001, 0x1),
        ("--or-mark 0x4000", 0x2, 0x4002),
        ("--xor-mark 0x4000", 0x4002, 0x2),
        ("--and-mark 0xff", 0x4102, 0x2),
        ("--set-mark 0x8", 0x4102, 0x8),
    ],
    ids=["set-xmark", "clear", "or", "xor", "and", "set"],
)
def test_mark_arithmetic(spec: str, before: int, after: int) -> None:
    rs = T.parse_save(f"*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j MARK {spec}\nCOMMIT\n")
    (w,) = T.walk(rs, "nat", "OUTPUT", T.Packet(NODE_IP, VIP, 80, mark=before))
    assert w.mark == after


def test_set_entries_match_by_direction() -> None:
    sets = {
        "S-IPPORT": frozenset({"172.30.0.41,tcp:80"}),
        "S-PORT": frozenset({"30080"}),
        "S-NET": frozenset({"203.0.113.10,tcp:80,192.168.50.0/24"}),
    }
    text = """*filter
:INPUT ACCEPT [0:0]
-A INPUT -m set --match-set S-IPPORT dst,dst -j REJECT
-A INPUT -m set --match-set S-PORT dst -j DROP
-A INPUT -m set ! --match-set S-NET dst,dst,src -j DROP
COMMIT
"""
    rs = T.parse_save(text)
    env = T.Environment(sets=sets)

    def verdict(src: str, dst: str, port: int, proto: str = "tcp") -> str:
        (w,) = T.walk(rs, "filter", "INPUT", T.Packet(src, dst, port, proto), env=env)
        return w.verdict

    assert verdict(CLIENT, VIP, 80) == "REJECT"
    assert verdict(CLIENT, VIP, 80, "udp") == "DROP"  # not in S-IPPORT, not in S-NET
    assert verdict(CLIENT, NODE_IP, 30080) == "DROP"
    assert verdict(CLIENT, "203.0.113.10", 80) == "ACCEPT"
    assert verdict("198.51.100.1", "203.0.113.10", 80) == "DROP"


def test_describe_rule_reads_like_the_rule() -> None:
    rule = T.parse_save(SAVED).rules("nat", "KUBE-SVC-X")[0]
    text = T.describe_rule(rule)
    assert '"default/x:http cluster IP"' in text
    assert "source not in 10.244.0.0/16" in text and "dport 80" in text
    assert T.describe_target(rule) == "-> KUBE-MARK-MASQ"


def test_ipset_save_and_hostports() -> None:
    sets = T.parse_ipset_save(
        "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536\n"
        "add KUBE-CLUSTER-IP 10.96.0.1,tcp:443\n"
        "create KUBE-EMPTY bitmap:port range 0-65535\n"
        "add KUBE-X 10.0.0.0/8 nomatch\n"
    )
    assert sets == {
        "KUBE-CLUSTER-IP": frozenset({"10.96.0.1,tcp:443"}),
        "KUBE-EMPTY": frozenset(),
        "KUBE-X": frozenset(),
    }
    assert T.split_hostport("10.0.0.1:80") == ("10.0.0.1", 80)
    assert T.split_hostport("[fd00::1]:443") == ("fd00::1", 443)
    assert T.split_hostport("10.0.0.1") == ("10.0.0.1", None)
    assert T.split_hostport("10.0.0.1-10.0.0.9:80-90") == ("10.0.0.1", 80)


# Real `iptables-save -c` spelling (normalised matches, /32 masks, --set-xmark, counters), a
# FORWARD policy of DROP, and a foreign rule (an interface match) in PREROUTING.
GOLDEN = (Path(__file__).parent / "golden" / "iptables-save-sample.txt").read_text()
GOLDEN_ENV = T.Environment(local_addresses=frozenset(K_NODE_IPS))


def test_golden_save_traces_through_affinity_checks_marks_and_policies() -> None:
    rs = T.parse_save(GOLDEN)
    outcomes = trace(rs, K_CLIENT, VIP, 80, env=GOLDEN_ENV)
    assert targets(outcomes) == pytest.approx(
        {"10.180.0.1:80": 1 / 3, "10.180.0.2:80": 1 / 3, "10.180.0.3:8080": 1 / 3}, abs=1e-8
    )
    # --set-xmark marks, KUBE-FORWARD accepts the marked packet, POSTROUTING's xor clears it
    assert all(o.masquerade and o.verdict == "accept" for o in outcomes)
    # the interface match is not guessed: the DOCKER rule is noted and skipped
    assert all("-i docker0: the interface is not known" in " ".join(o.notes) for o in outcomes)
    assert not any(s.chain == "DOCKER" for o in outcomes for s in o.steps)
    # an unmarked pod packet falls off FORWARD (kube-proxy's KUBE-FORWARD accepts only marked
    # traffic here) and meets its DROP policy
    pod = trace(rs, K_POD, VIP, 80, env=GOLDEN_ENV)
    assert T.flow_output(pod) == "DROP"
    for o in pod:
        assert o.filter_chain == "FORWARD" and o.verdict_rule is None
        assert (o.steps[-1].chain, o.steps[-1].policy) == ("FORWARD", "DROP")
    assert T.flow_output(trace(rs, K_POD, "172.30.0.46", 80)) == "REJECT"


def test_outcome_steps_name_every_rule_that_decided() -> None:
    outcomes = trace(T.parse_save(GOLDEN), K_CLIENT, VIP, 80, env=GOLDEN_ENV)
    via_c = next(o for o in outcomes if o.dnat == "10.180.0.3:8080")
    chains = [(s.table, s.chain) for s in via_c.steps if s.taken]
    assert chains[:4] == [
        ("nat", "PREROUTING"),
        ("nat", "KUBE-SERVICES"),
        ("nat", "KUBE-SVC-X"),
        ("nat", "KUBE-MARK-MASQ"),
    ]
    assert ("nat", "KUBE-SEP-C") in chains and chains[-1] == ("nat", "KUBE-POSTROUTING")
    assert ("filter", "KUBE-FORWARD") in chains
    assert via_c.label == "10.180.0.3:8080" and via_c.masquerade_rule is not None


def test_return_to_the_caller_goto_and_non_terminal_targets() -> None:
    rs = T.parse_save(
        """*nat
:PREROUTING ACCEPT [0:0]
:A - [0:0]
:B - [0:0]
-A PREROUTING -j A
-A PREROUTING -p tcp --dport 80 -j DNAT --to-destination 10.9.9.9:80
-A A -s 10.0.0.0/8 -j RETURN
-A A -j LOG --log-prefix "x y"
-A A -g B
-A A -j DNAT --to-destination 10.1.1.1
-A B -p udp -j DNAT --to-destination 10.2.2.2:53
COMMIT
"""
    )

    def output(src: str, port: int, proto: str = "tcp") -> str:
        return T.flow_output(trace(rs, src, "1.1.1.1", port, proto=proto))

    assert output(K_POD, 80) == "10.9.9.9:80"  # RETURN: on with the caller's next rule
    # LOG lets the packet go on; goto: B falls off its end and returns to A's caller,
    # skipping A's DNAT
    assert output(K_CLIENT, 80) == "10.9.9.9:80"
    assert output(K_CLIENT, 53, "udp") == "10.2.2.2:53"
    (o,) = trace(rs, K_CLIENT, "1.1.1.1", 22)
    assert o.label == "" and o.verdict == "accept" and not o.notes


def test_dnat_without_a_port_keeps_the_port_and_labels_name_ipv6_in_brackets() -> None:
    rs = T.parse_save(
        "*nat\n:PREROUTING ACCEPT [0:0]\n"
        "-A PREROUTING -d 10.96.0.1 -j DNAT --to-destination 10.1.1.1\n"
        "-A PREROUTING -d fd00::1 -j DNAT --to-destination [fd00:10::1]:8080\nCOMMIT\n"
    )
    (o,) = trace(rs, K_CLIENT, "10.96.0.1", 443)
    assert o.dnat == "10.1.1.1" and o.label == "10.1.1.1:443"
    (o,) = trace(rs, "2001:db8::9", "fd00::1", 80)
    assert o.label == "[fd00:10::1]:8080"


def test_protocol_numbers_are_protocols() -> None:
    rs = T.parse_save(
        "*nat\n:PREROUTING ACCEPT [0:0]\n"
        "-A PREROUTING -p 17 -m udp --dport 53 -j DNAT --to-destination 10.1.1.1:53\nCOMMIT\n"
    )
    assert rs.rules("nat", "PREROUTING")[0].conditions[0].args == ("udp",)
    assert T.flow_output(trace(rs, K_CLIENT, "10.96.0.10", 53, proto="udp")) == "10.1.1.1:53"
    assert T.flow_output(trace(rs, K_CLIENT, "10.96.0.10", 53)) == ""


@pytest.mark.parametrize(
    "text",
    [
        "-A X -j Y\n",
        "*nat\n-A X -j Y\n",
        "*nat\nnonsense\nCOMMIT\n",
        "*nat\n-A X -j Y\n*filter\nCOMMIT\n",
        "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -s\nCOMMIT\n",
        "*nat\n:A - [0:0]\n-D A -j RETURN\nCOMMIT\n",
    ],
    ids=[
        "outside-table",
        "no-commit",
        "unknown-line",
        "table-in-table",
        "missing-value",
        "no-rule",
    ],
)
def test_malformed_input(text: str) -> None:
    with pytest.raises(T.ParseError):
        rs = T.parse_save(text)
        T.trace_packet(rs, T.Packet(K_POD, "1.1.1.1", 80), hook=T.PREROUTING)


def test_restore_edits_are_applied_when_parsing() -> None:
    """A --noflush restore input's -I, -D, -F and -X lines change the chains like the kernel."""
    rs = T.parse_save(
        "*nat\n:A - [0:0]\n:B - [0:0]\n:C - [0:0]\n-A A -j RETURN\n"
        "-I A 1 -s 10.0.0.1 -j DNAT --to-destination 10.5.5.5:1\n"
        "-I A -j LOG\n-D A -j RETURN\n-A B -j RETURN\n-F B\n-X C\nCOMMIT\n"
    )
    assert [r.text for r in rs.rules("nat", "A")] == [
        "-j LOG",
        "-s 10.0.0.1 -j DNAT --to-destination 10.5.5.5:1",
    ]
    assert rs.rules("nat", "B") == [] and rs.chain("nat", "C") is None


def test_a_partial_sync_input_laid_over_the_saved_rules() -> None:
    """kproxy's partial syncs declare the chains they rewrite again (which flushes them) and
    delete lines of shared chains by their rendered spelling, which is not iptables-save's."""
    rs = T.parse_save(SAVED)
    T.parse_save(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SEP-B - [0:0]\n:KUBE-SVC-X - [0:0]\n"
        "-A KUBE-SVC-X -j KUBE-SEP-B\n"
        "-A KUBE-SEP-B -p tcp -j DNAT --to-destination 10.244.1.13:80\n"
        '-D KUBE-SERVICES -m comment --comment "default/x:http cluster IP" -m tcp -p tcp '
        "-d 10.96.0.80 --dport 80 -j KUBE-SVC-X\n"
        '-I KUBE-SERVICES -m comment --comment "default/x:http cluster IP" -m tcp -p tcp '
        "-d 10.96.0.81 --dport 80 -j KUBE-SVC-X\n"
        "COMMIT\n",
        rs,
    )
    assert len(rs.rules("nat", "PREROUTING")) == 1  # declaring a built-in chain keeps its rules
    assert [r.text for r in rs.rules("nat", "KUBE-SVC-X")] == ["-j KUBE-SEP-B"]
    assert targets(trace(rs, POD, "10.96.0.81", 80)) == {"10.244.1.13:80": 1.0}
    (o,) = trace(rs, POD, "10.96.0.80", 80)
    assert o.dnat == ""
