"""LoadBalancer addresses end to end (issue 13): real agents in three node namespaces on one L2
segment (the lab's bridge) with the outside client on it, one fake apiserver. An address comes
from the pool into the Service's status; exactly one node answers ARP for it (arping lists the
MACs that answer); the client's TCP traffic reaches the pods; when the owner's agent dies the
address moves (gratuitous ARP seen by the client) and traffic resumes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.lab.netlab import Lab
from kproxy.lab.nsexec import module_argv
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_get
from kproxy.lb.select import announcer
from tests.support.agent import Agent, eventually, http_json, serve_cluster_api
from tests.support.fakeapi import FakeApiServer
from tests.support.l2 import Capture, arping, mac_of
from tests.support.objects import make_service_obj, make_slice_obj

pytestmark = [pytest.mark.netns]

POOL = "192.168.50.200-192.168.50.201"
POOL6 = "fd00:50::200-fd00:50::201"
VIP = "10.96.0.80"


def lb_service(name: str, *, vip: str = VIP, node_port: int = 30080, **spec: Any) -> dict[str, Any]:
    return make_service_obj(
        "default",
        name,
        type="LoadBalancer",
        clusterIP=vip,
        ports=[
            {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": node_port}
        ],
        **spec,
    )


def ingress(api: FakeApiServer, name: str) -> list[str]:
    svc = api.get("Service", "default", name) or {}
    return [
        i["ip"] for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    ]


@pytest.fixture
def cluster(lab_factory: Any) -> Iterator[tuple[Lab, FakeApiServer, list[Agent]]]:
    lab = lab_factory(nodes=3, pods_per_node=1, ipv6=True)
    with serve_cluster_api(lab) as (api, kubeconfig):
        serve_pods(lab, tcp=[80])
        agents = [
            Agent(
                lab,
                node,
                kubeconfig,
                extra=["--lb-pool", POOL, "--lb-pool", POOL6, "--lb-lease-duration", "2s"],
            )
            for node in lab.nodes
        ]
        for agent in agents:
            agent.start(wait=False)
        for agent in agents:
            agent.wait_ready(30)
        yield lab, api, agents


def all_pods_slice(lab: Lab, name: str, pods: list[Any] | None = None) -> dict[str, Any]:
    chosen = lab.pods if pods is None else pods
    return make_slice_obj(
        "default",
        f"{name}-abc12",
        name,
        [{"ip": p.ip, "node": p.node.name, "pod": p.name} for p in chosen],
        [("http", 80, "TCP")],
    )


def test_address_assigned_one_mac_answers_and_failover(
    cluster: tuple[Lab, FakeApiServer, list[Agent]],
) -> None:
    lab, api, agents = cluster
    api.upsert(lb_service("web"))
    api.upsert(all_pods_slice(lab, "web"))
    eventually(lambda: ingress(api, "web") == ["192.168.50.200"], timeout=15)
    ip = "192.168.50.200"
    macs = {n.name: mac_of(lab, n.ns) for n in lab.nodes}
    names = [n.name for n in lab.nodes]
    owner = announcer(ip, names)
    assert owner is not None

    answers = eventually(lambda: arping(lab, ip), timeout=10)
    assert set(answers) == {macs[owner]}, (answers, macs, owner)
    assert len(answers) == 3  # one reply per request: no second node answers
    # every agent reports the same owner (status reads this), the owner counts its address
    for agent in agents:
        status, doc = http_json(agent.node.ns, "127.0.0.1", 10249, path="/lb")
        assert status == 200
        assert {"address": ip, "service": "default/web", "node": owner} in doc["addresses"]
        announced = "kproxy_lb_announced_addresses 1.0" in agent.metrics()
        assert announced is (agent.node.name == owner)
    # `kproxy status` on the owner: the address, its service, and "this node"
    owner_ns = lab.nodes[names.index(owner)].ns
    status = lab.run(owner_ns, module_argv("kproxy", "status"), check=False).stdout
    assert re.search(rf"{re.escape(ip)}\s+default/web\s+{owner} \(this node\)", status), status
    assert "address pools: 192.168.50.200-192.168.50.201 1/2 used" in status
    res = eventually(lambda: http_get(lab.client.ns, ip, 80, timeout=1.0).ok, timeout=10)
    res = http_get(lab.client.ns, ip, 80, timeout=1.0)
    assert res.ok and res.name in {p.name for p in lab.pods}

    # the owner's node fails: its agent dies without a word and its link goes down (an agent
    # killed alone leaves the node's rules forwarding, which would hide the takeover)
    capture = Capture(lab.client.ns)
    dead = agents[names.index(owner)]
    dead_node = lab.nodes[names.index(owner)]
    successor = announcer(ip, [n for n in names if n != owner])
    assert successor is not None
    try:
        killed_at = time.monotonic()
        dead.stop(signal.SIGKILL)
        lab.run(dead_node.ns, ["ip", "link", "set", "eth0", "down"])
        eventually(lambda: http_get(lab.client.ns, ip, 80, timeout=0.3).ok, timeout=20, step=0.02)
        resumed = time.monotonic() - killed_at
        garps = eventually(lambda: capture.gratuitous(ip), timeout=5)
        assert {m for _, m in garps} == {macs[successor]}
        assert set(arping(lab, ip)) == {macs[successor]}
        print(f"failover after SIGKILL: traffic resumed in {resumed:.2f}s")
        assert "moves from" in agents[names.index(successor)].log()
    finally:
        capture.close()

    # the node comes back: the address returns to it (the hash is stable)
    lab.run(dead_node.ns, ["ip", "link", "set", "eth0", "up"])
    lab.run(dead_node.ns, ["ip", "route", "replace", "default", "via", lab.fabric_ip])
    dead.start()
    eventually(lambda: set(arping(lab, ip, count=2)) == {macs[owner]}, timeout=15)

    # a clean stop hands off at once (the agent stops answering and releases its lease); the
    # node then goes away
    stopped_at = time.monotonic()
    dead.stop(signal.SIGTERM)
    stop_took = time.monotonic() - stopped_at
    lab.run(dead_node.ns, ["ip", "link", "set", "eth0", "down"])
    eventually(lambda: http_get(lab.client.ns, ip, 80, timeout=0.3).ok, timeout=20, step=0.02)
    print(
        f"failover after SIGTERM: traffic resumed in {time.monotonic() - stopped_at:.2f}s "
        f"(the agent took {stop_took:.2f}s to exit)"
    )
    assert set(arping(lab, ip, count=2)) == {macs[successor]}


def test_etp_local_exhaustion_freeing_and_ndp(
    cluster: tuple[Lab, FakeApiServer, list[Agent]],
) -> None:
    lab, api, agents = cluster
    node3 = lab.nodes[2]
    macs = {n.name: mac_of(lab, n.ns) for n in lab.nodes}
    local_pod = [p for p in lab.pods if p.node == node3]
    api.upsert(lb_service("local", externalTrafficPolicy="Local", healthCheckNodePort=32000))
    api.upsert(all_pods_slice(lab, "local", local_pod))
    eventually(lambda: ingress(api, "local") == ["192.168.50.200"], timeout=15)
    # only node3 has an endpoint: it announces, whatever the hash says
    eventually(lambda: set(arping(lab, "192.168.50.200")) == {macs[node3.name]}, timeout=10)
    res = eventually(lambda: http_get(lab.client.ns, "192.168.50.200", 80, timeout=1.0), timeout=10)
    assert res.name == local_pod[0].name

    # the pool has two IPv4 addresses: the third service stays pending, with a log line
    api.upsert(lb_service("second", vip="10.96.0.81", node_port=30081))
    api.upsert(lb_service("third", vip="10.96.0.82", node_port=30082))
    eventually(lambda: ingress(api, "second") == ["192.168.50.201"], timeout=15)
    leader = eventually(
        lambda: next((a for a in agents if "stays pending" in a.log()), False), timeout=10
    )
    assert "LoadBalancer default/third stays pending: no free IPv4 address left" in leader.log()
    assert ingress(api, "third") == []
    # deleting a service frees its address for the pending one
    api.delete("Service", "default", "second")
    eventually(lambda: ingress(api, "third") == ["192.168.50.201"], timeout=15)

    # IPv6: a single-stack IPv6 service gets an address answered over NDP by one node
    api.upsert(lb_service("v6", vip="fd00:96::80", ipFamilies=["IPv6"], node_port=30083))
    api.upsert(
        make_slice_obj(
            "default",
            "v6-abc12",
            "v6",
            [{"ip": p.ip6, "node": p.node.name, "pod": p.name} for p in lab.pods],
            [("http", 80, "TCP")],
            address_type="IPv6",
        )
    )
    eventually(lambda: ingress(api, "v6") == ["fd00:50::200"], timeout=15)
    owner6 = announcer("fd00:50::200", [n.name for n in lab.nodes])
    assert owner6 is not None

    def neighbour() -> str:
        with contextlib.suppress(Exception):
            http_get(lab.client.ns, "fd00:50::200", 80, timeout=0.5)
        out = lab.run(lab.client.ns, ["ip", "-6", "neigh", "show", "fd00:50::200"]).stdout
        m = re.search(r"lladdr (\S+)", out)
        return m.group(1) if m else ""

    assert eventually(neighbour, timeout=10) == macs[owner6]
    eventually(lambda: http_get(lab.client.ns, "fd00:50::200", 80, timeout=1.0).ok, timeout=10)
    res6 = http_get(lab.client.ns, "fd00:50::200", 80, timeout=1.0)
    assert res6.ok and res6.name in {p.name for p in lab.pods}


def test_demo_loadbalancer_answers_the_outside_client(lab_factory: Any) -> None:
    """`kproxy demo` (manifests mode: the agent allocates itself): nginx-loadbalancer gets the
    pool's first address, one MAC answers ARP, and the client's requests reach the nginx pods."""
    del lab_factory  # only for its skip-unless-netns check
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "kproxy", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    section = out[out.index("== LoadBalancer nginx-loadbalancer") :].split("\n== ")[0]
    assert "EXTERNAL-IP 192.168.50.240, announced by lab-node" in section
    macs = set(re.findall(r"reply from 192\.168\.50\.240 \[([0-9A-F:]+)\]", section))
    assert len(macs) == 1, section
    counts = dict(re.findall(r"(nginx-\d): #+ (\d+)", section.split("requests from the client")[1]))
    assert sum(map(int, counts.values())) == 6 and set(counts) <= {"nginx-1", "nginx-2", "nginx-3"}


def test_strict_arp_stops_the_kernel_answering_for_addresses_on_other_interfaces(
    lab_factory: Any,
) -> None:
    """IPVS mode puts every Service address on kube-ipvs0 (here: lo, as the lab kernel has no
    dummy links). With Linux's default arp_ignore=0 the node then answers ARP for it on eth0 -
    every node would. kproxy's strict ARP (set with --lb-pool in IPVS mode) stops that."""
    lab = lab_factory(nodes=1, pods_per_node=0)
    node = lab.nodes[0]
    vip = "192.168.50.230"
    lab.run(node.ns, ["ip", "addr", "add", f"{vip}/32", "dev", "lo"])
    assert set(arping(lab, vip, count=2)) == {mac_of(lab, node.ns)}
    lab.run(
        node.ns,
        [sys.executable, "-c", "from kproxy.runtime.lb import strict_arp; strict_arp()"],
    )
    assert lab.run(node.ns, ["sysctl", "-n", "net.ipv4.conf.all.arp_ignore"]).stdout.strip() == "1"
    assert arping(lab, vip, count=2) == []


