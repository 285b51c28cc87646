"""nftables mode on Debian 12's 6.1 kernel, inside the qemu guest: the real `kproxy run
--proxy-mode nftables` in a lab node namespace (reading a manifest directory, as the IPVS VM
tests do, because importing the kubernetes client under TCG takes minutes), real TCP and UDP
traffic through a ClusterIP (IPv4 and IPv6) and a NodePort, an endpoint change, an affinity
timeout change, a restart that keeps an established connection, and `kproxy cleanup`.

The development kernel is much newer; this file is what shows the mode works on the oldest
kernel labs run. It runs only inside the VM (tests/vm/run_in_vm.py, test_vm_suite.py). One lab
and one agent serve the module, and the tests run in file order (restart and cleanup last)."""

from __future__ import annotations

import os
import platform
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kproxy.lab.netlab import Lab
from kproxy.lab.nsexec import module_argv
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import start_hold, start_stream
from tests.support.agent import CLUSTER_CIDR, eventually, node_obj
from tests.support.lab import require_netns
from tests.support.objects import make_service_obj, make_slice_obj
from tests.vm.run_in_vm import IN_VM_ENV
from tests.vm.test_ipvs_proxier import ManifestAgent, Manifests, http_batch, udp_query

pytestmark = [pytest.mark.vm]

VIP, VIP6, STICKY = "10.96.7.80", "fd00:96::7:80", "10.96.7.81"
NODE_PORT = 30780
MODE = ["--proxy-mode", "nftables"]


def canonical(listing: str) -> list[str]:
    """An `nft list table` text as its objects (sets, maps, chains) in name order, each on one
    line with its elements sorted, affinity entries without their remaining time: equal for
    equal tables, whatever order nft printed and whenever."""
    flat = " ".join(listing.split())
    flat = re.sub(r" expires [0-9dhms]+", "", flat)  # an affinity entry's remaining time
    flat = re.sub(
        r"elements = \{ ([^}]*) \}",
        lambda m: "elements = { " + ", ".join(sorted(m.group(1).split(", "))) + " }",
        flat,
    )
    return sorted(re.split(r" (?=(?:set|map|chain) \S+ \{)", flat))


def in_use(items: list[str]) -> list[str]:
    """`canonical` items without the fast-path maps no service uses any more (empty) and their
    rules in `cluster-endpoints`: a partial sync leaves them, the next full sync (a restart's)
    declares only the endpoint counts in use."""
    empty = {
        item.split()[1]
        for item in items
        if item.startswith("map cluster-endpoints-") and "elements =" not in item
    }
    out = []
    for item in items:
        if item.startswith("map ") and item.split()[1] in empty:
            continue
        if item.startswith("chain cluster-endpoints "):
            for name in empty:
                item = re.sub(rf" ?dnat ip to [^@]*@{name}(?= |$)", "", item)
        out.append(item)
    return out


@dataclass
class Env:
    lab: Lab
    api: Manifests
    agent: ManifestAgent

    def nft(self, *args: str) -> str:
        res = self.lab.run(self.lab.nodes[0].ns, ["nft", *args], check=False)
        return str(res.stdout)


