"""userspace mode end to end: the real `kproxy run --proxy-mode userspace` in a node namespace, a
fake apiserver, real TCP/UDP traffic from pods and an outside client through kproxy's own proxy
(issue 14: kube-proxy's first dataplane)."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kproxy.lab.netlab import Lab
from kproxy.lab.nsexec import module_argv
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_batch, http_get, start_hold, udp_query
from tests.support.agent import Agent, eventually, serve_cluster_api
from tests.support.fakeapi import FakeApiServer
from tests.support.lab import require_netns
from tests.support.objects import (
    WEB_EXT_IP,
    WEB_LB_IP,
    WEB_SLICE_PORTS,
    WEB_VIP,
    make_service_obj,
    make_slice_obj,
    web_service,
    web_slice,
)

pytestmark = [pytest.mark.netns]

VIP, LB_IP, EXT_IP = WEB_VIP, WEB_LB_IP, WEB_EXT_IP


def userspace_agent(lab: Lab, kubeconfig: str, *extra: str) -> Agent:
    agent = Agent(lab, lab.nodes[0], kubeconfig, extra=["--proxy-mode", "userspace", *extra])
    agent.start()
    return agent


def start_web(lab: Lab, api: FakeApiServer, kubeconfig: str, *extra: str) -> Agent:
    """Pods serving HTTP on 80 and UDP on 5353, the `web` service over them, a userspace agent
    (with `extra` arguments) on node1 (synced)."""
    serve_pods(lab, tcp=[80], udp=[5353])
    api.upsert(web_service())
    api.upsert(web_slice(lab.pods))
    return userspace_agent(lab, kubeconfig, *extra)


@pytest.fixture
def web(lab: Lab, cluster_api: tuple[FakeApiServer, str]) -> tuple[FakeApiServer, Agent]:
    """`web` for a test that changes the cluster, the rules or the agent."""
    api, kubeconfig = cluster_api
    return api, start_web(lab, api, kubeconfig)


@pytest.fixture(scope="module")
def web_lab() -> Iterator[tuple[Lab, Agent]]:
    """`web` in a lab of its own, shared by the tests that only send traffic and read the
    agent's reports (one lab and one agent for all of them, not one per test). Round robin
    carries over between them: they assert whole turns, not where a turn starts."""
    require_netns()
    with Lab.create(nodes=1, pods_per_node=3) as lab, serve_cluster_api(lab) as (api, kubeconfig):
        yield lab, start_web(lab, api, kubeconfig)


def listeners(agent: Agent) -> list[dict[str, Any]]:
    """The agent's /userspace report (its listeners, endpoints, next endpoint, counters)."""
    res = http_get(agent.node.ns, "127.0.0.1", 10249, timeout=2.0, path="/userspace")
    assert res.ok, res.error
    rows: list[dict[str, Any]] = json.loads(res.body)
    return rows


def listener(agent: Agent, service: str, scope: str = "internal") -> dict[str, Any]:
    return next(r for r in listeners(agent) if r["service"] == service and r["scope"] == scope)


def test_clusterip_round_robin_from_a_pod(web_lab: tuple[Lab, Agent]) -> None:
    lab, _ = web_lab
    batch = http_batch(lab.pods[0].ns, VIP, 80, n=30)
    assert batch.ok_count == 30
    # round robin, not random: every pod exactly once per turn
    assert batch.names == Counter({p.name: 10 for p in lab.pods})
    names = [r.name for r in batch.results]
    assert names[:3] == names[3:6] and len(set(names[:3])) == 3
    # the proxy connects from the node: pods see the node's address
    assert lab.pods[0].ip not in batch.clients


@pytest.mark.parametrize(
    ("target", "port"),
    [("node", 30080), (LB_IP, 80), (EXT_IP, 80)],
    ids=["nodeport", "loadbalancer-ip", "external-ip"],
)
def test_external_addresses_round_robin_from_the_client(
    web_lab: tuple[Lab, Agent], target: str, port: int
) -> None:
    lab, _ = web_lab
    ip = lab.nodes[0].ip if target == "node" else target
    batch = http_batch(lab.client.ns, ip, port, n=30)
    assert batch.ok_count == 30
    assert batch.names == Counter({p.name: 10 for p in lab.pods})


