"""The nftables packet tracer over a real `nft -j list table ip kube-proxy` dump (the golden
`overall` ruleset loaded into a kernel and listed): kube-proxy's packet-flow expectations for
ClusterIP, masquerade, hairpin, no endpoints, invalid ports, NodePort and externalIP under
eTP Local, LoadBalancer source ranges and node-originated traffic."""

from __future__ import annotations

from pathlib import Path

import pytest

from kproxy.inspect.nfttrace import Packet, parse_table, trace

TABLE = parse_table((Path(__file__).parent / "golden" / "nftables-overall.json").read_text())
NODE = "192.168.0.2"


def outcome(packet: Packet) -> set[tuple[str, str, bool, float]]:
    return {
        (p.verdict, p.dnat, p.masquerade, round(p.share, 3))
        for p in trace(TABLE, packet, local={NODE})
    }


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (
            Packet("tcp", "10.0.0.5", "172.30.0.41", 80),
            {("accept", "10.180.0.1:80", False, 0.5), ("accept", "10.180.0.2:80", False, 0.5)},
        ),
        (  # from outside the cluster CIDR: masqueraded
            Packet("tcp", "192.168.1.9", "172.30.0.41", 80),
            {("accept", "10.180.0.1:80", True, 0.5), ("accept", "10.180.0.2:80", True, 0.5)},
        ),
        (  # hairpin: only the connection that lands on the sender is masqueraded
            Packet("tcp", "10.180.0.1", "172.30.0.41", 80),
            {("accept", "10.180.0.1:80", True, 0.5), ("accept", "10.180.0.2:80", False, 0.5)},
        ),
        (Packet("udp", "10.0.0.5", "172.30.0.44", 53), {("reject", "", False, 1.0)}),
        (Packet("tcp", "10.0.0.5", "172.30.0.41", 81), {("reject", "", False, 1.0)}),
        (Packet("udp", "9.9.9.9", NODE, 3053), {("reject", "", False, 1.0)}),
        (  # eTP Local from outside: the local endpoint only, client IP kept
            Packet("tcp", "192.168.1.9", NODE, 3001),
            {("accept", "10.180.0.3:80", False, 1.0)},
        ),
        (  # eTP Local from a pod: short-circuited to every endpoint
            Packet("tcp", "10.0.0.5", NODE, 3001),
            {("accept", "10.180.0.3:80", False, 0.5), ("accept", "10.180.0.4:80", False, 0.5)},
        ),
        (Packet("tcp", "192.168.1.9", "5.6.7.8", 80), {("accept", "10.180.0.3:80", False, 1.0)}),
        (Packet("tcp", "198.51.100.9", "1.2.3.4", 80), {("drop", "", False, 1.0)}),
        (Packet("tcp", "203.0.113.5", "1.2.3.4", 80), {("accept", "10.180.0.3:80", False, 1.0)}),
        (  # the node itself (outside the cluster CIDR), through affinity's endpoint chains
            Packet("tcp", NODE, "172.30.0.43", 80, local=True),
            {("accept", "10.180.0.5:80", True, 0.5), ("accept", "10.180.0.6:80", True, 0.5)},
        ),
        (  # the fast path for UDP: three endpoints, a third each, through cluster-endpoints
            Packet("udp", "10.0.0.5", "172.30.0.45", 53),
            {
                ("accept", "10.180.0.7:5353", False, 0.333),
                ("accept", "10.180.0.8:5353", False, 0.333),
                ("accept", "10.180.0.9:5353", False, 0.333),
            },
        ),
        (Packet("tcp", "10.0.0.5", "172.30.0.45", 53), {("reject", "", False, 1.0)}),
        (  # iTP Local on the fast path: the local endpoint only
            Packet("tcp", "10.0.0.5", "172.30.0.46", 80),
            {("accept", "10.180.0.10:80", False, 1.0)},
        ),
    ],
    ids=[
        "clusterip",
        "clusterip-offcluster-masq",
        "hairpin",
        "no-endpoints-reject",
        "invalid-port-reject",
        "nodeport-no-endpoints-reject",
        "etp-local-external",
        "etp-local-pod-shortcircuit",
        "externalip",
        "source-range-drop",
        "source-range-allowed",
        "node-affinity",
        "fast-udp",
        "fast-wrong-protocol-reject",
        "fast-itp-local",
    ],
)
def test_packet_flow(packet: Packet, expected: set[tuple[str, str, bool, float]]) -> None:
    assert outcome(packet) == expected


def test_status_rows_match_the_golden_table() -> None:
    """`kproxy status` (nftables): every wanted ClusterIP frontend is programmed as wanted; a
    frontend whose endpoint map lost an element is flagged, in a per-service endpoint map and
    in a fast-path map alike."""
    from kproxy.inspect.nftstatus import rows_for
    from kproxy.render.nftables import Renderer
    from tests.unit.test_render_nftables import V4, overall

    renderer = Renderer(V4)
    blocks = {ref: renderer.render_service(v) for ref, v in overall().items()}
    rows = rows_for(blocks, TABLE)
    assert {r["frontend"] for r in rows} == {
        "172.30.0.41:80/tcp",  # fast path, 2 endpoints
        "172.30.0.42:80/tcp",
        "172.30.0.45:53/udp",  # fast path, 3 endpoints
        "172.30.0.46:80/tcp",  # fast path, iTP Local
    }
    assert all(r["ok"] for r in rows), rows
    by = {r["frontend"]: r for r in rows}
    assert by["172.30.0.45:53/udp"]["programmed"] == [
        "10.180.0.7:5353",
        "10.180.0.8:5353",
        "10.180.0.9:5353",
    ]
    name = next(n for n in TABLE.sets if n.startswith("endpoints-") and "svc2" in n)
    damaged = parse_table((Path(__file__).parent / "golden" / "nftables-overall.json").read_text())
    damaged.sets[name] = damaged.sets[name][:1]
    damaged.sets["cluster-endpoints-3"] = damaged.sets["cluster-endpoints-3"][1:]
    bad = [r for r in rows_for(blocks, damaged) if not r["ok"]]
    assert sorted(r["frontend"] for r in bad) == ["172.30.0.42:80/tcp", "172.30.0.45:53/udp"]


def test_fast_path_lookup_miss_falls_through() -> None:
    """An index without its element: that share is not translated and goes on through the
    chain (here: rejected as traffic to an invalid ClusterIP port), so the shares still sum to
    one and the tracer never invents a translation the kernel would not do."""
    damaged = parse_table((Path(__file__).parent / "golden" / "nftables-overall.json").read_text())
    damaged.sets["cluster-endpoints-3"] = damaged.sets["cluster-endpoints-3"][1:]
    paths = trace(damaged, Packet("udp", "10.0.0.5", "172.30.0.45", 53), local={NODE})
    got = {(p.verdict, p.dnat, round(p.share, 3)) for p in paths}
    assert got == {
        ("accept", "10.180.0.8:5353", 0.333),
        ("accept", "10.180.0.9:5353", 0.333),
        ("reject", "", 0.333),
    }
