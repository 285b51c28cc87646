"""kube-proxy parity across two nodes, continued (issue: iptables mode at kube-proxy parity):
stale UDP conntrack cleanup, IPv6 ClusterIPs, partial syncs, and the operational interface
(/healthz, /livez, /metrics).

Same topology as test_parity_traffic.py: two nodes running the real `kproxy run` against one fake
apiserver, two pods per node serving HTTP on 80 and UDP on 5353, the client outside the cluster.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kproxy.lab.netlab import Lab, Pod
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_batch, udp_query
from kproxy.render.chains import svc_chain
from tests.support.agent import (
    Agent,
    eventually,
    http_json,
    node_obj,
    serve_cluster_api,
    start_agents,
    syncs,
)
from tests.support.fakeapi import FakeApiServer
from tests.support.objects import make_service_obj, make_slice_obj

pytestmark = [pytest.mark.netns]

HEALTHZ = ("127.0.0.1", 10256)  # where tests/support/agent.py binds them, in each node
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"


def endpoint(pod: Pod, *, ip: str | None = None) -> dict[str, Any]:
    return {"ip": ip or pod.ip, "node": pod.node.name, "pod": pod.name}


@pytest.fixture
def served(lab2: Lab, cluster_api2: tuple[FakeApiServer, str]) -> tuple[Lab, FakeApiServer, str]:
    api, kubeconfig = cluster_api2
    serve_pods(lab2, tcp=[80], udp=[5353])
    return lab2, api, kubeconfig


# -- UDP conntrack -------------------------------------------------------------------------------

DNS_VIP = "10.96.20.53"
DNS_NODE_PORT = 30153


def dns_slice(pods: Sequence[Pod]) -> dict[str, Any]:
    eps = [endpoint(p) for p in pods]
    return make_slice_obj("default", "dns-x1", "dns", eps, [("dns", 5353, "UDP")])


def test_udp_client_with_fixed_port_moves_off_a_removed_endpoint(
    served: tuple[Lab, FakeApiServer, str],
) -> None:
    lab, api, kubeconfig = served
    svc = make_service_obj(
        "default",
        "dns",
        type="NodePort",
        clusterIP=DNS_VIP,
        ports=[
            {
                "name": "dns",
                "port": 53,
                "targetPort": 5353,
                "protocol": "UDP",
                "nodePort": DNS_NODE_PORT,
            }
        ],
    )
    api.upsert(svc)
    api.upsert(dns_slice(lab.pods))
    start_agents(lab, kubeconfig)

    # Two long-lived UDP flows (a fixed source port each, as a resolver's would be): a pod on
    # node2 to the cluster IP, and the outside client to node1's NodePort.
    flows: list[tuple[str, str, int, int]] = [
        (lab.pods_on(1)[1].ns, DNS_VIP, 53, 40053),
        (lab.client.ns, lab.nodes[0].ip, DNS_NODE_PORT, 40054),
    ]

    def ask(flow: tuple[str, str, int, int], n: int = 1) -> list[str | None]:
        ns, ip, port, src = flow
        batch = udp_query(ns, ip, port, src_port=src, n=n, timeout=0.5)
        return [r.name for r in batch.results]

    first = [ask(f, n=3) for f in flows]
    for answers in first:
        assert len(set(answers)) == 1 and answers[0] is not None, answers  # conntrack holds
    pinned = {answers[0] for answers in first}

    # The pinned pods leave the service but keep running: only conntrack could still send the
    # flows there, for as long as they keep talking.
    api.upsert(dns_slice([p for p in lab.pods if p.name not in pinned]))

    def moved(flow: tuple[str, str, int, int]) -> Callable[[], bool]:
        def check() -> bool:
            (name,) = ask(flow)
            return name is not None and name not in pinned

        return check

    for flow in flows:
        eventually(moved(flow), timeout=5.0, step=0.2)
        assert len(set(ask(flow, n=3))) == 1  # and sticks to its new endpoint

    # The service is deleted: its flows are forgotten too, so nothing answers them any more
    # (a stale entry would keep DNATing them to the pods, which still listen).
    api.delete("Service", "default", "dns")
    eventually(lambda: all(ask(flow) == [None] for flow in flows), timeout=5.0, step=0.2)


# -- IPv6 ----------------------------------------------------------------------------------------


def test_ipv6_cluster_ip_and_node_port(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=2, pods_per_node=1, ipv6=True)
    serve_pods(lab, tcp=[80])
    vip4, vip6 = "10.96.20.66", "fd00:96::66"
    svc = make_service_obj(
        "default",
        "dual",
        type="NodePort",
        clusterIP=vip4,
        clusterIPs=[vip4, vip6],
        ipFamilies=["IPv4", "IPv6"],
        ipFamilyPolicy="RequireDualStack",
        ports=[{"name": "http", "port": 80, "targetPort": 80, "nodePort": 30166}],
    )
    slices = [
        make_slice_obj("default", "dual-v4", "dual", [endpoint(p) for p in lab.pods]),
        make_slice_obj("default", "dual-v6", "dual", [endpoint(p, ip=p.ip6) for p in lab.pods]),
    ]
    everyone = {p.name for p in lab.pods}
    with serve_cluster_api(lab) as (api, kubeconfig):
        for obj in (svc, *slices):
            api.upsert(obj)
        agents = start_agents(
            lab, kubeconfig, extra=["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48"]
        )
        for pod in lab.pods:
            for vip in (vip6, vip4):
                # 60 random picks over 4 pods miss one with p ~ 1e-7 (20 picks: 1.3 %)
                batch = http_batch(pod.ns, vip, 80, n=60)
                assert batch.ok_count == 60, (pod.name, vip, batch.errors)
                assert set(batch.names) == everyone, (pod.name, vip)
            # endpoints see the pod's own IPv6 address (no masquerade in-cluster), except the
            # pod itself, reached through hairpin masquerade (from its node's gateway address)
            clients = set(http_batch(pod.ns, vip6, 80, n=10).clients)
            assert clients <= {pod.ip6, pod.node.gateway6}, clients
        node6 = lab.nodes[0].ip6
        assert node6 is not None
        batch = http_batch(lab.client.ns, node6, 30166, n=60)
        assert batch.ok_count == 60 and set(batch.names) == everyone, batch.errors
        assert vip6 in agents[0].save(binary="ip6tables-save")


# -- /healthz, /livez, /metrics ------------------------------------------------------------------


def rfc3339(text: Any) -> datetime:
    assert isinstance(text, str) and text.endswith("Z"), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def sample(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in a Prometheus text exposition (labels as written, e.g.
    'table="nat"'), or None when absent."""
    pattern = (
        "^" + re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)$"
    )
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else None