def test_the_node_itself_reaches_clusterip_and_nodeport(web_lab: tuple[Lab, Agent]) -> None:
    lab, _ = web_lab
    node = lab.nodes[0]
    assert http_batch(node.ns, VIP, 80, n=6).names == Counter({p.name: 2 for p in lab.pods})
    assert http_batch(node.ns, node.ip, 30080, n=3).ok_count == 3


def test_udp_request_and_response(web_lab: tuple[Lab, Agent]) -> None:
    lab, _ = web_lab
    pods = {p.name for p in lab.pods}
    replies = udp_query(lab.pods[0].ns, VIP, 53, n=3)
    # the probe's socket is connected to the VIP: a reply from any other address is dropped
    assert replies.all_ok and set(replies.names) <= pods
    from_client = udp_query(lab.client.ns, lab.nodes[0].ip, 30053, n=2)
    assert from_client.all_ok and set(from_client.names) <= pods


def test_udp_session_keeps_its_endpoint_until_idle(
    lab: Lab, cluster_api: tuple[FakeApiServer, str]
) -> None:
    api, kubeconfig = cluster_api
    # a long idle timeout, so a slow (loaded) machine cannot end the session between datagrams
    agent = start_web(lab, api, kubeconfig, "--udp-timeout", "10s")
    replies = udp_query(lab.pods[0].ns, VIP, 53, n=6, interval=0.1)
    assert replies.all_ok and len(set(replies.names)) == 1  # one socket, one session
    stats = listener(agent, "default/web:dns")["stats"]
    assert stats["accepted"] == 1 and stats["active"] == 1


def test_udp_sessions_of_different_clients_rotate(web_lab: tuple[Lab, Agent]) -> None:
    lab, _ = web_lab
    names = [udp_query(lab.pods[0].ns, VIP, 53).results[0].name for _ in range(3)]
    assert sorted(n or "" for n in names) == sorted(p.name for p in lab.pods)


def test_client_ip_affinity_holds(lab: Lab, cluster_api: tuple[FakeApiServer, str]) -> None:
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80], udp=[5353])
    api.upsert(
        web_service(
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        )
    )
    api.upsert(web_slice(lab.pods))
    agent = userspace_agent(lab, kubeconfig)
    first = http_batch(lab.pods[0].ns, VIP, 80, n=20)
    assert first.ok_count == 20 and len(first.names) == 1
    second = http_batch(lab.pods[1].ns, VIP, 80, n=20)
    assert second.ok_count == 20 and len(second.names) == 1
    assert set(first.names) != set(second.names)  # another client, the next pod in turn
    pinned = listener(agent, "default/web:http")["affinity"]
    assert set(pinned) == {lab.pods[0].ip, lab.pods[1].ip}
    by_name = {p.name: f"{p.ip}:80" for p in lab.pods}
    assert pinned[lab.pods[0].ip]["endpoint"] == by_name[next(iter(first.names))]
    # from outside: the NodePort listener pins the client too
    outside = http_batch(lab.client.ns, lab.nodes[0].ip, 30080, n=10)
    assert outside.ok_count == 10 and len(outside.names) == 1


def test_a_refusing_endpoint_is_skipped(lab: Lab, cluster_api: tuple[FakeApiServer, str]) -> None:
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80], udp=[5353])
    api.upsert(web_service())
    api.upsert(web_slice(lab.pods[:2]))
    # pod 3 is in the service on port 81, where nothing listens: it refuses every connection
    api.upsert(web_slice([lab.pods[2]], name="web-refuse", ports=[("http", 81, "TCP")]))
    agent = userspace_agent(lab, kubeconfig)
    eventually(lambda: len(listener(agent, "default/web:http")["endpoints"]) == 3)
    batch = http_batch(lab.pods[0].ns, VIP, 80, n=30)
    assert batch.ok_count == 30, batch.errors
    assert set(batch.names) == {lab.pods[0].name, lab.pods[1].name}
    stats = listener(agent, "default/web:http")["stats"]
    assert stats["connect_failures"] >= 10 and stats["retries"] >= 10


