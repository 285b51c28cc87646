"""nftables mode end to end, beyond the suites parametrised over modes (test_iptables_e2e,
test_parity_traffic): IPv6 through the ip6 kube-proxy table, stale UDP conntrack entries
cleared when an endpoint moves, and `kproxy explain` predicting what real traffic hits."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kproxy.lab.netlab import Lab
from kproxy.lab.nsexec import module_argv
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_batch, udp_query
from tests.support.agent import Agent, eventually, serve_cluster_api, syncs
from tests.support.objects import make_service_obj, make_slice_obj

pytestmark = [pytest.mark.netns]

VIP, VIP6 = "10.96.7.80", "fd00:96::7:80"
NODE_PORT = 30780
MODE = ["--proxy-mode", "nftables"]


def web(lab: Lab, *, v6: bool) -> tuple[dict[str, Any], ...]:
    ports = [
        {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": NODE_PORT},
        {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
    ]
    spec: dict[str, Any] = {"type": "NodePort", "clusterIP": VIP, "ports": ports}
    if v6:
        spec["clusterIPs"] = [VIP, VIP6]
        spec["ipFamilies"] = ["IPv4", "IPv6"]
        spec["ipFamilyPolicy"] = "RequireDualStack"
    out = [make_service_obj("default", "web", **spec)]
    slice_ports = [("http", 80, "TCP"), ("dns", 5353, "UDP")]
    out.append(
        make_slice_obj(
            "default",
            "web-4",
            "web",
            [{"ip": p.ip, "node": p.node.name} for p in lab.pods],
            slice_ports,
        )
    )
    if v6:
        out.append(
            make_slice_obj(
                "default",
                "web-6",
                "web",
                [{"ip": p.ip6, "node": p.node.name} for p in lab.pods],
                slice_ports,
                address_type="IPv6",
            )
        )
    return tuple(out)


def test_ipv6_clusterip_and_nodeport(lab_factory: Any) -> None:
    lab = lab_factory(nodes=1, pods_per_node=2, ipv6=True)
    with serve_cluster_api(lab) as (api, kubeconfig):
        serve_pods(lab, tcp=[80], udp=[5353])
        for obj in web(lab, v6=True):
            api.upsert(obj)
        agent = Agent(lab, lab.nodes[0], kubeconfig, extra=MODE)
        agent.start()
        assert "table ip6 kube-proxy" in agent.ruleset()
        names = {p.name for p in lab.pods}
        batch = http_batch(lab.pods[0].ns, VIP6, 80, n=30)
        assert batch.ok_count == 30 and set(batch.names) == names
        node6 = lab.nodes[0].ip6
        assert node6 is not None
        batch = http_batch(lab.client.ns, node6, NODE_PORT, n=20)
        assert batch.ok_count == 20, batch.errors
        # from outside the cluster: masqueraded, the pods see the node's address
        assert lab.client.ip6 not in {r.client_ip for r in batch.results}
        assert udp_query(lab.pods[0].ns, VIP6, 53, n=1).results[0].ok


def test_udp_flow_moves_to_the_new_endpoint(lab: Lab, cluster_api: Any) -> None:
    """A client keeps its UDP source port (as resolvers do); when its endpoint goes away the
    agent deletes the conntrack entry, so the next datagram reaches the new endpoint."""
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80], udp=[5353])
    old, new = lab.pods[0], lab.pods[1]
    svc = web(lab, v6=False)[0]
    api.upsert(svc)
    api.upsert(make_slice_obj("default", "web-4", "web", [old.ip], [("dns", 5353, "UDP")]))
    Agent(lab, lab.nodes[0], kubeconfig, extra=MODE).start()
    client = lab.pods[2].ns
    assert udp_query(client, VIP, 53, src_port=40953, n=1).results[0].name == old.name
    api.upsert(make_slice_obj("default", "web-4", "web", [new.ip], [("dns", 5353, "UDP")]))
    eventually(
        lambda: udp_query(client, VIP, 53, src_port=40953, n=1).results[0].name == new.name,
        timeout=10,
    )


def test_explain_predicts_what_traffic_hits(lab: Lab, cluster_api: Any) -> None:
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80], udp=[5353])
    for obj in web(lab, v6=False):
        api.upsert(obj)
    Agent(lab, lab.nodes[0], kubeconfig, extra=MODE).start()
    pod = lab.pods[0]
    out = lab.run(
        lab.nodes[0].ns,
        module_argv("kproxy", "explain", f"{VIP}:80/tcp", "--from", pod.ip, "-o", "json", *MODE),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    paths = json.loads(out.stdout)["paths"]
    predicted = {p["dnat"] for p in paths if p["verdict"] == "accept"}
    assert sum(p["share"] for p in paths) == pytest.approx(1.0)
    batch = http_batch(pod.ns, VIP, 80, n=40)
    assert batch.ok_count == 40
    assert predicted == {f"{lab.pod(n).ip}:80" for n in batch.names}
    # hairpin: only the path back to the sender is masqueraded
    assert {p["dnat"] for p in paths if p["masquerade"]} == {f"{pod.ip}:80"}


def test_affinity_timeout_change_lands_in_a_partial_sync(lab: Lab, cluster_api: Any) -> None:
    """Changing sessionAffinityConfig.clientIP.timeoutSeconds: the affinity sets are recreated
    with the new timeout in a partial sync (their rules emptied and refilled in the same
    transaction), and a client keeps reaching one endpoint through it."""
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80], udp=[5353])

    def sticky(seconds: int) -> dict[str, Any]:
        return make_service_obj(
            "default",
            "web",
            clusterIP=VIP,
            ports=[{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": seconds}},
        )

    api.upsert(sticky(600))
    api.upsert(
        make_slice_obj("default", "web-4", "web", [p.ip for p in lab.pods], [("http", 80, "TCP")])
    )
    agent = Agent(lab, lab.nodes[0], kubeconfig, extra=MODE)
    agent.start()

    def timeouts() -> list[str]:
        return re.findall(r"set affinity-\S+ \{[^}]*?timeout (\w+)", agent.ruleset())

    assert timeouts() == ["10m"] * len(lab.pods)
    client = lab.client.ns
    first = http_batch(client, VIP, 80, n=10)
    assert first.ok_count == 10 and len(set(first.names)) == 1
    before = syncs(agent)
    api.upsert(sticky(90))
    eventually(lambda: timeouts() == ["1m30s"] * len(lab.pods), timeout=10)
    after = syncs(agent)[len(before) :]
    assert after and not any(full for full, _, _ in after), after
    assert "nftables partial sync failed" not in agent.log()
    again = http_batch(client, VIP, 80, n=10)
    assert again.ok_count == 10 and len(set(again.names)) == 1
    ok, _ = agent.healthz()
    assert ok