def health(agent: Agent, path: str) -> tuple[int, dict[str, Any]]:
    return http_json(agent.node.ns, *HEALTHZ, path=path)


def test_healthz_livez_and_node_deletion(served: tuple[Lab, FakeApiServer, str]) -> None:
    lab, api, kubeconfig = served
    agents = start_agents(lab, kubeconfig)
    for agent in agents:
        status, body = health(agent, "/healthz")
        assert status == 200, body
        assert set(body) == {"lastUpdated", "currentTime", "nodeEligible"}
        assert body["nodeEligible"] is True
        now = datetime.now(UTC)
        assert abs(rfc3339(body["currentTime"]) - now) < timedelta(seconds=5)
        assert rfc3339(body["lastUpdated"]) <= rfc3339(body["currentTime"])
        status, body = health(agent, "/livez")
        assert status == 200, body
        assert set(body) == {"lastUpdated", "currentTime"}

    # node2 is being deleted: its /healthz fails (load balancers drain it), /livez does not;
    # node1 is unaffected
    api.upsert(node_obj(lab.nodes[1], deleting=True))

    def draining() -> None:
        status, body = health(agents[1], "/healthz")
        assert (status, body.get("nodeEligible")) == (503, False), (status, body)

    eventually(draining, timeout=5.0, step=0.1)
    assert health(agents[1], "/livez")[0] == 200
    status, body = health(agents[0], "/healthz")
    assert (status, body["nodeEligible"]) == (200, True)


def test_metrics_mirror_kube_proxy(served: tuple[Lab, FakeApiServer, str]) -> None:
    lab, api, kubeconfig = served
    api.upsert(make_service_obj("default", "web", clusterIP="10.96.20.80"))
    api.upsert(make_slice_obj("default", "web-x1", "web", [endpoint(p) for p in lab.pods]))
    agents = start_agents(lab, kubeconfig)
    agent = agents[0]

    text = agent.metrics()
    for name in (
        "kproxy_sync_proxy_rules_duration_seconds",
        "kproxy_sync_full_proxy_rules_duration_seconds",
        "kproxy_sync_partial_proxy_rules_duration_seconds",
        "kproxy_network_programming_duration_seconds",
        "kproxy_sync_proxy_rules_last_timestamp_seconds",
        "kproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kproxy_sync_proxy_rules_endpoint_changes_pending",
        "kproxy_sync_proxy_rules_endpoint_changes_total",
        "kproxy_sync_proxy_rules_service_changes_pending",
        "kproxy_sync_proxy_rules_service_changes_total",
        "kproxy_sync_proxy_rules_iptables_restore_failures_total",
        "kproxy_sync_proxy_rules_iptables_total",
        "kproxy_conntrack_reconciler_deleted_entries_total",
    ):
        assert re.search(rf"^# TYPE {name} ", text, re.MULTILINE), f"{name} missing:\n{text}"
    assert (sample(text, "kproxy_sync_full_proxy_rules_duration_seconds_count") or 0) >= 1
    last = sample(text, "kproxy_sync_proxy_rules_last_timestamp_seconds")
    assert last is not None and abs(last - time.time()) < 60
    assert (sample(text, "kproxy_sync_proxy_rules_iptables_total", 'table="nat"') or 0) > 0
    assert sample(text, "kproxy_sync_proxy_rules_iptables_restore_failures_total") == 0

    # An endpoint change stamped with its trigger time: a partial sync, and the network
    # programming latency measured from that stamp.
    trigger = datetime.now(UTC) - timedelta(seconds=1)
    stamp = trigger.strftime("%Y-%m-%dT%H:%M:%SZ")
    api.upsert(
        make_slice_obj(
            "default",
            "web-x1",
            "web",
            [endpoint(p) for p in lab.pods[:3]],
            annotations={TRIGGER_TIME: stamp},
        )
    )

    def programmed() -> str:
        text = agent.metrics()
        assert (sample(text, "kproxy_network_programming_duration_seconds_count") or 0) >= 1
        return text

    text = eventually(programmed, timeout=5.0, step=0.2)
    assert (sample(text, "kproxy_sync_partial_proxy_rules_duration_seconds_count") or 0) >= 1
    latency = sample(text, "kproxy_network_programming_duration_seconds_sum") or 0
    assert 1.0 <= latency < 30.0  # at least the second between the stamp and the upsert
    assert (sample(text, "kproxy_sync_proxy_rules_service_changes_total") or 0) >= 1