def test_endpoint_removal_keeps_established_connection(lab: Lab, web: Any) -> None:
    api, agent = web
    hold = start_hold(lab.pods[0].ns, VIP, 80, duration=6.0, interval=0.1)
    hold.wait_started()
    time.sleep(0.3)
    # find which pod the held connection talks to, then remove that pod from the service
    served = next(
        name
        for name, n in listener(agent, "default/web:http")["stats"]["per_endpoint"].items()
        if n
    )
    victim = next(p for p in lab.pods if f"{p.ip}:80" == served)
    api.upsert(web_slice([p for p in lab.pods if p is not victim]))
    eventually(lambda: served not in listener(agent, "default/web:http")["endpoints"])
    removed_at = time.monotonic()
    after = http_batch(lab.pods[1].ns, VIP, 80, n=10)
    assert after.ok_count == 10 and victim.name not in after.names
    held = hold.result()
    assert held.ok, held.error
    assert set(held.names) == {victim.name}  # the same connection, the same pod, to the end
    # and it kept exchanging after the endpoint had left the proxy's list
    assert sum(r.t > removed_at for r in held.exchanges) >= 5


def test_service_without_endpoints_refuses_at_once(lab: Lab, web: Any) -> None:
    api, agent = web
    api.upsert(make_service_obj("default", "empty", clusterIP="10.96.0.99"))
    api.upsert(make_slice_obj("default", "empty-x1", "empty", []))
    eventually(lambda: "10.96.0.99/32" in agent.save())
    res = http_get(lab.pods[0].ns, "10.96.0.99", 80, timeout=3.0)
    assert not res.ok and res.error_kind == "refused"
    assert res.elapsed < 1.0
    # and when the endpoints go away from a live service
    api.upsert(web_slice([]))
    eventually(lambda: not listener(agent, "default/web:http")["listening"])
    res = http_get(lab.pods[0].ns, VIP, 80, timeout=3.0)
    assert not res.ok and res.error_kind == "refused"
    # they come back on the same proxy port
    port = listener(agent, "default/web:http")["proxy_port"]
    api.upsert(web_slice(lab.pods))
    eventually(lambda: http_get(lab.pods[0].ns, VIP, 80).ok)
    assert listener(agent, "default/web:http")["proxy_port"] == port


def _proxy_ports(agent: Agent) -> set[str]:
    return set(re.findall(r"--to-ports (\d+)", agent.save()))


def test_restart_ends_proxied_connections_and_serves_new_ones_at_once(lab: Lab, web: Any) -> None:
    _, agent = web
    ports = _proxy_ports(agent)
    hold = start_hold(lab.pods[0].ns, VIP, 80, duration=10.0, interval=0.1)
    hold.wait_started()
    time.sleep(0.3)
    agent.stop()
    # a userspace proxy holds both sockets of every connection: they end with the process
    held = hold.result()
    assert not held.ok and held.exchanges
    # while no kproxy runs, the rules stay and send clients to a closed port: refused
    gone = http_get(lab.pods[0].ns, VIP, 80, timeout=2.0)
    assert not gone.ok and gone.error_kind == "refused"
    agent.start()  # returns once the new process has synced
    batch = http_batch(lab.pods[0].ns, VIP, 80, n=6)
    assert batch.ok_count == 6  # no retry, no wait
    assert _proxy_ports(agent) == ports  # the rules in place were adopted, not rewritten


