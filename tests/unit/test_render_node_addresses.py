"""`kproxy render` uses the node addresses the agent would (issue 12 item 5): the Node
manifest's InternalIP/ExternalIP addresses, or --node-ip-override, so LoadBalancer source-range
rules that admit the node itself match kube-proxy's golden rulesets; and a Service whose
addresses carry leading zeros (172.30.0.041) renders as kube-proxy programs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kproxy.cli import main
from tests.support.objects import make_service_obj, make_slice_obj
from tests.unit.test_render_iptables import (
    GOLDEN,
    KUBE_PROXY_ONLY,
    table_lines,
    to_kproxy_dialect,
    without_comments,
)

NODE = "test-node"


def node(*addresses: tuple[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE},
        "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]},
    }


def lb(ns: str, name: str, cluster_ip: str, node_port: int, ips: list[str], **spec: Any) -> Any:
    return make_service_obj(
        ns,
        name,
        type="LoadBalancer",
        clusterIP=cluster_ip,
        ports=[
            {"name": "p80", "port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": node_port}
        ],
        status={"loadBalancer": {"ingress": [{"ip": ip} for ip in ips]}},
        **spec,
    )


def eps(ns: str, svc: str, *endpoints: Any) -> dict[str, Any]:
    return make_slice_obj(ns, f"{svc}-abcde", svc, endpoints, [("p80", 80)])


def source_ranges_objects() -> list[dict[str, Any]]:
    """kube-proxy's TestLoadBalancer service, as in golden/loadbalancer-source-ranges.rules."""
    return [
        lb(
            "ns5",
            "svc5",
            "172.30.0.45",
            3002,
            ["1.2.3.4", "5.6.7.8"],
            loadBalancerSourceRanges=["192.168.0.0/24", "203.0.113.0/25"],
        ),
        eps("ns5", "svc5", "10.180.0.3"),
    ]


def render(tmp_path: Path, objects: list[dict[str, Any]], *flags: str) -> str:
    (tmp_path / "objects.json").write_text(json.dumps({"kind": "List", "items": objects}))
    argv = ["render", "--manifests", str(tmp_path), "--hostname-override", NODE]
    return run([*argv, "--cluster-cidr", "10.0.0.0/8", *flags])


def run(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


GOLDEN_LB = without_comments((GOLDEN / "loadbalancer-source-ranges.rules").read_text())
ALLOW_FROM_NODE = (
    '-A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 1.2.3.4'
)


@pytest.mark.parametrize(
    ("extra", "flags"),
    [
        ([node(("InternalIP", "192.168.0.2"))], []),
        ([node(("Hostname", NODE), ("ExternalIP", "192.168.0.2"))], []),
        ([], ["--node-ip-override", "192.168.0.2"]),
        # the flag wins over the Node's addresses, as kube-proxy's override does
        ([node(("InternalIP", "10.1.1.1"))], ["--node-ip-override", "192.168.0.2,fd00::2"]),
    ],
    ids=["node-internal-ip", "node-external-ip", "flag", "flag-over-node"],
)
def test_source_ranges_admit_the_node_like_kube_proxy(
    tmp_path: Path, extra: list[dict[str, Any]], flags: list[str]
) -> None:
    assert render(tmp_path, source_ranges_objects() + extra, *flags) == GOLDEN_LB


@pytest.mark.parametrize(
    ("extra", "flags"),
    [
        ([], []),
        ([node(("InternalIP", "10.1.1.1"))], []),
        ([node(("InternalIP", "192.168.0.2"))], ["--node-ip-override", "10.1.1.1"]),
        # another node's addresses are not this node's
        ([node(("InternalIP", "192.168.0.2")) | {"metadata": {"name": "other"}}], []),
    ],
    ids=["no-addresses", "node-outside-ranges", "flag-outside-ranges", "other-node"],
)
def test_no_allow_from_node_when_the_node_is_outside_the_ranges(
    tmp_path: Path, extra: list[dict[str, Any]], flags: list[str]
) -> None:
    out = render(tmp_path, source_ranges_objects() + extra, *flags)
    assert ALLOW_FROM_NODE not in out
    assert '"ns5/svc5:p80 loadbalancer IP" -s 192.168.0.0/24' in out


def overall_objects() -> list[dict[str, Any]]:
    """kube-proxy's TestOverallIPTablesRules services, as manifests (leading zeros in some
    addresses, as old objects still hold them: kube-proxy reads them as decimal)."""
    local = {"node": NODE}
    return [
        make_service_obj(
            "ns1", "svc1", clusterIP="172.30.0.041", ports=[{"name": "p80", "port": 80}]
        ),
        eps("ns1", "svc1", "10.180.0.1"),
        lb(
            "ns2",
            "svc2",
            "172.30.0.42",
            3001,
            ["1.2.3.4"],
            externalIPs=["192.168.99.022"],
            externalTrafficPolicy="Local",
            healthCheckNodePort=30000,
        ),
        eps("ns2", "svc2", "10.180.0.2"),
        make_service_obj(
            "ns3",
            "svc3",
            type="NodePort",
            clusterIP="172.30.0.43",
            ports=[{"name": "p80", "port": 80, "nodePort": 3003}],
        ),
        eps("ns3", "svc3", "10.180.0.3"),
        make_service_obj(
            "ns4",
            "svc4",
            type="NodePort",
            clusterIP="172.30.0.44",
            externalIPs=["192.168.99.33"],
            ports=[{"name": "p80", "port": 80}],
        ),
        eps("ns4", "svc4", "10.180.0.4", {"ip": "10.180.0.5", **local}),
        lb(
            "ns5",
            "svc5",
            "172.30.0.45",
            3002,
            ["5.6.7.8"],
            loadBalancerSourceRanges=["203.0.113.0/25"],
            sessionAffinity="ClientIP",
            healthCheckNodePort=30000,
        ),
        eps("ns5", "svc5", "10.180.0.3"),
        make_service_obj(
            "ns6", "svc6", clusterIP="172.30.0.46", ports=[{"name": "p80", "port": 80}]
        ),
        node(("InternalIP", "192.168.0.2")),
    ]


def test_render_of_manifests_matches_kube_proxys_overall_ruleset(tmp_path: Path) -> None:
    """kube-proxy's TestOverallIPTablesRules expectation, through `kproxy render --manifests`:
    equal up to kproxy's documented choices (no localhost NodePorts, --random-fully, no nfacct
    counters, spelled-out recent options)."""
    reference = (GOLDEN / "kube-proxy-overall.kube-proxy").read_text()
    translated = "".join(
        to_kproxy_dialect(line) + "\n"
        for line in without_comments(reference).splitlines()
        if not any(marker in line for marker in KUBE_PROXY_ONLY)
    )
    ours = render(tmp_path, overall_objects()).replace(" --random-fully", "")
    assert table_lines(ours) == table_lines(translated)
