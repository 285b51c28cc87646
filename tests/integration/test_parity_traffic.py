"""kube-proxy parity with real traffic across two nodes (issue: iptables mode at kube-proxy
parity): session affinity, traffic policies, the health-check node port, the terminating
fallback, load-balancer source ranges.

Topology (`lab2`): node1 and node2, each running the real `kproxy run` against one fake
apiserver, each with two pods serving HTTP on 80 and UDP on 5353; the client (192.168.50.2) sits
outside the cluster CIDR and routes everything it does not know through node1. Pods answer with
their name and the client address they saw, which tells masquerade from a preserved source.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from kproxy.lab.netlab import CLIENT_IP, Lab, Pod
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import Batch, http_batch, http_get
from tests.support.agent import (
    Agent,
    eventually,
    http_json,
    node_obj,
    start_agents,
    syncs,
)
from tests.support.fakeapi import FakeApiServer
from tests.support.objects import make_service_obj, make_slice_obj

pytestmark = [pytest.mark.netns]

VIP = "10.96.10.80"
LB_IP = "203.0.113.20"
NODE_PORT = 30180
HC_PORT = 32180
OUTSIDE_IP = "192.168.50.3"  # a second client address, outside loadBalancerSourceRanges


@dataclass
class Cluster:
    """Two nodes, their pods serving, a fake apiserver; `start()` runs both agents."""

    lab: Lab
    api: FakeApiServer
    kubeconfig: str
    agents: list[Agent]
    mode: str = "iptables"

    def start(self, *, extra: Sequence[str] = ()) -> list[Agent]:
        extra = ["--proxy-mode", self.mode, *extra]
        self.agents = start_agents(self.lab, self.kubeconfig, extra=extra)
        return self.agents

    def pods(self, node: int) -> list[Pod]:
        return self.lab.pods_on(node)

    def names(self, node: int | None = None) -> set[str]:
        pods = self.lab.pods if node is None else self.pods(node)
        return {p.name for p in pods}

    def node_ip(self, node: int) -> str:
        return self.lab.nodes[node].ip

    def publish(self, service: dict[str, Any], pods: Sequence[Pod | dict[str, Any]]) -> None:
        """Upsert `service` and its one EndpointSlice listing `pods` (or endpoint dicts)."""
        name = service["metadata"]["name"]
        self.api.upsert(service)
        self.api.upsert(slice_of(name, pods))


def endpoint(pod: Pod, **conditions: bool) -> dict[str, Any]:
    return {"ip": pod.ip, "node": pod.node.name, "pod": pod.name, **conditions}


def slice_of(service: str, pods: Sequence[Pod | dict[str, Any]]) -> dict[str, Any]:
    eps = [p if isinstance(p, dict) else endpoint(p) for p in pods]
    return make_slice_obj("default", f"{service}-x1", service, eps, [("http", 80)])


@pytest.fixture(params=["iptables", "nftables"])
def cluster(
    request: pytest.FixtureRequest, lab2: Lab, cluster_api2: tuple[FakeApiServer, str]
) -> Cluster:
    api, kubeconfig = cluster_api2
    serve_pods(lab2, tcp=[80], udp=[5353])
    return Cluster(lab=lab2, api=api, kubeconfig=kubeconfig, agents=[], mode=request.param)


def names(batch: Batch) -> set[str]:
    return set(batch.names)


# -- sessionAffinity: ClientIP -------------------------------------------------------------------


def test_client_ip_affinity_holds_then_expires(cluster: Cluster) -> None:
    timeout = 3
    svc = make_service_obj(
        "default",
        "sticky",
        clusterIP=VIP,
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}},
    )
    pods = cluster.lab.pods
    cluster.publish(svc, pods[:3])
    agent = cluster.start()[0]
    me = cluster.pods(0)[0].ns

    pinned = http_batch(me, VIP, 80, n=30)
    assert pinned.ok_count == 30
    assert len(pinned.names) == 1, pinned.names
    (first,) = pinned.names
    # still pinned after pauses shorter than the timeout (each hit refreshes the entry)
    again = http_batch(me, VIP, 80, n=4, interval=timeout / 3)
    assert set(again.names) == {first}, again.names
    # ... and across an endpoint change that rewrites the service's chains (kube-proxy keeps
    # the affinity: the `recent` lists are named after the endpoint chains, which stay)
    before = len(syncs(agent))
    cluster.api.upsert(slice_of("sticky", pods))
    eventually(lambda: len(syncs(agent)) > before, step=0.05)
    assert set(http_batch(me, VIP, 80, n=10).names) == {first}

    # A second client on the other node is pinned on its own (affinity is per source address).
    other = http_batch(cluster.pods(1)[1].ns, VIP, 80, n=10)
    assert other.ok_count == 10 and len(other.names) == 1, other.names

    # After the timeout the entry has expired and the random choice runs again: within a few
    # rounds (each a 1-in-4 chance to land on the same pod again) another pod answers.
    seen = {first}
    for _ in range(8):
        time.sleep(timeout + 0.5)
        res = http_get(me, VIP, 80)
        assert res.ok, res.error
        assert res.name is not None
        seen.add(res.name)
        if len(seen) > 1:
            break
    assert len(seen) > 1, f"still pinned to {first} after {8 * (timeout + 0.5)} s"
    # ...and the new choice is sticky again
    assert len(http_batch(me, VIP, 80, n=10).names) == 1


# -- externalTrafficPolicy: Local ----------------------------------------------------------------


def local_service(name: str = "edge") -> dict[str, Any]:
    return make_service_obj(
        "default",
        name,
        type="LoadBalancer",
        clusterIP=VIP,
        externalTrafficPolicy="Local",
        healthCheckNodePort=HC_PORT,
        ports=[{"name": "http", "port": 80, "targetPort": 80, "nodePort": NODE_PORT}],
        status={"loadBalancer": {"ingress": [{"ip": LB_IP}]}},
    )


def test_external_policy_local_keeps_client_ip_and_stays_on_the_node(cluster: Cluster) -> None:
    cluster.publish(local_service(), cluster.lab.pods)
    cluster.start()
    client = cluster.lab.client.ns

    for node in (0, 1):
        batch = http_batch(client, cluster.node_ip(node), NODE_PORT, n=20)
        assert batch.ok_count == 20, batch.errors
        assert names(batch) == cluster.names(node)  # only this node's pods
        assert set(batch.clients) == {CLIENT_IP}  # not masqueraded
    # the LoadBalancer IP (routed to node1 by the client) behaves the same
    batch = http_batch(client, LB_IP, 80, n=20)
    assert batch.ok_count == 20 and names(batch) == cluster.names(0)
    assert set(batch.clients) == {CLIENT_IP}

    # Pods are not "external": the cluster IP, and even their node's NodePort, reach all
    # endpoints (kube-proxy short-circuits pod traffic to the cluster-wide chain). A pod dialling
    # ANOTHER node's NodePort is not covered: like kube-proxy (kubernetes#74383), that node DNATs
    # without SNAT and a remote endpoint's reply bypasses it.
    pod = cluster.pods(0)[0]
    for ip, port in ((VIP, 80), (cluster.node_ip(0), NODE_PORT)):
        batch = http_batch(pod.ns, ip, port, n=60)
        assert batch.ok_count == 60, (ip, port, batch.errors)
        assert names(batch) == cluster.names(), (ip, port)
    # so is the node itself: its own NodePort and the LoadBalancer IP reach every endpoint
    node = cluster.lab.nodes[0].ns
    for ip, port in ((cluster.node_ip(0), NODE_PORT), (LB_IP, 80)):
        batch = http_batch(node, ip, port, n=60)
        assert batch.ok_count == 60, (ip, port, batch.errors)
        assert names(batch) == cluster.names(), (ip, port)


def test_external_policy_local_drops_on_a_node_without_local_endpoints(cluster: Cluster) -> None:
    cluster.publish(local_service(), cluster.pods(0))
    cluster.start()
    client = cluster.lab.client.ns

    batch = http_batch(client, cluster.node_ip(0), NODE_PORT, n=24)
    assert batch.ok_count == 24 and names(batch) == cluster.names(0)
    # node2 has no local endpoint: dropped (a timeout), not refused
    res = http_get(client, cluster.node_ip(1), NODE_PORT, timeout=1.5)
    assert not res.ok and res.error_kind == "timeout", res
    # pod traffic on node2 still reaches the endpoints on node1, by cluster IP and NodePort
    pod = cluster.pods(1)[0]
    for ip, port in ((VIP, 80), (cluster.node_ip(1), NODE_PORT)):
        batch = http_batch(pod.ns, ip, port, n=20)
        assert batch.ok_count == 20, (ip, port, batch.errors)
        assert names(batch) == cluster.names(0)

    # a local endpoint appears on node2: its NodePort now answers, from node2's pod only
    cluster.api.upsert(slice_of("edge", [*cluster.pods(0), cluster.pods(1)[0]]))
    eventually(lambda: http_get(client, cluster.node_ip(1), NODE_PORT, timeout=0.5).ok)
    batch = http_batch(client, cluster.node_ip(1), NODE_PORT, n=10)
    assert names(batch) == {cluster.pods(1)[0].name}
    assert set(batch.clients) == {CLIENT_IP}


def health(cluster: Cluster, node: int) -> tuple[int, dict[str, Any]]:
    return http_json(cluster.lab.client.ns, cluster.node_ip(node), HC_PORT, path="/healthz")


def test_health_check_node_port_follows_local_endpoints(cluster: Cluster) -> None:
    cluster.publish(local_service(), cluster.pods(0))
    cluster.start()

    def expect(node: int, status: int, local: int) -> None:
        got_status, body = health(cluster, node)
        assert got_status == status, (node, got_status, body)
        assert body == {
            "service": {"namespace": "default", "name": "edge"},
            "localEndpoints": local,
            "serviceProxyHealthy": True,
        }

    expect(0, 200, 2)
    expect(1, 503, 0)
    # endpoints move from node1 to node2: both checks flip
    cluster.api.upsert(slice_of("edge", cluster.pods(1)[:1]))
    eventually(lambda: expect(1, 200, 1))
    expect(0, 503, 0)
    # a not-ready local endpoint does not count
    cluster.api.upsert(slice_of("edge", [endpoint(cluster.pods(1)[0], ready=False)]))
    eventually(lambda: expect(1, 503, 0))
    # the service stops being eTP Local: the health check port closes
    plain = local_service()
    plain["spec"]["externalTrafficPolicy"] = "Cluster"
    del plain["spec"]["healthCheckNodePort"]
    cluster.api.upsert(plain)
    eventually(lambda: health(cluster, 1)[0] == 0)


# -- internalTrafficPolicy: Local ----------------------------------------------------------------


def test_internal_policy_local(cluster: Cluster) -> None:
    svc = make_service_obj("default", "near", clusterIP=VIP, internalTrafficPolicy="Local")
    cluster.publish(svc, cluster.lab.pods)
    cluster.start()

    for node in (0, 1):
        batch = http_batch(cluster.pods(node)[0].ns, VIP, 80, n=30)
        assert batch.ok_count == 30, batch.errors
        assert names(batch) == cluster.names(node)

    # node2 loses its endpoints: its pods' traffic is dropped; node1's still flows
    cluster.api.upsert(slice_of("near", cluster.pods(0)))
    pod2 = cluster.pods(1)[0].ns
    eventually(lambda: not http_get(pod2, VIP, 80, timeout=0.5).ok)
    res = http_get(pod2, VIP, 80, timeout=1.5)
    assert not res.ok and res.error_kind == "timeout", res
    batch = http_batch(cluster.pods(0)[1].ns, VIP, 80, n=24)
    assert batch.ok_count == 24 and names(batch) == cluster.names(0)


# -- terminating endpoints (KEP-1669) ------------------------------------------------------------


def test_terminating_fallback(cluster: Cluster) -> None:
    pods = cluster.lab.pods
    svc = make_service_obj("default", "drain", clusterIP=VIP)
    # one ready endpoint: the terminating ones get nothing
    cluster.publish(
        svc,
        [endpoint(pods[0])]
        + [endpoint(p, ready=False, serving=True, terminating=True) for p in pods[1:]],
    )
    cluster.start()
    client = pods[-1].ns
    batch = http_batch(client, VIP, 80, n=20)
    assert batch.ok_count == 20 and names(batch) == {pods[0].name}

    # no ready endpoint left: the serving, terminating ones take the traffic
    serving = [endpoint(p, ready=False, serving=True, terminating=True) for p in pods]
    cluster.api.upsert(slice_of("drain", serving))
    eventually(lambda: len(http_batch(client, VIP, 80, n=10).names) > 1)
    batch = http_batch(client, VIP, 80, n=40)
    assert batch.ok_count == 40 and names(batch) == {p.name for p in pods}

    # none serving: REJECT, refused at once from a pod
    gone = [endpoint(p, ready=False, serving=False, terminating=True) for p in pods]
    cluster.api.upsert(slice_of("drain", gone))
    eventually(lambda: http_get(client, VIP, 80, timeout=0.5).error_kind == "refused", step=0.3)
    # The kernel rate-limits ICMP errors per destination (a burst of ~6, then 1/s), so wait
    # for a token before timing the rejection.
    time.sleep(1.0)
    res = http_get(client, VIP, 80, timeout=2.0)
    assert res.error_kind == "refused" and res.elapsed < 1.0, res


def test_local_policy_falls_back_to_local_terminating_endpoints(cluster: Cluster) -> None:
    """Under externalTrafficPolicy Local the fallback is per node: node1's only endpoints are
    terminating (but serving), node2's are ready; node1 keeps serving external traffic with its
    own terminating pods, while its health check already fails so load balancers drain it."""
    draining = [endpoint(p, ready=False, serving=True, terminating=True) for p in cluster.pods(0)]
    cluster.publish(local_service(), [*draining, *cluster.pods(1)])
    cluster.start()
    client = cluster.lab.client.ns

    batch = http_batch(client, cluster.node_ip(0), NODE_PORT, n=20)
    assert batch.ok_count == 20, batch.errors
    assert names(batch) == cluster.names(0) and set(batch.clients) == {CLIENT_IP}
    assert health(cluster, 0)[0] == 503
    assert health(cluster, 1)[0] == 200
    # pod traffic (Cluster policy) goes to the ready endpoints only
    batch = http_batch(cluster.pods(0)[0].ns, VIP, 80, n=20)
    assert batch.ok_count == 20 and names(batch) == cluster.names(1)


# -- topology (trafficDistribution / zone hints) ------------------------------------------------


def zoned(pod: Pod, zone: str, hints: Sequence[str]) -> dict[str, Any]:
    ep: dict[str, Any] = {
        "addresses": [pod.ip],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "nodeName": pod.node.name,
        "zone": zone,
    }
    if hints:
        ep["hints"] = {"forZones": [{"name": z} for z in hints]}
    return ep


def test_topology_hints_keep_traffic_in_the_zone(cluster: Cluster) -> None:
    zones = {0: "zone-a", 1: "zone-b"}
    for index, zone in zones.items():
        cluster.api.upsert(node_obj(cluster.lab.nodes[index], zone=zone))
    svc = make_service_obj("default", "zonal", clusterIP=VIP, trafficDistribution="PreferClose")
    hinted = [zoned(p, zones[n], [zones[n]]) for n in (0, 1) for p in cluster.pods(n)]
    cluster.publish(svc, hinted)
    agents = cluster.start()

    for node in (0, 1):
        batch = http_batch(cluster.pods(node)[0].ns, VIP, 80, n=30)
        assert batch.ok_count == 30 and names(batch) == cluster.names(node), node

    # one ready endpoint without hints: hints are ignored everywhere (kube-proxy's
    # canUseTopology), every node spreads over all endpoints
    before = [len(syncs(a)) for a in agents]
    unhinted = [*hinted[:-1], zoned(cluster.pods(1)[1], zones[1], [])]
    cluster.api.upsert(slice_of("zonal", unhinted))
    eventually(
        lambda: all(len(syncs(a)) > n for a, n in zip(agents, before, strict=True)), step=0.1
    )
    for node in (0, 1):
        batch = http_batch(cluster.pods(node)[0].ns, VIP, 80, n=60)
        assert batch.ok_count == 60 and names(batch) == cluster.names(), node


# -- loadBalancerSourceRanges --------------------------------------------------------------------


def test_load_balancer_source_ranges(cluster: Cluster) -> None:
    lab = cluster.lab
    lab.run(lab.client.ns, ["ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0"])
    proxy_ip = "203.0.113.21"  # an ingress with ipMode Proxy: the load balancer proxies itself
    svc = make_service_obj(
        "default",
        "guarded",
        type="LoadBalancer",
        clusterIP=VIP,
        ports=[{"name": "http", "port": 80, "targetPort": 80, "nodePort": NODE_PORT}],
        loadBalancerSourceRanges=[f"{CLIENT_IP}/32"],
        status={"loadBalancer": {"ingress": [{"ip": LB_IP}, {"ip": proxy_ip, "ipMode": "Proxy"}]}},
    )
    cluster.publish(svc, lab.pods)
    cluster.start()

    # 60 random picks over 4 pods miss one with p ~ 1e-7 (20 picks: 1.3 %)
    inside = http_batch(lab.client.ns, LB_IP, 80, n=60, src_ip=CLIENT_IP)
    assert inside.ok_count == 60 and names(inside) == cluster.names()
    outside = http_get(lab.client.ns, LB_IP, 80, timeout=1.5, src_ip=OUTSIDE_IP)
    assert not outside.ok and outside.error_kind == "timeout", outside
    # the ranges guard the LoadBalancer IP only: the NodePort still serves that source
    nodeport = http_batch(lab.client.ns, cluster.node_ip(0), NODE_PORT, n=5, src_ip=OUTSIDE_IP)
    assert nodeport.ok_count == 5, nodeport.errors
    # an ipMode Proxy ingress gets no rule: nothing on the node answers it
    res = http_get(lab.client.ns, proxy_ip, 80, timeout=1.0, src_ip=CLIENT_IP)
    assert not res.ok, res
    assert proxy_ip not in cluster.agents[0].ruleset()
