"""iptables and nftables modes end to end: the real `kproxy run` in a node namespace, a fake
apiserver, real traffic from pods and an outside client (issue: Services reachable through kernel
NAT rules; nftables mode). Every test runs in both modes (the parameter of the `web` and `web_lab`
fixtures)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.lab.netlab import Lab
from kproxy.lab.nsexec import module_argv
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_batch, http_get, start_hold, start_stream, udp_query
from kproxy.render.chains import svc_chain
from tests.support.agent import Agent, eventually, serve_cluster_api
from tests.support.fakeapi import FakeApiServer
from tests.support.lab import require_netns
from tests.support.objects import (
    WEB_EXT_IP,
    WEB_LB_IP,
    WEB_VIP,
    make_service_obj,
    make_slice_obj,
    web_service,
    web_slice,
)

pytestmark = [pytest.mark.netns]

VIP, LB_IP, EXT_IP = WEB_VIP, WEB_LB_IP, WEB_EXT_IP


def start_web(lab: Lab, api: FakeApiServer, kubeconfig: str, mode: str, *extra: str) -> Agent:
    """Pods serving HTTP on 80 and UDP on 5353, the `web` service over them, an agent in
    `mode` (with `extra` arguments) on node1 (synced)."""
    serve_pods(lab, tcp=[80], udp=[5353])
    api.upsert(web_service())
    api.upsert(web_slice(lab.pods))
    agent = Agent(lab, lab.nodes[0], kubeconfig, extra=["--proxy-mode", mode, *extra])
    agent.start()
    return agent


@pytest.fixture(params=["iptables", "nftables"])
def web(
    request: pytest.FixtureRequest, lab: Lab, cluster_api: tuple[FakeApiServer, str]
) -> tuple[FakeApiServer, Agent]:
    """`web` for a test that changes the cluster or the agent."""
    api, kubeconfig = cluster_api
    return api, start_web(lab, api, kubeconfig, request.param)


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def web_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """`web` in a lab of its own, shared by the tests that only send traffic (one lab and one
    agent per mode, not one per test)."""
    require_netns()
    with Lab.create(nodes=1, pods_per_node=3) as lab, serve_cluster_api(lab) as (api, kubeconfig):
        start_web(lab, api, kubeconfig, request.param)
        yield lab


def names(batch: Any) -> set[str]:
    return set(batch.names)


def test_clusterip_spreads_over_all_ready_pods(web_lab: Lab) -> None:
    batch = http_batch(web_lab.pods[0].ns, VIP, 80, n=40)
    assert batch.ok_count == 40
    assert names(batch) == {p.name for p in web_lab.pods}


def test_udp_clusterip_reaches_target_port(web_lab: Lab) -> None:
    replies = udp_query(web_lab.pods[0].ns, VIP, 53, n=1)
    assert replies.results[0].ok and replies.results[0].name in {p.name for p in web_lab.pods}


@pytest.mark.parametrize(
    ("target", "port"),
    [("node", 30080), (LB_IP, 80), (EXT_IP, 80)],
    ids=["nodeport", "loadbalancer-ip", "external-ip"],
)
def test_external_addresses_reach_pods_from_client(web_lab: Lab, target: str, port: int) -> None:
    ip = web_lab.nodes[0].ip if target == "node" else target
    batch = http_batch(web_lab.client.ns, ip, port, n=30)
    assert batch.ok_count == 30
    assert names(batch) == {p.name for p in web_lab.pods}
    # off-cluster traffic is masqueraded: pods see the node, not the client
    assert {r.client_ip for r in batch.results} == {web_lab.nodes[0].gateway}


def test_udp_nodeport_from_client(web_lab: Lab) -> None:
    replies = udp_query(web_lab.client.ns, web_lab.nodes[0].ip, 30053, n=1)
    assert replies.results[0].ok


def test_pod_reaches_itself_through_its_service(lab: Lab, web: Any) -> None:
    api, _ = web
    me = lab.pods[1]
    api.upsert(web_slice([me]))
    eventually(lambda: names(http_batch(lab.pods[0].ns, VIP, 80, n=20)) == {me.name})
    batch = http_batch(me.ns, VIP, 80, n=5)
    assert batch.ok_count == 5 and names(batch) == {me.name}
    # hairpin needs masquerade: the pod sees the node's address, not itself
    assert me.ip not in {r.client_ip for r in batch.results}


def test_service_without_endpoints_refuses_at_once(lab: Lab, web: Any) -> None:
    api, agent = web
    api.upsert(make_service_obj("default", "empty", clusterIP="10.96.0.99"))
    api.upsert(make_slice_obj("default", "empty-x1", "empty", []))
    eventually(lambda: "default/empty:http" in agent.ruleset())
    res = http_get(lab.pods[0].ns, "10.96.0.99", 80, timeout=3.0)
    assert not res.ok and res.error_kind == "refused"
    assert res.elapsed < 1.0


def test_removed_endpoint_gets_no_traffic_within_a_second(lab: Lab, web: Any) -> None:
    api, _ = web
    gone = lab.pods[2]
    api.upsert(web_slice(lab.pods[:2]))
    time.sleep(1.0)
    batch = http_batch(lab.pods[0].ns, VIP, 80, n=30)
    assert batch.ok_count == 30
    assert gone.name not in names(batch)


def test_deleted_service_leaves_no_chains(lab: Lab, web: Any) -> None:
    api, agent = web
    chain = svc_chain("default/web:http", "TCP") if agent.mode == "iptables" else "default/web/"
    assert chain in agent.ruleset()
    assert VIP in agent.ruleset()
    api.delete("Service", "default", "web")
    eventually(lambda: chain not in agent.ruleset() and "default/web" not in agent.ruleset())
    assert VIP not in agent.ruleset()


def test_restart_loses_no_request_and_keeps_connections(lab: Lab, web: Any) -> None:
    _, agent = web
    stream = start_stream(lab.client.ns, lab.nodes[0].ip, 30080, duration=4.0, interval=0.02)
    hold = start_hold(lab.client.ns, lab.nodes[0].ip, 30080, duration=4.0, interval=0.1)
    stream.wait_started()
    hold.wait_started()
    time.sleep(0.5)
    agent.restart()
    result = stream.result()
    held = hold.result()
    assert result.ok_count > 50
    assert result.failures == 0, result.errors
    assert held.ok, held.error
    assert len(held.names) == 1  # one connection, one pod, all along


def test_stop_leaves_rules_and_cleanup_removes_everything(lab: Lab, web: Any) -> None:
    _, agent = web
    agent.stop()
    # stopped: the rules stay, traffic still flows
    assert http_batch(lab.client.ns, lab.nodes[0].ip, 30080, n=3).ok_count == 3
    out = lab.run(lab.nodes[0].ns, module_argv("kproxy", "cleanup"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for table in ("nat", "filter", "mangle"):
        assert not re.search(r"KUBE-", agent.save(table)), agent.save(table)
    tables = lab.run(lab.nodes[0].ns, ["nft", "list", "tables"], capture_output=True, text=True)
    assert "kube-proxy" not in tables.stdout


def test_bad_input_is_skipped_and_logged(lab: Lab, web: Any) -> None:
    api, agent = web
    bad_ip = make_service_obj("default", "bad-ip", clusterIP="10.96.0.300")
    bad_port = make_service_obj(
        "default", "bad-port", clusterIP="10.96.0.91", ports=[{"name": "x", "port": 99999}]
    )
    api.upsert(bad_ip)
    api.upsert(bad_port)
    api.upsert(make_service_obj("default", "ok", clusterIP="10.96.0.92"))
    api.upsert(make_slice_obj("default", "ok-1", "ok", [lab.pods[0].ip, "10.244.1.999"]))
    ok = eventually(lambda: http_get(lab.pods[1].ns, "10.96.0.92", 80).ok, timeout=5.0)
    assert ok is None or ok
    assert http_get(lab.pods[1].ns, "10.96.0.92", 80).name == lab.pods[0].name
    assert http_batch(lab.pods[1].ns, VIP, 80, n=5).ok_count == 5
    log = agent.log()
    assert "default/bad-ip" in log and "default/bad-port" in log and "default/ok-1" in log
    assert agent.proc is not None and agent.proc.poll() is None


def test_outside_flush_of_a_service_chain_is_repaired_by_the_periodic_check(
    lab: Lab, cluster_api: tuple[FakeApiServer, str]
) -> None:
    api, kubeconfig = cluster_api
    agent = start_web(lab, api, kubeconfig, "iptables", "--iptables-sync-period", "1s")
    assert http_batch(lab.pods[0].ns, VIP, 80, n=5).ok_count == 5
    chain = svc_chain("default/web:http", "TCP")
    lab.run(lab.nodes[0].ns, ["iptables", "-w", "5", "-t", "nat", "-F", chain], check=True)
    # the periodic (partial) sync's check finds the flushed chain and rewrites everything
    eventually(lambda: "full sync (tampered)" in agent.log(), timeout=10.0)
    assert re.search(rf"^-A {chain} ", agent.save(), re.M)
    batch = http_batch(lab.pods[0].ns, VIP, 80, n=20)
    assert batch.ok_count == 20, agent.log()
    metrics = agent.metrics()
    assert re.search(r"^kproxy_sync_proxy_rules_drift_detected_total [1-9]", metrics, re.M)
    assert re.search(
        r'^kproxy_sync_full_proxy_rules_total\{reason="tampered"\} [1-9]', metrics, re.M
    )
    # the next periodic check finds the repaired tables intact: a partial sync that writes nothing
    eventually(
        lambda: bool(
            re.search(
                r'^kproxy_sync_partial_proxy_rules_total\{reason="periodic"\} [1-9]',
                agent.metrics(),
                re.M,
            )
        ),
        timeout=10.0,
    )
    # the checks before the flush and after the repair found nothing: no other full sync
    assert agent.log().count("synced all rules") == 2, agent.log()