def test_an_agent_whose_rules_never_synced_takes_no_address(lab_factory: Any) -> None:
    """node2's agent runs, but every iptables-restore it starts fails (broken binaries first on
    its PATH): it has no rule to forward a LoadBalancer address with. It must not count as a
    live announcer, or the hash hands it addresses the client then cannot reach through it.
    The address that the hash over both nodes gives node2 stays on node1, and traffic flows."""
    lab = lab_factory(nodes=2, pods_per_node=1)
    names = [n.name for n in lab.nodes]
    ip = next(
        f"192.168.50.{i}" for i in range(200, 240) if announcer(f"192.168.50.{i}", names) == "node2"
    )
    broken = lab.workdir / "broken-bin"
    broken.mkdir()
    for tool in ("iptables", "ip6tables"):
        for flavour in ("nft", "legacy"):
            script = broken / f"{tool}-{flavour}-restore"
            script.write_text(
                "#!/bin/sh\necho 'iptables-restore: broken for this test' >&2\nexit 1\n"
            )
            script.chmod(0o755)
    with serve_cluster_api(lab) as (api, kubeconfig):
        serve_pods(lab, tcp=[80])
        extra = ["--lb-pool", "192.168.50.200-192.168.50.239", "--lb-lease-duration", "2s"]
        good, bad = (Agent(lab, node, kubeconfig, extra=extra) for node in lab.nodes)
        bad.env = {"PATH": f"{broken}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}"}
        bad.start(wait=False)
        good.start()
        api.upsert(lb_service("web", annotations={"kproxy.io/lb-ips": ip}))
        api.upsert(all_pods_slice(lab, "web"))
        eventually(lambda: ingress(api, "web") == [ip], timeout=15)
        # node2's agent is up, its LoadBalancer controller too, and its syncs fail
        eventually(lambda: "broken for this test" in bad.log(), timeout=20)
        eventually(lambda: "LoadBalancer address pools" in bad.log(), timeout=20)
        assert bad.proc is not None and bad.proc.poll() is None
        time.sleep(2.5)  # more than a lease duration: node2 had time to heartbeat and take over
        assert set(arping(lab, ip, count=2)) == {mac_of(lab, lab.nodes[0].ns)}
        res = http_get(lab.client.ns, ip, 80, timeout=1.0)
        assert res.ok and res.name in {p.name for p in lab.pods}, res
        lease = api.get("Lease", "kube-system", "kproxy-agent-node2") or {}
        assert not (lease.get("spec") or {}).get("holderIdentity"), lease