def web(lab: Lab, pods: list[Any]) -> list[dict[str, Any]]:
    ports = [
        {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": NODE_PORT},
        {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
    ]
    svc = make_service_obj(
        "default",
        "web",
        type="NodePort",
        clusterIP=VIP,
        clusterIPs=[VIP, VIP6],
        ipFamilies=["IPv4", "IPv6"],
        ipFamilyPolicy="RequireDualStack",
        ports=ports,
    )
    slice_ports = [("http", 80, "TCP"), ("dns", 5353, "UDP")]
    v4 = make_slice_obj(
        "default", "web-4", "web", [{"ip": p.ip, "node": p.node.name} for p in pods], slice_ports
    )
    v6 = make_slice_obj(
        "default",
        "web-6",
        "web",
        [{"ip": p.ip6, "node": p.node.name} for p in pods],
        slice_ports,
        address_type="IPv6",
    )
    return [svc, v4, v6]


def sticky(seconds: int) -> dict[str, Any]:
    return make_service_obj(
        "default",
        "sticky",
        clusterIP=STICKY,
        ports=[{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}],
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": seconds}},
    )


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    if not os.environ.get(IN_VM_ENV):
        pytest.skip("runs inside the VM (Debian 12's kernel): tests/vm/run_in_vm.py")
    require_netns()
    if shutil.which("nft") is None:
        pytest.skip("needs nft (Debian package nftables)")
    print(f"kernel {platform.release()}")
    lab = Lab.create(nodes=1, pods_per_node=2, ipv6=True, prefix="kpn")
    try:
        api = Manifests(lab.workdir / "manifests")
        api.upsert(node_obj(lab.nodes[0]))
        serve_pods(lab, tcp=[80], udp=[5353], timeout=300)
        for obj in [*web(lab, lab.pods), sticky(600)]:
            api.upsert(obj)
        api.upsert(
            make_slice_obj(
                "default", "sticky-4", "sticky", [p.ip for p in lab.pods], [("http", 80, "TCP")]
            )
        )
        agent = ManifestAgent(lab, lab.nodes[0], api.directory)
        agent.extra = [*MODE, "--iptables-min-sync-period", "0s"]
        agent.start(wait=False)
        agent.wait_ready(timeout=600)
        yield Env(lab, api, agent)
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()
    finally:
        lab.teardown()


def test_clusterip_nodeport_tcp_udp_and_ipv6(env: Env) -> None:
    lab = env.lab
    assert platform.release().startswith("6.1."), platform.release()
    ruleset = env.nft("list", "table", "ip", "kube-proxy")
    assert "numgen random mod 65536 map @endpoints-" in ruleset
    names = {p.name for p in lab.pods}
    pod = lab.pods[0]
    inside = http_batch(pod.ns, VIP, 80, n=12)
    assert inside.ok_count == 12 and set(inside.names) == names
    outside = http_batch(lab.client.ns, lab.nodes[0].ip, NODE_PORT, n=12)
    assert outside.ok_count == 12 and set(outside.names) == names
    assert lab.client.ip not in set(outside.clients)  # masqueraded
    assert udp_query(pod.ns, VIP, 53, n=3).all_ok
    v6 = http_batch(pod.ns, VIP6, 80, n=6)
    assert v6.ok_count == 6, v6.errors


def test_endpoint_change(env: Env) -> None:
    keep = env.lab.pods[1]
    env.api.upsert(web(env.lab, [keep])[1])

    def only_keep() -> bool:
        batch = http_batch(env.lab.pods[0].ns, VIP, 80, n=6)
        return batch.ok_count == 6 and set(batch.names) == {keep.name}

    eventually(only_keep, timeout=60, step=1.0)
    env.api.upsert(web(env.lab, env.lab.pods)[1])
    eventually(
        lambda: len(set(http_batch(env.lab.pods[0].ns, VIP, 80, n=10).names)) == 2,
        timeout=60,
        step=1.0,
    )


def test_affinity_timeout_change(env: Env) -> None:
    def timeouts() -> set[str]:
        sets = env.nft("list", "sets", "ip")
        return set(re.findall(r"set affinity-\S+ \{[^}]*?timeout (\w+)", sets))

    assert timeouts() == {"10m"}
    env.api.upsert(sticky(90))
    eventually(lambda: timeouts() == {"1m30s"}, timeout=60, step=1.0)
    batch = http_batch(env.lab.client.ns, STICKY, 80, n=6)
    assert batch.ok_count == 6 and len(set(batch.names)) == 1


def test_restart_keeps_an_established_connection(env: Env) -> None:
    before = env.nft("list", "table", "ip", "kube-proxy")
    hold = start_hold(env.lab.pods[0].ns, VIP, 80, interval=0.2, timeout=3.0)
    hold.wait_started(timeout=60)
    # probe timeouts of 3 s: under TCG the restarting agent starves the probe for a second
    # or more (a refused or reset connection fails at once, whatever the timeout)
    node = env.lab.nodes[0].ip
    stream = start_stream(env.lab.client.ns, node, NODE_PORT, interval=0.2, timeout=3.0)
    stream.wait_started(timeout=60)
    env.agent.stop()
    env.agent.start(wait=False)
    env.agent.wait_ready(timeout=300)
    stream.stop()
    hold.stop()
    held, streamed = hold.result(timeout=120), stream.result(timeout=120)
    assert held.ok, held.error
    assert streamed.failures == 0 and streamed.ok_count > 3, streamed.errors
    # the same table (the start-up full sync declares the shared fast-path maps afresh and
    # adds elements in its own order, so `nft list` may print both in another order; the map
    # of an endpoint count no longer used, left by the endpoint change above, is gone)
    after = canonical(env.nft("list", "table", "ip", "kube-proxy"))
    assert after == in_use(canonical(before))


def test_full_syncs_went_over_netlink(env: Env) -> None:
    """The agent's full syncs (start, restart) were netlink batches on this kernel, not the
    `nft -f` retry (kproxy.backends.nftables logs each retry)."""
    log = env.agent.log_path.read_text(errors="replace")
    assert log.count("full sync") >= 2  # the first start's and the restart's
    assert "over netlink failed" not in log, log[-3000:]


def test_cleanup_leaves_no_kube_proxy_table(env: Env) -> None:
    env.agent.stop()
    env.lab.run(
        env.lab.nodes[0].ns,
        module_argv("kproxy", "cleanup", *MODE, "--cluster-cidr", CLUSTER_CIDR),
        timeout=300,
    )
    tables = env.nft("list", "tables")
    assert "kube-proxy" not in tables, tables
