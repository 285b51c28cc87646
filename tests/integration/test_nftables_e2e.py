"""nftables mode end to end, beyond the suites parametrised over modes (test_iptables_e2e,
test_parity_traffic): IPv6 through the ip6 kube-proxy table, stale UDP conntrack entries
cleared when an endpoint moves, and `kproxy explain` predicting what real traffic hits."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kproxy.lab.netlab import Lab
from kproxy.lab.nsexec import module_argv, ns_argv
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_batch, http_get, udp_query
from kproxy.render.nftables import hash8
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


# -- the chainless fast path (plain ClusterIP services) ---------------------------------------
FAST_VIP, FAST_VIP6 = "10.96.7.90", "fd00:96::7:90"
FAST_NODE_PORT = 30790


def fast_service(*, v6: bool = False, **spec: Any) -> dict[str, Any]:
    ports = [
        {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"},
        {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
    ]
    if spec.get("type") == "NodePort":
        ports[0]["nodePort"] = FAST_NODE_PORT
    body: dict[str, Any] = {"clusterIP": FAST_VIP, "ports": ports, **spec}
    if v6:
        body["clusterIPs"] = [FAST_VIP, FAST_VIP6]
        body["ipFamilies"] = ["IPv4", "IPv6"]
        body["ipFamilyPolicy"] = "RequireDualStack"
    return make_service_obj("default", "fast", **body)


def fast_slice(pods: Any, *, v6: bool = False) -> dict[str, Any]:
    ports = [("http", 80, "TCP"), ("dns", 5353, "UDP")]
    eps = [{"ip": p.ip6 if v6 else p.ip, "node": p.node.name} for p in pods]
    name = "fast-6" if v6 else "fast-4"
    return make_slice_obj(
        "default", name, "fast", eps, ports, address_type="IPv6" if v6 else "IPv4"
    )


def udp_names(ns: str, vip: str, *, tries: int = 12) -> set[str]:
    """Server names over `tries` UDP flows (a new source port each); every query answered."""
    out = set()
    for _ in range(tries):
        res = udp_query(ns, vip, 53, n=1).results[0]
        assert res.ok, res.error
        assert res.name is not None
        out.add(res.name)
    return out


def test_fast_path_tcp_and_udp_in_both_families(lab_factory: Any) -> None:
    """A plain ClusterIP service gets no chain and no service-ips element: its endpoints are
    elements of the shared cluster-endpoints-3 map. TCP and UDP (port 53 -> 5353), IPv4 and
    IPv6, from a pod and from the node itself, all reach every endpoint."""
    lab = lab_factory(nodes=1, pods_per_node=3, ipv6=True)
    with serve_cluster_api(lab) as (api, kubeconfig):
        serve_pods(lab, tcp=[80], udp=[5353])
        api.upsert(fast_service(v6=True))
        api.upsert(fast_slice(lab.pods))
        api.upsert(fast_slice(lab.pods, v6=True))
        agent = Agent(lab, lab.nodes[0], kubeconfig, extra=MODE)
        agent.start()
        rules = agent.ruleset()
        assert "default/fast" not in rules  # no per-service chain, no commented element
        assert f"{FAST_VIP} . udp . 53 . 2 : " in rules
        assert f"{FAST_VIP6} . tcp . 80 . 0 : " in rules
        names = {p.name for p in lab.pods}
        me = lab.pods[0].ns
        for vip in (FAST_VIP, FAST_VIP6):
            batch = http_batch(me, vip, 80, n=30)
            assert batch.ok_count == 30, batch.errors
            assert set(batch.names) == names
            assert len(udp_names(me, vip)) >= 2  # random over the endpoints, translated
        node = http_batch(lab.nodes[0].ns, FAST_VIP, 80, n=10)
        assert node.ok_count == 10, node.errors
        # partial syncs over netlink: two endpoints left in each family, so the new maps and
        # rules of count 2 come from the codec (not from nft -f) and carry the traffic
        two = lab.pods[1:]
        api.upsert(fast_slice(two))
        api.upsert(fast_slice(two, v6=True))
        want = {p.name for p in two}
        for vip in (FAST_VIP, FAST_VIP6):
            eventually(lambda vip=vip: set(http_batch(me, vip, 80, n=20).names) == want)
            assert udp_names(me, vip, tries=6) <= want
        assert agent.ruleset().count("numgen random mod 2 map @cluster-endpoints-2") == 2
        assert syncs(agent)[-1][0] is False


def test_fast_path_endpoint_counts_with_traffic(lab: Lab, cluster_api: Any) -> None:
    """1 -> 3 -> 2 -> 0 endpoints: the service's elements move between the count maps in
    partial syncs, traffic follows each step, and with none left it is rejected."""
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80], udp=[5353])
    pods = lab.pods
    me = lab.pods[0].ns
    api.upsert(fast_service())
    api.upsert(fast_slice(pods[:1]))
    agent = Agent(lab, lab.nodes[0], kubeconfig, extra=MODE)
    agent.start()
    assert set(http_batch(me, FAST_VIP, 80, n=5).names) == {pods[0].name}
    for step in (pods, pods[1:], pods[2:]):
        api.upsert(fast_slice(step))
        want = {p.name for p in step}
        eventually(lambda want=want: set(http_batch(me, FAST_VIP, 80, n=20).names) == want)
        assert udp_names(me, FAST_VIP, tries=8) <= want
        assert f"cluster-endpoints-{len(step)} {{" in agent.ruleset()
    api.upsert(fast_slice([]))
    eventually(lambda: "no-endpoint-services" in agent.ruleset() and FAST_VIP in agent.ruleset())
    eventually(lambda: "refused" in str(http_get(me, FAST_VIP, 80).error).lower())
    assert any(not full for full, _, _ in syncs(agent))  # partial syncs did the moves


def test_service_moves_between_fast_path_and_chain_layout(lab: Lab, cluster_api: Any) -> None:
    """Gaining a NodePort or ClientIP affinity moves a service to kube-proxy's chain layout
    (its chains and service-ips element); losing it moves it back; traffic works throughout."""
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80], udp=[5353])
    pods = lab.pods
    names = {p.name for p in pods}
    me = lab.pods[0].ns
    api.upsert(fast_service())
    api.upsert(fast_slice(pods))
    agent = Agent(lab, lab.nodes[0], kubeconfig, extra=MODE)
    agent.start()
    assert "default/fast" not in agent.ruleset()
    assert set(http_batch(me, FAST_VIP, 80, n=20).names) == names

    api.upsert(fast_service(type="NodePort"))
    eventually(lambda: '"default/fast:http" : goto service-' in agent.ruleset())
    assert f"{FAST_VIP} . tcp . 80 . " not in agent.ruleset()  # its elements left the map
    assert f"{FAST_VIP} . udp . 53 . " in agent.ruleset()  # the UDP port stays fast
    assert set(http_batch(me, FAST_VIP, 80, n=20).names) == names
    batch = http_batch(lab.client.ns, lab.nodes[0].ip, FAST_NODE_PORT, n=10)
    assert batch.ok_count == 10, batch.errors

    api.upsert(fast_service(sessionAffinity="ClientIP"))
    eventually(lambda: "affinity-" in agent.ruleset())
    assert f"{FAST_VIP} . udp . 53 . " not in agent.ruleset()
    pinned = http_batch(me, FAST_VIP, 80, n=10)
    assert pinned.ok_count == 10 and len(pinned.names) == 1, pinned.names

    api.upsert(fast_service())
    eventually(lambda: "default/fast" not in agent.ruleset())
    assert f"{FAST_VIP} . tcp . 80 . 2 : " in agent.ruleset()
    assert set(http_batch(me, FAST_VIP, 80, n=30).names) == names


def test_explain_predicts_the_fast_path(lab: Lab, cluster_api: Any) -> None:
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80], udp=[5353])
    api.upsert(fast_service())
    api.upsert(fast_slice(lab.pods))
    Agent(lab, lab.nodes[0], kubeconfig, extra=MODE).start()
    pod = lab.pods[0]
    for proto, port, target in (("tcp", 80, 80), ("udp", 53, 5353)):
        out = lab.run(
            lab.nodes[0].ns,
            module_argv(
                "kproxy",
                "explain",
                f"{FAST_VIP}:{port}/{proto}",
                "--from",
                pod.ip,
                "-o",
                "json",
                *MODE,
            ),
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        paths = json.loads(out.stdout)["paths"]
        assert sum(p["share"] for p in paths) == pytest.approx(1.0)
        assert [p["share"] for p in paths] == pytest.approx([1 / 3] * 3)
        assert all("cluster-endpoints" in p["chains"] for p in paths)
        predicted = {p["dnat"] for p in paths if p["verdict"] == "accept"}
        assert predicted == {f"{p.ip}:{target}" for p in lab.pods}
        # hairpin: only the path back to the sender is masqueraded
        assert {p["dnat"] for p in paths if p["masquerade"]} == {f"{pod.ip}:{target}"}
    batch = http_batch(pod.ns, FAST_VIP, 80, n=40)
    assert {f"{lab.pod(n).ip}:80" for n in batch.names} == {f"{p.ip}:80" for p in lab.pods}
    # `kproxy status` reads the fast path's elements back
    res = lab.run(
        lab.nodes[0].ns,
        module_argv("kproxy", "status", "-o", "json"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {r["frontend"]: r for r in json.loads(res.stdout)["ports"]}
    assert rows[f"{FAST_VIP}:53/udp"]["service"] == "default/fast:dns"
    assert rows[f"{FAST_VIP}:53/udp"]["programmed"] == sorted(f"{p.ip}:5353" for p in lab.pods)
    assert all(r["ok"] for r in rows.values())


def test_a_service_nftables_refuses_is_left_out_and_reported(lab: Lab, cluster_api: Any) -> None:
    """Another program left a set under the name of a service's endpoint map, with another
    type: creating that service's map is refused (EEXIST) in every transaction that holds it.
    The API cannot produce a refusal (validation keeps names within nf_tables' limits), so the
    conflict is put into the table from outside, as another program (or an older kproxy with
    another map layout) would. The agent leaves that service out, reports it, keeps every other
    service working, and tries it again once it changes."""
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80], udp=[5353])
    node = lab.nodes[0].ns
    pods = [p.ip for p in lab.pods]

    def service(name: str, ip: str, node_port: int = 0) -> dict[str, Any]:
        """With a node port: the chain layout (an endpoint map named after the service)."""
        port: dict[str, Any] = {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}
        if node_port:
            port["nodePort"] = node_port
        kind = "NodePort" if node_port else "ClusterIP"
        return make_service_obj("default", name, type=kind, clusterIP=ip, ports=[port])

    def endpoints(name: str, ips: list[str]) -> dict[str, Any]:
        return make_slice_obj("default", f"{name}-4", name, ips, [("http", 80, "TCP")])

    api.upsert(service("web", VIP))
    api.upsert(endpoints("web", pods))
    agent = Agent(lab, lab.nodes[0], kubeconfig, extra=MODE)
    agent.start()
    squatted = f"endpoints-{hash8('default/bad:http' + 'tcp')}-default/bad/tcp/http"
    lab.run(node, ["nft", "add", "set", "ip", "kube-proxy", squatted, "{ type ipv4_addr ; }"])
    api.upsert(service("bad", "10.96.7.90", node_port=30790))
    api.upsert(endpoints("bad", pods))

    def rejected() -> list[dict[str, Any]]:
        res = lab.run(node, module_argv("kproxy", "status", "-o", "json", *MODE), check=False)
        items = json.loads(res.stdout).get("rejected") or []
        assert res.returncode == 1 and items, agent.log()[-3000:]
        return list(items)

    (item,) = eventually(rejected, timeout=20)
    assert item["service"] == "default/bad" and item["family"] == 4
    # nft 1.0.6 itself crashes on this input (signal 11); newer ones say "File exists"
    assert "File exists" in item["error"] or "signal" in item["error"], item
    table = lab.run(node, module_argv("kproxy", "status", *MODE), check=False).stdout
    assert "Refused by nftables" in table and "default/bad" in table
    assert "kproxy_sync_rejected_services 1.0" in agent.metrics()
    assert "nftables refused the rules of service default/bad" in agent.log()
    assert agent.healthz()[0]
    batch = http_batch(lab.client.ns, VIP, 80, n=10)  # random balancing: any of the pods
    assert batch.ok_count == 10 and set(batch.names) <= {p.name for p in lab.pods}
    assert "10.96.7.90" not in agent.ruleset()
    # later changes to other services land as partial syncs, without probing again
    before = syncs(agent)
    api.upsert(service("late", "10.96.7.91"))
    api.upsert(endpoints("late", pods[:1]))
    eventually(lambda: http_batch(lab.client.ns, "10.96.7.91", 80, n=2).ok_count == 2, timeout=10)
    assert not any(full for full, _, _ in syncs(agent)[len(before) :])
    assert agent.healthz()[0] and len(rejected()) == 1
    # the full sync that left the service out deleted the set as a stale one (a name of
    # kproxy's own shape in kproxy's table); once the service changes it is tried again
    assert squatted not in agent.ruleset()
    api.upsert(endpoints("bad", pods[:1]))
    eventually(lambda: http_batch(lab.client.ns, "10.96.7.90", 80, n=2).ok_count == 2, timeout=15)
    assert "kproxy_sync_rejected_services 0.0" in agent.metrics()


def test_fast_path_translates_sctp(lab: Lab, cluster_api: Any) -> None:
    """The fast path's one rule per endpoint count has no protocol match: SCTP INITs to a
    ClusterIP reach both endpoints with address and port translated (raw SCTP packets: this
    kernel may have no SCTP stack, the translation is conntrack's and nftables')."""
    api, kubeconfig = cluster_api
    sender, targets = lab.pods[0], lab.pods[1:]
    port = {"name": "sig", "port": 9999, "targetPort": 7777, "protocol": "SCTP"}
    api.upsert(make_service_obj("default", "sig", clusterIP=FAST_VIP, ports=[port]))
    api.upsert(
        make_slice_obj(
            "default",
            "sig-4",
            "sig",
            [{"ip": p.ip, "node": p.node.name} for p in targets],
            [("sig", 7777, "SCTP")],
        )
    )
    agent = Agent(lab, lab.nodes[0], kubeconfig, extra=MODE)
    agent.start()
    assert f"{FAST_VIP} . sctp . 9999 . 1 : " in agent.ruleset()
    probe = str(Path(__file__).parents[1] / "support" / "sctp_probe.py")
    receivers = [
        subprocess.Popen(
            ns_argv(p.ns, [sys.executable, probe, "recv", "4"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in targets
    ]
    try:
        for r in receivers:
            assert r.stdout is not None and "ready" in r.stdout.readline()
        lab.run(sender.ns, [sys.executable, probe, "send", FAST_VIP, "9999", "30"])
        got = {
            p.ip: [json.loads(line) for line in r.communicate(timeout=10)[0].splitlines()]
            for p, r in zip(targets, receivers, strict=True)
        }
    finally:
        for r in receivers:
            r.kill()
    assert all(got.values()), got  # both endpoints got some of the 30 associations
    assert sum(len(v) for v in got.values()) == 30
    for ip, packets in got.items():
        assert {(p["dst"], p["dport"]) for p in packets} == {(ip, 7777)}


def test_a_shared_external_ip_port_hands_over_in_a_partial_sync(lab: Lab, cluster_api: Any) -> None:
    """Two Services claim one externalIP and port (any user can set externalIPs), each with
    its own backend. The first in name order gets the traffic (as its rule would in iptables
    mode); once it is deleted the other one gets it after one partial sync, without waiting
    for a full sync."""
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80])
    external = "10.96.7.99"
    first, second, client = lab.pods[0], lab.pods[1], lab.pods[2].ns

    def service(name: str, ip: str, pod: Any) -> None:
        port = {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}
        api.upsert(
            make_service_obj("default", name, clusterIP=ip, externalIPs=[external], ports=[port])
        )
        api.upsert(make_slice_obj("default", f"{name}-4", name, [pod.ip], [("http", 80, "TCP")]))

    service("a", "10.96.7.81", first)
    agent = Agent(lab, lab.nodes[0], kubeconfig, extra=MODE)
    agent.start()
    before = syncs(agent)
    service("b", "10.96.7.82", second)
    eventually(lambda: http_batch(client, "10.96.7.82", 80, n=2).ok_count == 2, timeout=10)
    batch = http_batch(client, external, 80, n=6)
    assert batch.ok_count == 6 and set(batch.names) == {first.name}, batch.errors
    api.delete("Service", "default", "a")
    eventually(
        lambda: set(http_batch(client, external, 80, n=3).names) == {second.name}, timeout=10
    )
    batch = http_batch(client, external, 80, n=6)
    assert batch.ok_count == 6 and set(batch.names) == {second.name}, batch.errors
    after = syncs(agent)[len(before) :]
    assert after and not any(full for full, _, _ in after), after
    assert "nftables partial sync failed" not in agent.log()
    metrics = agent.metrics()
    # the start-up's full sync only
    full_syncs = re.findall(r"^kproxy_sync_full_proxy_rules_total\{(.*)\} (\S+)$", metrics, re.M)
    assert [(r, float(n)) for r, n in full_syncs if float(n)] == [('reason="startup"', 1.0)]