def test_cleanup_removes_the_userspace_rules(lab: Lab, web: Any) -> None:
    _, agent = web
    assert "KUBE-PORTALS-CONTAINER" in agent.save()
    agent.stop()
    out = lab.run(lab.nodes[0].ns, module_argv("kproxy", "cleanup"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for table in ("nat", "filter"):
        assert "KUBE-" not in agent.save(table), agent.save(table)


def _kproxy_json(lab: Lab, *args: str) -> tuple[int, dict[str, Any]]:
    out = lab.run(
        lab.nodes[0].ns,
        module_argv("kproxy", *args, "-o", "json"),
        capture_output=True,
        check=False,
    )
    return out.returncode, json.loads(out.stdout)


def test_status_shows_ports_endpoints_and_the_next_one(web_lab: tuple[Lab, Agent]) -> None:
    lab, agent = web_lab
    rc, doc = _kproxy_json(lab, "status")
    assert rc == 0, json.dumps(doc)[:1500]
    assert doc["mode"] == "userspace" and not doc["stale_rules"]
    rows = {(r["service"], r["scope"]): r for r in doc["listeners"]}
    http = rows[("default/web:http", "internal")]
    assert http["ok"] and http["listening"]
    assert {f"--to-ports {http['proxy_port']}"} <= {
        m.group(0) for m in re.finditer(r"--to-ports \d+", agent.save())
    }
    assert sorted(http["endpoints"]) == sorted(f"{p.ip}:80" for p in lab.pods)
    # the endpoint status names as next is the one the next connection gets
    by_ip = {p.ip: p.name for p in lab.pods}
    for _ in range(3):
        expected = by_ip[listener(agent, "default/web:http")["next"].split(":")[0]]
        assert http_get(lab.pods[0].ns, VIP, 80).name == expected
    assert rows[("default/web:http", "external")]["addresses"] == [
        f"{EXT_IP}:80 (external)",
        f"{LB_IP}:80 (external)",
        "*:30080 (nodeport)",
    ]


def test_status_flags_a_redirect_to_the_wrong_port(lab: Lab, web: Any) -> None:
    _, agent = web
    port = listener(agent, "default/web:http")["proxy_port"]
    saved = agent.save()
    chain = [ln for ln in saved.splitlines() if ln.startswith("-A KUBE-PORTALS-CONTAINER ")]
    index, line = next((i, ln) for i, ln in enumerate(chain, 1) if "-d 10.96.0.80/32 -p tcp" in ln)
    broken = line.replace(f"--to-ports {port}", f"--to-ports {port + 1}")
    lab.run(
        lab.nodes[0].ns,
        ["iptables", "-t", "nat", "-R", "KUBE-PORTALS-CONTAINER", str(index), *broken.split()[2:]],
    )
    rc, doc = _kproxy_json(lab, "status")
    assert rc == 1
    bad = [r for r in doc["listeners"] if not r["ok"]]
    assert [r["service"] for r in bad] == ["default/web:http"]
    assert "redirected to" in " ".join(bad[0]["problems"])


def test_explain_names_the_proxy_port_and_the_next_endpoint(web_lab: tuple[Lab, Agent]) -> None:
    lab, agent = web_lab
    src = lab.pods[0].ip
    rc, doc = _kproxy_json(lab, "explain", f"{VIP}:80/tcp", "--from", src)
    assert rc == 0
    assert doc["rule"]["proxy_port"] == listener(agent, "default/web:http")["proxy_port"]
    assert doc["hook"] == "PREROUTING"
    nxt = doc["next"]
    got = http_get(lab.pods[0].ns, VIP, 80)
    assert got.ok and f"{lab.pod(got.name or '').ip}:80" == nxt
    rc, doc = _kproxy_json(lab, "explain", f"{lab.nodes[0].ip}:30080/tcp", "--from", "192.0.2.1")
    assert doc["rule"]["kind"] == "nodeport"
    assert doc["listener"]["scope"] == "external"
    rc, doc = _kproxy_json(lab, "explain", "10.96.0.200:80/tcp", "--from", src)
    assert doc["rule"] is None


def test_ipv6_clusterip_nodeport_and_udp(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=1, pods_per_node=2, ipv6=True)
    serve_pods(lab, tcp=[80], udp=[5353])
    vip4, vip6 = "10.96.20.67", "fd00:96::67"
    svc = make_service_obj(
        "default",
        "dual",
        type="NodePort",
        clusterIP=vip4,
        clusterIPs=[vip4, vip6],
        ipFamilies=["IPv4", "IPv6"],
        ipFamilyPolicy="RequireDualStack",
        ports=[
            {"name": "http", "port": 80, "targetPort": 80, "nodePort": 30167},
            {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30168},
        ],
    )
    pods = lab.pods
    v6 = [{"ip": p.ip6, "node": p.node.name, "pod": p.name} for p in pods]
    v4 = [{"ip": p.ip, "node": p.node.name, "pod": p.name} for p in pods]
    with serve_cluster_api(lab) as (api, kubeconfig):
        api.upsert(svc)
        api.upsert(make_slice_obj("default", "dual-v4", "dual", v4, WEB_SLICE_PORTS))
        api.upsert(make_slice_obj("default", "dual-v6", "dual", v6, WEB_SLICE_PORTS))
        agent = Agent(
            lab,
            lab.nodes[0],
            kubeconfig,
            extra=["--proxy-mode", "userspace", "--cluster-cidr", "10.244.0.0/16,fd00:10:244::/48"],
        )
        agent.start()
        batch = http_batch(pods[0].ns, vip6, 80, n=10)
        assert batch.names == Counter({p.name: 5 for p in pods}), batch.errors
        assert http_batch(pods[0].ns, vip4, 80, n=4).names == Counter({p.name: 2 for p in pods})
        node6 = lab.nodes[0].ip6
        assert node6 is not None
        assert http_batch(lab.client.ns, node6, 30167, n=4).ok_count == 4
        # the reply must come from the VIP (the probe's socket is connected to it)
        replies = udp_query(pods[0].ns, vip6, 53, n=2)
        assert replies.all_ok, replies.errors
        assert "REDIRECT" in agent.save(binary="ip6tables-save")


def test_local_policy_outside_clients_local_endpoints_pods_short_circuit(
    lab: Lab, cluster_api: tuple[FakeApiServer, str]
) -> None:
    api, kubeconfig = cluster_api
    serve_pods(lab, tcp=[80], udp=[5353])
    api.upsert(web_service(externalTrafficPolicy="Local"))
    here, there = lab.pods[:2], lab.pods[2]
    endpoints = [{"ip": p.ip, "node": p.node.name, "pod": p.name} for p in here]
    endpoints.append({"ip": there.ip, "node": "another-node", "pod": there.name})
    api.upsert(make_slice_obj("default", "web-abc12", "web", endpoints, WEB_SLICE_PORTS))
    agent = userspace_agent(lab, kubeconfig)
    node = lab.nodes[0].ip
    outside = http_batch(lab.client.ns, node, 30080, n=20)
    assert outside.names == Counter({p.name: 10 for p in here})  # only this node's endpoints
    # pods reaching the NodePort are short-circuited to every endpoint, as kube-proxy does
    inside = http_batch(lab.pods[0].ns, node, 30080, n=30)
    assert inside.names == Counter({p.name: 10 for p in lab.pods})
    ext = listener(agent, "default/web:http", "external")
    assert sorted(ext["short_circuit"]) == sorted(f"{p.ip}:80" for p in lab.pods)


def test_outside_flush_of_the_portals_is_repaired_by_the_periodic_check(
    lab: Lab, cluster_api: tuple[FakeApiServer, str]
) -> None:
    api, kubeconfig = cluster_api
    agent = start_web(lab, api, kubeconfig, "--iptables-sync-period", "1s")
    assert http_batch(lab.pods[0].ns, VIP, 80, n=3).ok_count == 3
    lab.run(lab.nodes[0].ns, ["iptables", "-w", "5", "-t", "nat", "-F", "KUBE-PORTALS-CONTAINER"])
    eventually(lambda: "full sync (tampered)" in agent.log(), timeout=10.0)
    assert "-A KUBE-PORTALS-CONTAINER -d 10.96.0.80/32" in agent.save()
    assert http_batch(lab.pods[0].ns, VIP, 80, n=6).ok_count == 6
