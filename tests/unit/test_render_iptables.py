"""The iptables renderer: probabilities, whole rulesets against reviewed golden files, and the
properties partial syncs rely on (a service's block is the same alone or among others).

Golden files (tests/unit/golden/*.rules) are iptables-restore text; their leading "#" lines say
what the case is and how it was checked against kube-proxy's proxier_test.go expectations.
Regenerate with KPROXY_UPDATE_GOLDEN=1 only after reviewing the diff line by line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice, Ref, Service
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView, service_views
from kproxy.render import chains as C
from kproxy.render.iptables import (
    FILTER,
    NAT,
    Renderer,
    TableWrite,
    assemble,
    probability,
    render_ruleset,
)
from tests.support.builders import make_endpoint, make_port, make_service, make_slice

GOLDEN = Path(__file__).parent / "golden"
NODE = "node1"
OPTIONS = ProxyOptions(node_name=NODE, node_ips=("192.168.0.2",), cluster_cidrs=("10.0.0.0/8",))
Views = Mapping[Ref, Sequence[ServicePortView]]


def views_of(
    *pairs: tuple[Service, Sequence[EndpointSlice]], family: int = 4, node: str = NODE
) -> dict[Ref, tuple[ServicePortView, ...]]:
    return {
        svc.ref: service_views(svc, slices, family=family, node_name=node) for svc, slices in pairs
    }


def local(address: str) -> Endpoint:
    return make_endpoint(address, node_name=NODE)


def remote(address: str) -> Endpoint:
    return make_endpoint(address, node_name="node2")


def test_probability_is_kube_proxys_format() -> None:
    assert [probability(n) for n in (1, 2, 3, 7)] == [
        "1.0000000000",
        "0.5000000000",
        "0.3333333333",
        "0.1428571429",
    ]


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_balancing_gives_each_endpoint_an_equal_share(n: int) -> None:
    """1/(n-i) for rule i, no statistic match on the last: each endpoint gets 1/n overall."""
    eps = [make_endpoint(f"10.180.0.{i + 1}") for i in range(n)]
    text = render_ruleset(views_of((make_service(), [make_slice(endpoints=eps)])), OPTIONS)
    svc = C.svc_chain("ns1/svc1:p80", "tcp")
    probs = [
        float(line.split("--probability ")[1].split()[0]) if "--probability" in line else None
        for line in text.splitlines()
        if line.startswith(f"-A {svc} ") and " -> " in line
    ]
    assert len(probs) == n and probs[-1] is None
    remaining, shares = 1.0, []
    for p in probs:
        take = remaining * (1.0 if p is None else p)
        shares.append(take)
        remaining -= take
    assert shares == pytest.approx([1.0 / n] * n, abs=1e-9)


# -- golden rulesets --------------------------------------------------------------------------
P8080 = [EndpointPort("p80", "TCP", 8080)]

CASES: dict[str, tuple[Callable[[], Views], ProxyOptions]] = {
    "clusterip-multiport": (
        lambda: views_of(
            (
                make_service(
                    "ns1",
                    "svc1",
                    ports=(make_port(80, name="p80"), make_port(53, name="dns", protocol="UDP")),
                ),
                [
                    make_slice(
                        endpoints=[make_endpoint("10.180.0.1"), make_endpoint("10.180.0.2")],
                        ports=[EndpointPort("p80", "TCP", 8080), EndpointPort("dns", "UDP", 5353)],
                    )
                ],
            )
        ),
        OPTIONS,
    ),
    "nodeport": (
        lambda: views_of(
            (
                make_service(
                    "default",
                    "nginx-nodeport",
                    type="NodePort",
                    cluster_ips=("172.30.0.80",),
                    ports=(make_port(80, node_port=30080),),
                ),
                [
                    make_slice(
                        "default",
                        "nginx-nodeport",
                        endpoints=[make_endpoint(f"10.180.1.{i}") for i in (1, 2, 3)],
                        ports=[EndpointPort("", "TCP", 80)],
                    )
                ],
            )
        ),
        OPTIONS,
    ),
    "loadbalancer-source-ranges": (
        lambda: views_of(
            (
                make_service(
                    "ns5",
                    "svc5",
                    type="LoadBalancer",
                    cluster_ips=("172.30.0.45",),
                    ports=(make_port(80, name="p80", node_port=3002),),
                    load_balancer_ips=("1.2.3.4", "5.6.7.8"),
                    load_balancer_source_ranges=("192.168.0.0/24", "203.0.113.0/25"),
                ),
                [make_slice("ns5", "svc5", endpoints=[make_endpoint("10.180.0.3")])],
            )
        ),
        OPTIONS,
    ),
    "externalip": (
        lambda: views_of(
            (
                make_service(
                    "ns4", "svc4", cluster_ips=("172.30.0.44",), external_ips=("192.168.99.33",)
                ),
                [
                    make_slice(
                        "ns4", "svc4", endpoints=[make_endpoint("10.180.0.4"), local("10.180.0.5")]
                    )
                ],
            )
        ),
        OPTIONS,
    ),
    "no-endpoints": (
        lambda: views_of(
            (
                make_service(
                    "ns6",
                    "svc6",
                    type="LoadBalancer",
                    cluster_ips=("172.30.0.46",),
                    ports=(make_port(80, name="p80", node_port=3001),),
                    external_ips=("192.168.99.11",),
                    load_balancer_ips=("1.2.3.4",),
                ),
                [],
            )
        ),
        OPTIONS,
    ),
    "affinity": (
        lambda: views_of(
            (
                make_service("ns4", "sticky", cluster_ips=("172.30.0.44",), affinity_timeout=10800),
                [
                    make_slice(
                        "ns4",
                        "sticky",
                        endpoints=[make_endpoint("10.180.0.4"), make_endpoint("10.180.0.5")],
                    )
                ],
            )
        ),
        OPTIONS,
    ),
    "etp-local": (
        lambda: views_of(
            (
                make_service(
                    "ns2",
                    "svc2",
                    type="LoadBalancer",
                    cluster_ips=("172.30.0.42",),
                    ports=(make_port(80, name="p80", node_port=3001),),
                    load_balancer_ips=("1.2.3.4",),
                    external_ips=("192.168.99.22",),
                    external_policy_local=True,
                    health_check_node_port=30000,
                ),
                [make_slice("ns2", "svc2", endpoints=[local("10.180.0.2"), remote("10.180.1.2")])],
            )
        ),
        OPTIONS,
    ),
    "etp-local-none-here": (
        lambda: views_of(
            (
                make_service(
                    "ns2",
                    "svc2",
                    type="NodePort",
                    cluster_ips=("172.30.0.42",),
                    ports=(make_port(80, name="p80", node_port=3001),),
                    external_policy_local=True,
                ),
                [make_slice("ns2", "svc2", endpoints=[remote("10.180.1.2")])],
            )
        ),
        OPTIONS,
    ),
    "itp-local": (
        lambda: views_of(
            (
                make_service(
                    "ns1", "itp", cluster_ips=("172.30.0.47",), internal_policy_local=True
                ),
                [make_slice("ns1", "itp", endpoints=[local("10.180.0.7"), remote("10.180.1.7")])],
            )
        ),
        OPTIONS,
    ),
    "itp-local-none-here": (
        lambda: views_of(
            (
                make_service(
                    "ns1", "itp", cluster_ips=("172.30.0.47",), internal_policy_local=True
                ),
                [make_slice("ns1", "itp", endpoints=[remote("10.180.1.7")])],
            )
        ),
        OPTIONS,
    ),
    "terminating-fallback": (
        lambda: views_of(
            (
                make_service("ns1", "term", cluster_ips=("172.30.0.48",)),
                [
                    make_slice(
                        "ns1",
                        "term",
                        endpoints=[
                            # not ready, still serving, terminating: the fallback
                            make_endpoint("10.180.0.8", ready=False, terminating=True),
                            # not serving at all: never used
                            make_endpoint(
                                "10.180.0.9", ready=False, serving=False, terminating=True
                            ),
                        ],
                    )
                ],
            )
        ),
        OPTIONS,
    ),
    "ipv6": (
        lambda: views_of(
            (
                make_service(
                    "ns1",
                    "v6",
                    type="NodePort",
                    cluster_ips=("fd00:172:30::41",),
                    ports=(make_port(80, name="p80", node_port=3001),),
                    affinity_timeout=60,
                ),
                [
                    make_slice(
                        "ns1",
                        "v6",
                        address_type="IPv6",
                        endpoints=[
                            make_endpoint("fd00:10:180::1"),
                            make_endpoint("fd00:10:180::2:1"),
                        ],
                    )
                ],
            ),
            family=6,
        ),
        ProxyOptions(
            family=6, node_name=NODE, node_ips=("2001:db8::1",), cluster_cidrs=("fd00:10::/32",)
        ),
    ),
    "options-masquerade-all-nodeport-ips": (
        lambda: views_of(
            (
                make_service(
                    "ns3",
                    "svc3",
                    type="NodePort",
                    cluster_ips=("172.30.0.43",),
                    ports=(make_port(80, name="p80", node_port=3003),),
                ),
                [make_slice("ns3", "svc3", endpoints=[make_endpoint("10.180.0.3")])],
            )
        ),
        ProxyOptions(
            node_name=NODE,
            node_ips=("192.168.0.2",),
            nodeport_ips=("192.168.0.2", "127.0.0.1", "2001:db8::1"),
            masquerade_all=True,
            masquerade_bit=5,
        ),
    ),
    "options-two-cluster-cidrs": (
        lambda: views_of(
            (
                make_service(
                    "ns2",
                    "svc2",
                    type="NodePort",
                    cluster_ips=("172.30.0.42",),
                    ports=(make_port(80, name="p80", node_port=3001),),
                    external_policy_local=True,
                ),
                [make_slice("ns2", "svc2", endpoints=[local("10.180.0.2")])],
            )
        ),
        ProxyOptions(node_name=NODE, cluster_cidrs=("10.0.0.0/16", "10.1.0.0/16", "fd00::/64")),
    ),
    "kube-proxy-overall": (
        lambda: views_of(
            (
                make_service("ns1", "svc1", cluster_ips=("172.30.0.41",)),
                [make_slice("ns1", "svc1", endpoints=[make_endpoint("10.180.0.1")])],
            ),
            (
                make_service(
                    "ns2",
                    "svc2",
                    type="LoadBalancer",
                    cluster_ips=("172.30.0.42",),
                    ports=(make_port(80, name="p80", node_port=3001),),
                    load_balancer_ips=("1.2.3.4",),
                    external_ips=("192.168.99.22",),
                    external_policy_local=True,
                    health_check_node_port=30000,
                ),
                [make_slice("ns2", "svc2", endpoints=[make_endpoint("10.180.0.2")])],
            ),
            (
                make_service(
                    "ns3",
                    "svc3",
                    type="NodePort",
                    cluster_ips=("172.30.0.43",),
                    ports=(make_port(80, name="p80", node_port=3003),),
                ),
                [make_slice("ns3", "svc3", endpoints=[make_endpoint("10.180.0.3")])],
            ),
            (
                make_service(
                    "ns4",
                    "svc4",
                    type="NodePort",
                    cluster_ips=("172.30.0.44",),
                    external_ips=("192.168.99.33",),
                ),
                [
                    make_slice(
                        "ns4", "svc4", endpoints=[make_endpoint("10.180.0.4"), local("10.180.0.5")]
                    )
                ],
            ),
            (
                make_service(
                    "ns5",
                    "svc5",
                    type="LoadBalancer",
                    cluster_ips=("172.30.0.45",),
                    ports=(make_port(80, name="p80", node_port=3002),),
                    load_balancer_ips=("5.6.7.8",),
                    load_balancer_source_ranges=("203.0.113.0/25",),
                    affinity_timeout=10800,
                    health_check_node_port=30000,  # eTP Cluster: no health check rule
                ),
                [make_slice("ns5", "svc5", endpoints=[make_endpoint("10.180.0.3")])],
            ),
            (make_service("ns6", "svc6", cluster_ips=("172.30.0.46",)), []),
            node="test-node",
        ),
        ProxyOptions(
            node_name="test-node", node_ips=("192.168.0.2",), cluster_cidrs=("10.0.0.0/8",)
        ),
    ),
}


def without_comments(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_rulesets(case: str) -> None:
    build, options = CASES[case]
    text = render_ruleset(build(), options, random_fully=case != "kube-proxy-overall")
    path = GOLDEN / f"{case}.rules"
    if os.environ.get("KPROXY_UPDATE_GOLDEN"):
        old = path.read_text() if path.exists() else ""
        header = "".join(line for line in old.splitlines(keepends=True) if line.startswith("#"))
        path.write_text(header + text)
    assert text == without_comments(path.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_jumps_are_consistent(case: str) -> None:
    """kube-proxy's checkIPTablesRuleJumps: every jump target is declared and has rules,
    every declared per-service chain is jumped to, every "-A" chain is declared."""
    build, options = CASES[case]
    text = render_ruleset(build(), options)
    for table_text in text.split("COMMIT\n")[:-1]:
        lines = table_text.splitlines()
        declared = {ln[1:].split()[0] for ln in lines if ln.startswith(":")}
        filled = {ln.split()[1] for ln in lines if ln.startswith("-A ")}
        jumped = {ln.rsplit("-j ", 1)[1].split()[0] for ln in lines if " -j " in ln}
        jumped -= {"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "DNAT", "MASQUERADE"}
        assert jumped <= declared and filled <= declared
        assert jumped - {C.NODEPORTS} <= filled
        assert {c for c in declared if C.is_service_chain(c)} <= jumped


# -- blocks and partial syncs -----------------------------------------------------------------
def test_service_block_does_not_depend_on_other_services() -> None:
    build, options = CASES["kube-proxy-overall"]
    views = build()
    renderer = Renderer(options)
    together = {ref: renderer.render_service(views[ref]) for ref in sorted(views)}
    for ref in views:
        assert Renderer(options).render_service(views[ref]) == together[ref]
    assert renderer.render_service(()).empty


def test_blocks_own_disjoint_chains_named_for_their_service() -> None:
    build, options = CASES["kube-proxy-overall"]
    renderer = Renderer(options)
    seen: set[str] = set()
    for ref, views in build().items():
        block = renderer.render_service(views)
        names = set(block.names)
        assert not names & seen
        seen |= names
        for name, text in block.chains:
            assert C.is_service_chain(name)
            assert all(line.startswith(f"-A {name} ") for line in text.splitlines())
            assert f"{ref.namespace}/{ref.name}" in text


def test_service_without_endpoints_owns_no_chain_and_rejects() -> None:
    block = Renderer(OPTIONS).render_service(CASES["no-endpoints"][0]()[Ref("ns6", "svc6")])
    assert block.chains == ()
    assert not block.shared.nat_services and not block.shared.nat_nodeports
    assert block.shared.filter_services.count("-j REJECT") == 1
    # external IP, load balancer IP and node port all reject as well
    assert block.shared.filter_external.count("-j REJECT") == 3


def test_health_check_port_only_for_local_load_balancers() -> None:
    views = CASES["kube-proxy-overall"][0]()
    r = Renderer(CASES["kube-proxy-overall"][1])
    assert "30000" in r.render_service(views[Ref("ns2", "svc2")]).shared.filter_nodeports
    assert r.render_service(views[Ref("ns5", "svc5")]).shared.filter_nodeports == ""


def test_assemble_declares_sorted_then_edits_then_deletes() -> None:
    text = assemble(
        [
            TableWrite(FILTER),  # untouched: left out entirely
            TableWrite(
                NAT,
                chains=[("KUBE-SVC-A", "-A KUBE-SVC-A -j KUBE-SEP-B\n"), ("KUBE-SEP-B", "")],
                edits="-D KUBE-SERVICES -d 10.0.0.1 -j KUBE-SVC-Z\n",
                delete=["KUBE-SVC-Z"],
            ),
        ]
    )
    assert text == (
        "*nat\n"
        ":KUBE-SVC-A - [0:0]\n"
        ":KUBE-SEP-B - [0:0]\n"
        ":KUBE-SVC-Z - [0:0]\n"
        "-A KUBE-SVC-A -j KUBE-SEP-B\n"
        "-D KUBE-SERVICES -d 10.0.0.1 -j KUBE-SVC-Z\n"
        "-X KUBE-SVC-Z\n"
        "COMMIT\n"
    )


def test_full_render_and_blocks_agree() -> None:
    """The ruleset is exactly the shared chains plus every block: what a partial sync
    writes for one service is what a full sync would have written for it."""
    build, options = CASES["kube-proxy-overall"]
    views = build()
    text = render_ruleset(views, options)
    renderer = Renderer(options)
    for ref in views:
        block = renderer.render_service(views[ref])
        for name, rules in block.chains:
            assert f":{name} - [0:0]\n" in text and rules in text
        for lines in block.shared:
            assert all(line in text for line in lines.splitlines())


# kproxy's deliberate differences from kube-proxy's rules (see kproxy/render/iptables.py)
KUBE_PROXY_ONLY = (
    "KUBE-FIREWALL",  # the localhost anti-martian rule: kproxy accepts no localhost node ports
    "-d 127.0.0.0/8 --dport",  # localhost node port rules
)


def to_kproxy_dialect(line: str) -> str:
    line = line.replace(" -m nfacct --nfacct-name ct_state_invalid_dropped_pkts", "")
    line = line.replace(
        "--dst-type LOCAL -j KUBE-NODEPORTS", "--dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"
    )
    line = line.replace("--reap -j", "--reap --mask 255.255.255.255 --rsource -j")
    return line.replace("--set -m", "--set --mask 255.255.255.255 --rsource -m")


def table_lines(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    table = ""
    for line in without_comments(text).splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line != "COMMIT":
            out.setdefault(table, []).append(line)
    return {t: sorted(lines) for t, lines in out.items()}


def test_matches_kube_proxy() -> None:
    """Same rules as kube-proxy's TestOverallIPTablesRules expects, up to the documented
    differences: kube-proxy's text is translated into kproxy's dialect, and the order of
    chains (kube-proxy's test sorts them anyway) is ignored."""
    reference = (GOLDEN / "kube-proxy-overall.kube-proxy").read_text()
    translated = "".join(
        to_kproxy_dialect(line) + "\n"
        for line in without_comments(reference).splitlines()
        if not any(marker in line for marker in KUBE_PROXY_ONLY)
    )
    build, options = CASES["kube-proxy-overall"]
    ours = render_ruleset(build(), options, random_fully=False)
    assert table_lines(ours) == table_lines(translated)