def test_metrics_count_endpoint_changes_and_services_without_local_endpoints(
    served: tuple[Lab, FakeApiServer, str],
) -> None:
    lab, api, kubeconfig = served
    near = make_service_obj(
        "default", "near", clusterIP="10.96.20.81", internalTrafficPolicy="Local"
    )
    api.upsert(near)
    api.upsert(make_slice_obj("default", "near-x1", "near", [endpoint(lab.pods_on(1)[0])]))
    agent = start_agents(lab, kubeconfig)[0]
    problems = []
    # node1 has no local endpoint of an internalTrafficPolicy Local service (kube-proxy's
    # serviceNoLocalEndpointsTotalInternal)
    text = agent.metrics()
    internal = 'traffic_policy="internal"'
    got = sample(text, "kproxy_sync_proxy_rules_no_local_endpoints_total", internal)
    if got != 1:
        problems.append(f"no_local_endpoints_total{{{internal}}} is {got}, want 1")

    api.upsert(make_slice_obj("default", "near-x1", "near", [endpoint(p) for p in lab.pods]))
    eventually(lambda: http_batch(lab.pods_on(0)[0].ns, "10.96.20.81", 80, n=1).ok_count == 1)
    text = agent.metrics()
    got = sample(text, "kproxy_sync_proxy_rules_no_local_endpoints_total", internal)
    if got != 0:
        problems.append(f"no_local_endpoints_total{{{internal}}} is {got} after the change, want 0")
    changes = sample(text, "kproxy_sync_proxy_rules_endpoint_changes_total") or 0
    if changes < 1:
        problems.append(f"endpoint_changes_total is {changes} after an EndpointSlice change")
    assert not problems, problems


# -- partial syncs -------------------------------------------------------------------------------


def counters(agent: Agent, chain: str) -> list[int]:
    """Packet counters of the rules of one nat chain (iptables-save -c)."""
    text = agent.lab.run(agent.node.ns, ["iptables-save", "-c", "-t", "nat"]).stdout
    out = []
    for line in text.splitlines():
        found = re.match(r"\[(\d+):\d+\] -A (\S+) ", line)
        if found and found.group(2) == chain:
            out.append(int(found.group(1)))
    assert out, f"no rules in {chain}:\n{text}"
    return out


def test_partial_sync_rewrites_only_the_changed_service(
    served: tuple[Lab, FakeApiServer, str],
) -> None:
    lab, api, kubeconfig = served
    vips = {"alpha": "10.96.20.10", "beta": "10.96.20.20"}
    for name, vip in vips.items():
        api.upsert(make_service_obj("default", name, clusterIP=vip))
        eps = [endpoint(p) for p in lab.pods]
        api.upsert(make_slice_obj("default", f"{name}-x1", name, eps))
    # no periodic full sync during the test: it would rewrite every chain
    agents = start_agents(lab, kubeconfig, extra=["--iptables-sync-period", "600s"])
    agent = agents[0]
    pod = lab.pods_on(0)[0].ns
    for vip in vips.values():
        assert http_batch(pod, vip, 80, n=10).ok_count == 10
    alpha, beta = svc_chain("default/alpha:http", "TCP"), svc_chain("default/beta:http", "TCP")
    beta_before = counters(agent, beta)
    assert sum(beta_before) == 10 and sum(counters(agent, alpha)) == 10
    before = len(syncs(agent))

    # one endpoint of alpha goes away
    api.upsert(make_slice_obj("default", "alpha-x1", "alpha", [endpoint(p) for p in lab.pods[:3]]))
    eventually(lambda: len(syncs(agent)) > before, step=0.1)
    # one sync, partial, for the one service that changed
    assert syncs(agent)[before:] == [(False, 1, 1)], agent.log()
    # alpha's chain was rewritten (its counters restarted at zero) ...
    assert sum(counters(agent, alpha)) == 0
    # ... beta's was not: same rules, same counters, and beta still works
    assert counters(agent, beta) == beta_before
    assert http_batch(pod, vips["beta"], 80, n=4).ok_count == 4
    assert sum(counters(agent, beta)) == 14
