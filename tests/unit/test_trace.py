"""Packet-flow tests in the style of kube-proxy's proxier_test.go: services are rendered with
kproxy's renderer, parsed, and a packet (source, destination, port) is traced through the hooks;
the test asserts where it goes (DNAT targets, REJECT, DROP, or "" for untouched) and whether it
is masqueraded. Then the tracer itself: iptables-save's canonical spelling, branching, chain
semantics and what it refuses to guess.

Addresses follow kube-proxy's test conventions: pods 10.0.0.0/8, ClusterIPs 172.30.0.0/16, node
192.168.0.2 (and 192.168.1.2, 192.168.99.11), LB IPs 1.2.3.4 and 5.6.7.8, clients outside the
cluster 203.0.113.0/24, of which 203.0.113.0/25 is in the LB source range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice, Service
from kproxy.model.options import ProxyOptions
from kproxy.model.view import service_views
from kproxy.render.iptables import render_ruleset
from kproxy.render.trace import (
    ACCEPT,
    DNAT,
    Packet,
    Ruleset,
    TraceError,
    parse_ruleset,
    trace,
)
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

NODE = "test-node"
NODE_IP, NODE_IP_ALT, NODE_EXTERNAL_IP = "192.168.0.2", "192.168.1.2", "192.168.99.11"
NODE_IPS = (NODE_IP, NODE_IP_ALT, NODE_EXTERNAL_IP)
POD = "10.0.0.2"
CLIENT = "203.0.113.2"
CLIENT_BLOCKED = "203.0.113.130"
OPTIONS = ProxyOptions(node_name=NODE, node_ips=(NODE_IP,), cluster_cidrs=("10.0.0.0/8",))


def ruleset(
    *pairs: tuple[Service, Sequence[EndpointSlice]],
    options: ProxyOptions = OPTIONS,
) -> Ruleset:
    views = {
        svc.ref: service_views(svc, slices, family=options.family, node_name=NODE)
        for svc, slices in pairs
    }
    return parse_ruleset(render_ruleset(views, options))


@dataclass(frozen=True)
class Flow:
    name: str
    src: str
    dst: str
    port: int
    output: str
    masq: bool = False
    protocol: str = "tcp"


def check(rs: Ruleset, flows: Sequence[Flow], *, local: Sequence[str] = NODE_IPS) -> None:
    errors = []
    for f in flows:
        r = trace(rs, Packet(f.src, f.dst, f.port, f.protocol), local_addresses=local)
        masq = r.masqueraded
        if r.summary != f.output or (f.output not in ("DROP", "REJECT") and masq != f.masq):
            path = "\n    ".join(s.rule for o in r.outcomes for s in o.path)
            errors.append(
                f"{f.name}: {f.src} -> {f.dst}:{f.port}/{f.protocol}: expected "
                f"{f.output!r} masq={f.masq}, got {r.summary!r} masq={masq}\n    {path}"
            )
    assert not errors, "\n".join(errors)


def local(address: str, **kw: Any) -> Endpoint:
    return make_endpoint(address, node_name=NODE, **kw)


def remote(address: str, **kw: Any) -> Endpoint:
    return make_endpoint(address, node_name="node2", **kw)


# -- ClusterIP ---------------------------------------------------------------------------------
def test_cluster_ip_general() -> None:
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
    )
    both = "10.180.0.1:{0}, 10.180.2.1:{0}"
    check(
        rs,
        [
            Flow("simple clusterIP", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80"),
            Flow("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
            Flow("multiple endpoints", "10.180.0.2", "172.30.0.42", 80, both.format(80)),
            Flow("targetPort", "10.180.0.2", "172.30.0.42", 443, both.format(8443)),
            Flow("same port, TCP", "10.180.0.2", "172.30.0.42", 53, both.format(5353)),
            Flow(
                "same port, UDP", "10.180.0.2", "172.30.0.42", 53, both.format(53), protocol="udp"
            ),
            Flow(
                "same port, SCTP", "10.180.0.2", "172.30.0.42", 53, both.format(53), protocol="sctp"
            ),
            Flow("TCP-only port, UDP", "10.180.0.2", "172.30.0.42", 80, "", protocol="udp"),
            Flow("svc1 has no 443", "10.180.0.2", "172.30.0.41", 443, ""),
            Flow(
                "off-cluster client is masqueraded",
                CLIENT,
                "172.30.0.41",
                80,
                "10.180.0.1:80",
                True,
            ),
        ],
    )


def test_endpoints_are_equally_likely() -> None:
    rs = ruleset(
        (
            make_service(),
            [make_slice(endpoints=[make_endpoint(f"10.180.0.{i}") for i in range(1, 6)])],
        )
    )
    result = trace(rs, Packet(POD, "172.30.0.41", 80))
    assert result.destinations == pytest.approx({f"10.180.0.{i}:80": 0.2 for i in range(1, 6)})
    assert sum(o.probability for o in result.outcomes) == pytest.approx(1.0)


def test_masquerade_all_marks_pod_traffic_too() -> None:
    opts = ProxyOptions(node_name=NODE, masquerade_all=True)
    rs = ruleset(
        (make_service(), [make_slice(endpoints=[make_endpoint("10.180.0.1")])]), options=opts
    )
    check(rs, [Flow("pod to cluster IP", POD, "172.30.0.41", 80, "10.180.0.1:80", True)])


def test_without_cluster_cidr_only_hairpin_is_masqueraded() -> None:
    opts = ProxyOptions(node_name=NODE)
    rs = ruleset(
        (make_service(), [make_slice(endpoints=[make_endpoint("10.180.0.1")])]), options=opts
    )
    check(
        rs,
        [
            Flow("off-cluster client", CLIENT, "172.30.0.41", 80, "10.180.0.1:80", False),
            Flow("hairpin", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
        ],
    )


def test_several_cluster_cidrs() -> None:
    opts = ProxyOptions(node_name=NODE, cluster_cidrs=("10.0.0.0/16", "10.1.0.0/16"))
    rs = ruleset(
        (make_service(), [make_slice(endpoints=[make_endpoint("10.0.5.1")])]), options=opts
    )
    check(
        rs,
        [
            Flow("pod in the first CIDR", "10.0.0.9", "172.30.0.41", 80, "10.0.5.1:80"),
            Flow("pod in the second CIDR", "10.1.0.9", "172.30.0.41", 80, "10.0.5.1:80"),
            Flow("outside both", "10.2.0.9", "172.30.0.41", 80, "10.0.5.1:80", True),
        ],
    )


# -- no endpoints ------------------------------------------------------------------------------
def test_no_endpoints_reject() -> None:
    rs = ruleset(
        (
            make_service(
                type="LoadBalancer",
                external_ips=(NODE_EXTERNAL_IP,),
                load_balancer_ips=("1.2.3.4",),
                ports=(make_port(80, name="p80", node_port=3001),),
            ),
            [],
        )
    )
    check(
        rs,
        [
            Flow("pod to cluster IP", POD, "172.30.0.41", 80, "REJECT"),
            Flow("external to external IP", CLIENT, NODE_EXTERNAL_IP, 80, "REJECT"),
            Flow("pod to NodePort", POD, NODE_IP, 3001, "REJECT"),
            Flow("external to NodePort", CLIENT, NODE_IP, 3001, "REJECT"),
            Flow("pod to LoadBalancer IP", POD, "1.2.3.4", 80, "REJECT"),
            Flow("external to LoadBalancer IP", CLIENT, "1.2.3.4", 80, "REJECT"),
            Flow("node to cluster IP", NODE_IP, "172.30.0.41", 80, "REJECT"),
        ],
    )


# -- LoadBalancer, source ranges, NodePort, externalIPs ----------------------------------------
def test_load_balancer_with_source_ranges() -> None:
    rs = ruleset(
        (
            make_service(
                type="LoadBalancer",
                ports=(make_port(80, name="p80", node_port=3001),),
                load_balancer_ips=("1.2.3.4", "5.6.7.8"),
                load_balancer_source_ranges=("192.168.0.0/24", "203.0.113.0/25"),
            ),
            [make_slice(endpoints=[make_endpoint("10.180.0.1")])],
        )
    )
    ep = "10.180.0.1:80"
    check(
        rs,
        [
            Flow("pod to cluster IP", POD, "172.30.0.41", 80, ep),
            Flow("external to nodePort", CLIENT, NODE_IP, 3001, ep, True),
            Flow("nodePort bypasses source ranges", CLIENT_BLOCKED, NODE_IP, 3001, ep, True),
            Flow("accepted external to LB1", CLIENT, "1.2.3.4", 80, ep, True),
            Flow("accepted external to LB2", CLIENT, "5.6.7.8", 80, ep, True),
            Flow("blocked external to LB1", CLIENT_BLOCKED, "1.2.3.4", 80, "DROP"),
            Flow("blocked external to LB2", CLIENT_BLOCKED, "5.6.7.8", 80, "DROP"),
            Flow("pod to LB1 (not in the ranges)", POD, "1.2.3.4", 80, "DROP"),
            Flow("node to LB1 (node IP in the ranges)", NODE_IP, "1.2.3.4", 80, ep, True),
            Flow("node to LB2, SNATted to LB2", "5.6.7.8", "5.6.7.8", 80, ep, True),
        ],
    )


@pytest.mark.parametrize(
    ("family", "nodeport_ips", "alt_allowed"),
    [
        (4, None, True),
        (4, (NODE_IP, "127.0.0.1"), False),
        (6, None, True),
        (6, ("2001:db8::1",), False),
    ],
    ids=["v4-all-addresses", "v4-nodeport-addresses", "v6-all-addresses", "v6-nodeport-addresses"],
)
def test_node_ports(family: int, nodeport_ips: tuple[str, ...] | None, alt_allowed: bool) -> None:
    if family == 4:
        vip, eps, pod, client, node, alt, lo = (
            "172.30.0.41",
            ("10.180.0.1", "10.180.2.1"),
            POD,
            CLIENT,
            NODE_IP,
            NODE_IP_ALT,
            "127.0.0.1",
        )
        cidr, local_ips = "10.0.0.0/8", list(NODE_IPS)
        fmt = "{}:80"
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
        cidr, local_ips = "fd00:10::/64", ["2001:db8::1", "2001:db8:1::2"]
        fmt = "[{}]:80"
    opts = ProxyOptions(
        family=family,
        node_name=NODE,
        node_ips=(node,),
        nodeport_ips=nodeport_ips,
        cluster_cidrs=(cidr,),
    )
    rs = ruleset(
        (
            make_service(
                type="NodePort",
                cluster_ips=(vip,),
                ports=(make_port(80, name="p80", node_port=3001),),
            ),
            [
                make_slice(
                    endpoints=[make_endpoint(eps[0]), local(eps[1])],
                    address_type="IPv4" if family == 4 else "IPv6",
                )
            ],
        ),
        options=opts,
    )
    both = ", ".join(fmt.format(e) for e in eps)
    check(
        rs,
        [
            Flow("pod to cluster IP", pod, vip, 80, both),
            Flow("external to nodePort", client, node, 3001, both, True),
            Flow("node to nodePort", node, node, 3001, both, True),
            Flow("localhost to nodePort is ignored", lo, lo, 3001, ""),
            Flow("secondary address", client, alt, 3001, both if alt_allowed else "", alt_allowed),
        ],
        local=local_ips,
    )


def test_external_ips() -> None:
    rs = ruleset(
        (
            make_service(external_ips=("192.168.99.33",)),
            [make_slice(endpoints=[make_endpoint("10.180.0.4"), local("10.180.0.5")])],
        )
    )
    both = "10.180.0.4:80, 10.180.0.5:80"
    check(
        rs,
        [
            Flow("external to external IP", CLIENT, "192.168.99.33", 80, both, True),
            # Cluster policy: anything to an external destination is masqueraded
            Flow("pod to external IP", POD, "192.168.99.33", 80, both, True),
            Flow("external IP on another port", CLIENT, "192.168.99.33", 81, ""),
        ],
    )


# -- traffic policies --------------------------------------------------------------------------
def etp_local(*endpoints: Endpoint) -> Ruleset:
    return ruleset(
        (
            make_service(
                type="LoadBalancer",
                ports=(make_port(80, name="p80", node_port=3001),),
                load_balancer_ips=("1.2.3.4",),
                external_ips=("192.168.99.22",),
                external_policy_local=True,
                health_check_node_port=30000,
            ),
            [make_slice(endpoints=list(endpoints))],
        )
    )


def test_external_traffic_policy_local() -> None:
    rs = etp_local(local("10.180.0.1"), remote("10.180.2.1"))
    here, both = "10.180.0.1:80", "10.180.0.1:80, 10.180.2.1:80"
    check(
        rs,
        [
            Flow("pod to cluster IP", POD, "172.30.0.41", 80, both),
            Flow("external to NodePort: local only, source kept", CLIENT, NODE_IP, 3001, here),
            Flow("external to LB IP", CLIENT, "1.2.3.4", 80, here),
            Flow("external to external IP", CLIENT, "192.168.99.22", 80, here),
            Flow("pod to LB IP: short-circuit, all", POD, "1.2.3.4", 80, both),
            Flow("pod to NodePort", POD, NODE_IP, 3001, both),
            Flow("node to NodePort: all, masqueraded", NODE_IP, NODE_IP, 3001, both, True),
            Flow("node to LB IP", NODE_IP, "1.2.3.4", 80, both, True),
        ],
    )


def test_external_traffic_policy_local_without_local_endpoints() -> None:
    rs = etp_local(remote("10.180.2.1"))
    there = "10.180.2.1:80"
    check(
        rs,
        [
            Flow("external to NodePort", CLIENT, NODE_IP, 3001, "DROP"),
            Flow("external to LB IP", CLIENT, "1.2.3.4", 80, "DROP"),
            Flow("external to external IP", CLIENT, "192.168.99.22", 80, "DROP"),
            Flow("pod to LB IP still works", POD, "1.2.3.4", 80, there),
            Flow("node to NodePort still works", NODE_IP, NODE_IP, 3001, there, True),
            Flow("pod to cluster IP", POD, "172.30.0.41", 80, there),
        ],
    )


def test_internal_traffic_policy_local() -> None:
    with_local = ruleset(
        (
            make_service(internal_policy_local=True),
            [make_slice(endpoints=[local("10.180.0.1"), remote("10.180.2.1")])],
        )
    )
    check(with_local, [Flow("only the local endpoint", POD, "172.30.0.41", 80, "10.180.0.1:80")])
    without = ruleset(
        (make_service(internal_policy_local=True), [make_slice(endpoints=[remote("10.180.2.1")])])
    )
    check(
        without,
        [
            Flow("no local endpoint: dropped, not rejected", POD, "172.30.0.41", 80, "DROP"),
            Flow("from the node too", NODE_IP, "172.30.0.41", 80, "DROP"),
        ],
    )


def test_terminating_endpoints_fallback() -> None:
    def go(*eps: Endpoint, **svc: Any) -> Ruleset:
        return ruleset((make_service(**svc), [make_slice(endpoints=list(eps))]))

    ready, terminating, gone = (
        local("10.180.0.1"),
        local("10.180.0.2", ready=False, terminating=True),
        local("10.180.0.3", ready=False, serving=False, terminating=True),
    )
    check(
        go(ready, terminating, gone), [Flow("ready wins", POD, "172.30.0.41", 80, "10.180.0.1:80")]
    )
    check(
        go(terminating, gone),
        [Flow("serving+terminating", POD, "172.30.0.41", 80, "10.180.0.2:80")],
    )
    check(go(gone), [Flow("none serving: reject", POD, "172.30.0.41", 80, "REJECT")])
    # Local policy falls back per node: a remote ready endpoint does not help here
    rs = ruleset(
        (
            make_service(
                type="NodePort",
                ports=(make_port(80, name="p80", node_port=3001),),
                external_policy_local=True,
            ),
            [make_slice(endpoints=[remote("10.180.2.1"), terminating])],
        )
    )
    check(
        rs,
        [
            Flow("external: local terminating one", CLIENT, NODE_IP, 3001, "10.180.0.2:80"),
            Flow("pod: cluster-wide ready one", POD, "172.30.0.41", 80, "10.180.2.1:80"),
        ],
    )


def test_session_affinity() -> None:
    rs = ruleset(
        (
            make_service(affinity_timeout=10800),
            [make_slice(endpoints=[make_endpoint("10.180.0.1"), make_endpoint("10.180.0.2")])],
        )
    )
    first = trace(rs, Packet(POD, "172.30.0.41", 80))
    assert first.summary == "10.180.0.1:80, 10.180.0.2:80"
    assert all(any("recent list KUBE-SEP-" in n for n in o.notes) for o in first.outcomes)
    pinned_list = next(n for n in first.outcomes[1].notes if "recent" in n).rsplit(" ", 1)[1]
    again = trace(rs, Packet(POD, "172.30.0.41", 80), recent={pinned_list})
    assert again.summary == "10.180.0.2:80" and again.outcomes[0].probability == 1.0


# -- the tracer itself -------------------------------------------------------------------------
# Real `iptables-save -c` spelling (normalised matches, /32 masks, --set-xmark, counters), with
# a foreign rule (an interface match) in PREROUTING.
SAVED = (Path(__file__).parent / "golden" / "iptables-save-sample.txt").read_text()


def test_parses_iptables_save_spelling() -> None:
    rs = parse_ruleset(SAVED)
    r = trace(rs, Packet(CLIENT, "172.30.0.41", 80), local_addresses=NODE_IPS)
    assert r.destinations == pytest.approx(
        {"10.180.0.1:80": 1 / 3, "10.180.0.2:80": 1 / 3, "10.180.0.3:8080": 1 / 3}, abs=1e-8
    )
    assert r.masqueraded is True  # --set-xmark marks, POSTROUTING's xor clears, MASQUERADE
    # the interface match is not guessed: the DOCKER rule is noted and skipped
    assert any("PREROUTING rule 1 not evaluated (-i)" in n for n in r.outcomes[0].notes)
    # FORWARD's policy is DROP: kube-proxy's KUBE-FORWARD accepts marked (masqueraded)
    # traffic, but an unmarked pod packet falls off the chain and is dropped
    pod = trace(rs, Packet(POD, "172.30.0.41", 80), local_addresses=NODE_IPS)
    assert pod.summary == "DROP"
    assert any("filter FORWARD policy DROP" in n for o in pod.outcomes for n in o.notes)
    assert trace(rs, Packet(POD, "172.30.0.46", 80)).summary == "REJECT"


def test_outcome_paths_name_every_rule_that_decided() -> None:
    rs = parse_ruleset(SAVED)
    r = trace(rs, Packet(CLIENT, "172.30.0.41", 80), local_addresses=NODE_IPS)
    via_c = next(o for o in r.outcomes if o.destination == "10.180.0.3:8080")
    chains = [(s.table, s.chain) for s in via_c.path]
    assert chains[:4] == [
        ("nat", "PREROUTING"),
        ("nat", "KUBE-SERVICES"),
        ("nat", "KUBE-SVC-X"),
        ("nat", "KUBE-MARK-MASQ"),
    ]
    assert ("nat", "KUBE-SEP-C") in chains and chains[-1] == ("nat", "KUBE-POSTROUTING")
    assert via_c.verdict == DNAT and via_c.label == "10.180.0.3:8080"


def test_return_goto_and_unknown_targets() -> None:
    text = """*nat
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
    rs = parse_ruleset(text)
    assert trace(rs, Packet(POD, "1.1.1.1", 80)).summary == "10.9.9.9:80"  # RETURN, next rule
    # goto: B falls off its end and returns to A's caller, skipping A's DNAT
    assert trace(rs, Packet(CLIENT, "1.1.1.1", 80)).summary == "10.9.9.9:80"
    assert trace(rs, Packet(CLIENT, "1.1.1.1", 53, "udp")).summary == "10.2.2.2:53"
    untouched = trace(rs, Packet(CLIENT, "1.1.1.1", 22))
    assert untouched.summary == "" and untouched.outcomes[0].verdict == ACCEPT