def test_ipvs_strict_arp_flag_sets_strict_arp_without_pools(
    lab_factory: Any, tmp_path: Any
) -> None:
    """--ipvs-strict-arp (kube-proxy's ipvs.strictARP, which MetalLB's layer-2 mode asks for)
    sets strict ARP in IPVS mode without kproxy's own pools. The development kernel has no IPVS,
    so only the daemon's step that does it runs here (before the first sync binds anything to
    kube-ipvs0); lo stands in for kube-ipvs0."""
    lab = lab_factory(nodes=1, pods_per_node=0)
    node = lab.nodes[0]
    vip = "192.168.50.230"
    lab.run(node.ns, ["ip", "addr", "add", f"{vip}/32", "dev", "lo"])
    code = (
        "import sys; from kproxy.cli import _parser, _settings; "
        "from kproxy.runtime.daemon import Daemon; "
        "Daemon(_settings(_parser().parse_args(sys.argv[1:])))._make_lb()"
    )

    def daemon_lb_step(*flags: str) -> None:
        argv = ["run", "--proxy-mode", "ipvs", "--manifests", str(tmp_path), "--no-dns", *flags]
        lab.run(node.ns, [sys.executable, "-c", code, *argv])

    daemon_lb_step()  # neither pools nor the flag: the kernel answers for lo's address
    assert set(arping(lab, vip, count=1)) == {mac_of(lab, node.ns)}
    daemon_lb_step("--ipvs-strict-arp")
    sysctls = ["sysctl", "-n", "net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.all.arp_announce"]
    assert lab.run(node.ns, sysctls).stdout.split() == ["1", "2"]
    assert arping(lab, vip, count=1) == []