def test_loops_are_reported() -> None:
    rs = parse_ruleset(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:A - [0:0]\n-A PREROUTING -j A\n-A A -j A\nCOMMIT\n"
    )
    with pytest.raises(TraceError):
        trace(rs, Packet(POD, "1.1.1.1", 80))


@pytest.mark.parametrize(
    "text",
    [
        "-A X -j Y\n",
        "*nat\n-A X -j Y\n",
        "*nat\nnonsense\nCOMMIT\n",
        "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -s\nCOMMIT\n",
    ],
    ids=["outside-table", "no-commit", "unknown-line", "missing-value"],
)
def test_malformed_input(text: str) -> None:
    with pytest.raises(TraceError):
        rs = parse_ruleset(text)
        trace(rs, Packet(POD, "1.1.1.1", 80))


def test_restore_edits_are_applied_when_parsing() -> None:
    """A --noflush restore input's "-I" and "-D" lines change the parsed chains like the kernel."""
    rs = parse_ruleset(
        "*nat\n:A - [0:0]\n-A A -j RETURN\n-I A 1 -s 10.0.0.1 -j DNAT --to-destination 10.5.5.5:1\n"
        "-D A -j RETURN\nCOMMIT\n"
    )
    assert [r.text for r in rs.rules("nat", "A")] == [
        "-A A -s 10.0.0.1 -j DNAT --to-destination 10.5.5.5:1"
    ]
