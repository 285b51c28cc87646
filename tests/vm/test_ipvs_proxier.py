"""IPVS mode end to end, inside the qemu guest (a kernel with IPVS): the real `kproxy run
--proxy-mode ipvs` in a lab node namespace, real traffic from pods and an outside client, and
`ipvsadm` read back and parsed.

kproxy reads its Services and EndpointSlices from a manifest directory (`--manifests`) the tests
write, not from the fake apiserver: under TCG emulation over the guest's 9p root filesystem,
importing the `kubernetes` client alone takes minutes. The sync path is the same either way.

Topology (kproxy.lab, dual-stack): node1 runs kproxy and has three pods, node2 (no kproxy) has one
pod, the client sits outside the cluster CIDR on the nodes' bridge. One lab, apiserver and agent
serve the whole module (a guest under TCG takes more than a minute to start the agent); every test
uses its own services, except the restart and cleanup tests at the end, which run last on
purpose. The agent also runs the LoadBalancer address pools and layer-2 announcer (--lb-pool, see
the LoadBalancer section); the module's other LoadBalancers carry another loadBalancerClass, so
their test-written status addresses stay as they are.

Run with `python3 tests/vm/run_in_vm.py` (see docs/vm-tests.md); on a kernel without IPVS every
test skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from kproxy.lab import traffic
from kproxy.lab.netlab import CLIENT_IP, Lab, Node, Pod
from kproxy.lab.nsexec import module_argv
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import Batch, Result, start_hold, start_stream
from tests.support.agent import CLUSTER_CIDR, Agent, eventually, http_json, node_obj
from tests.support.l2 import Capture, arping, mac_of, solicit
from tests.support.lab import require_netns
from tests.support.objects import (
    WEB_EXT_IP,
    WEB_LB_IP,
    WEB_VIP,
    make_service_obj,
    make_slice_obj,
    web_service,
)
from tests.vm.ipvsadm import ListedService, parse_list, parse_stats

pytestmark = [pytest.mark.vm]

VIP, LB_IP, EXT_IP = WEB_VIP, WEB_LB_IP, WEB_EXT_IP
IPVS_FLAGS = ["--proxy-mode", "ipvs", "--ipvs-min-sync-period", "0s", "--ipvs-sync-period", "5s"]
LB_POOL, LB_POOL6 = "192.168.50.200-192.168.50.203", "fd00:50::200-fd00:50::203"
OTHER_LB_CLASS = "example.com/cloud"  # LoadBalancers whose status the tests write themselves


def ipvs_unavailable() -> str | None:
    if not os.path.exists("/proc/net/ip_vs"):
        subprocess.run(["modprobe", "ip_vs"], capture_output=True, check=False)
    if not os.path.exists("/proc/net/ip_vs"):
        return "this kernel has no IPVS (run the vm tier through tests/vm/run_in_vm.py)"
    for tool in ("ipvsadm", "ipset"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


# -- the module's lab ----------------------------------------------------------------------------
class Manifests:
    """The directory kproxy reads (one JSON file per object, replaced atomically)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, kind: str, namespace: str | None, name: str) -> Path:
        return self.directory / f"{kind}-{namespace or ''}-{name}.json"

    def upsert(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        path = self._path(obj["kind"], meta.get("namespace"), meta["name"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj))
        tmp.replace(path)

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        self._path(kind, namespace, name).unlink(missing_ok=True)


class ManifestAgent(Agent):
    """`kproxy run --manifests DIR --proxy-mode ipvs` in a node namespace."""

    def __init__(self, lab: Lab, node: Node, directory: Path) -> None:
        super().__init__(lab, node, "", extra=IPVS_FLAGS)
        self.directory = directory

    def argv(self) -> list[str]:
        args = [
            "run",
            "--manifests",
            str(self.directory),
            "--hostname-override",
            self.node.name,
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--no-dns",
            "-v",
            "-v",
            *self.extra,
        ]
        return module_argv("kproxy", *args)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait for this start's first successful sync, read from the log (a Python probe per
        poll would compete with kproxy's own start-up in the slow guest)."""
        marker = f"---- start {self.starts}\n"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"kproxy exited early:\n{self.log()}")
            text = self.log_path.read_text(errors="replace")
            if "synced all rules" in text.rsplit(marker, 1)[-1]:
                return
            time.sleep(0.5)
        raise AssertionError(f"kproxy did not sync within {timeout}s:\n{self.log()}")


Key = tuple[str, str, int]  # (address, protocol, port), as tests/vm/ipvsadm.py keys services


@dataclass
class Env:
    lab: Lab
    api: Manifests
    agent: Agent

    @property
    def node(self) -> Any:
        return self.lab.nodes[0]

    @property
    def local_pods(self) -> list[Pod]:
        return self.lab.pods_on(0)

    @property
    def remote_pod(self) -> Pod:
        return self.lab.pods_on(1)[0]

    def run(self, *argv: str) -> str:
        return str(self.lab.run(self.node.ns, list(argv)).stdout)

    def ipvsadm(self, *args: str) -> dict[Key, ListedService]:
        return parse_list(self.run("ipvsadm", "-Ln", *args))

    def node_addresses(self) -> set[str]:
        """IPv4 addresses of node1 that carry NodePorts (all but loopback and kube-ipvs0)."""
        out = set()
        for line in self.run("ip", "-4", "-o", "addr", "show").splitlines():
            words = line.split()
            if words[1] in ("lo", "kube-ipvs0"):
                continue
            out.add(words[3].split("/")[0])
        return out

    def wait_vs(self, key: Key, timeout: float = 20.0) -> ListedService:
        def check() -> ListedService:
            table = self.ipvsadm()
            assert key in table, f"{key} not in {sorted(table)}"
            return table[key]

        result: ListedService = eventually(check, timeout=timeout, step=0.3)
        return result

    def dests(self, key: Key) -> dict[str, tuple[int, int]]:
        """Real server address -> (weight, active connections) of one virtual server."""
        table = self.ipvsadm()
        assert key in table, f"{key} not in {sorted(table)}"
        return {a: (d.weight, d.active) for (a, _p), d in table[key].dests.items()}

    def serving(self, key: Key) -> set[str]:
        """The real servers of `key` that take new connections (weight > 0)."""
        return {a for a, (weight, _active) in self.dests(key).items() if weight > 0}

    def wait_serving(self, key: Key, pods: list[Pod], timeout: float = 30.0) -> None:
        want = {p.ip for p in pods}
        eventually(lambda: self.serving(key) == want, timeout=timeout, step=0.3)


def slice_of(name: str, pods: list[Pod], ports: Any = None) -> dict[str, Any]:
    return make_slice_obj(
        "default",
        f"{name}-x1",
        name,
        [{"ip": p.ip, "node": p.node.name, "pod": p.name} for p in pods],
        ports if ports is not None else [("http", 80, "TCP"), ("dns", 5353, "UDP")],
    )


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    require_netns()
    reason = ipvs_unavailable()
    if reason:
        pytest.skip(reason)
    lab = Lab.create(nodes=2, pods_per_node=[3, 1], ipv6=True, prefix="kpv")
    try:
        api = Manifests(lab.workdir / "manifests")
        for node in lab.nodes:
            api.upsert(node_obj(node))
        serve_pods(lab, tcp=[80], udp=[5353], timeout=300)
        api.upsert(web_service(loadBalancerClass=OTHER_LB_CLASS))
        api.upsert(slice_of("web", lab.pods_on(0)))
        agent = ManifestAgent(lab, lab.nodes[0], api.directory)
        agent.extra = [*IPVS_FLAGS, "--lb-pool", LB_POOL, "--lb-pool", LB_POOL6]
        agent.start(wait=False)
        agent.wait_ready(timeout=900)  # imports over 9p under TCG crawl on a loaded host
        yield Env(lab, api, agent)
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()
    finally:
        lab.teardown()


def names(batch: Any) -> set[str]:
    return set(batch.names)


# The guest is slow to start a probe process (Python over 9p under emulation): a probe that did
# not even finish in its own budget is run again. That retries process start-up, never a
# network verdict: a probe that ran reports what the network did.
def _retry(call: Any, *args: Any, **kw: Any) -> Any:
    for attempt in range(3):
        try:
            return call(*args, **kw)
        except subprocess.TimeoutExpired:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def http_get(ns: str, ip: str, port: int, *, timeout: float) -> Result:
    result: Result = _retry(traffic.http_get, ns, ip, port, timeout=timeout)
    return result


def http_batch(ns: str, ip: str, port: int, *, n: int) -> Batch:
    result: Batch = _retry(traffic.http_batch, ns, ip, port, n=n, timeout=3.0)
    return result


def udp_query(ns: str, ip: str, port: int, *, n: int) -> Batch:
    result: Batch = _retry(traffic.udp_query, ns, ip, port, n=n, timeout=3.0)
    return result


def k(address: str, port: int, proto: str = "TCP") -> Key:
    return (address, proto, port)


# -- what ipvsadm shows --------------------------------------------------------------------------
def test_ipvsadm_shows_exactly_the_expected_virtual_and_real_servers(env: Env) -> None:
    pods = {p.ip for p in env.local_pods}
    expected = set()
    for addr in (VIP, EXT_IP, LB_IP):
        expected |= {k(addr, 80), k(addr, 53, "UDP")}
    for addr in env.node_addresses():
        expected |= {k(addr, 30080), k(addr, 30053, "UDP")}
    env.wait_serving(k(VIP, 80), env.local_pods)
    table = env.ipvsadm()
    assert set(table) == expected
    for vs in table.values():
        assert vs.scheduler == "rr" and vs.persistent is None and vs.sched_flags == ()
        port = 80 if vs.protocol == "TCP" else 5353
        assert {(a, p, d.forward, d.weight) for (a, p), d in vs.dests.items()} == {
            (ip, port, "masq", 1) for ip in pods
        }
    # the VIPs (not the node addresses) are bound on kube-ipvs0
    bound = env.run("ip", "-4", "-o", "addr", "show", "dev", "kube-ipvs0")
    assert {VIP, EXT_IP, LB_IP} <= set(re.findall(r"inet ([0-9.]+)/32", bound))
    assert env.node.ip not in bound
    # and the companion rules match kproxy's sets
    assert "--match-set KUBE-CLUSTER-IP dst,dst" in env.agent.save("nat")
    env.run("ipset", "test", "KUBE-CLUSTER-IP", f"{VIP},tcp:80")
    env.run("ipset", "test", "KUBE-NODE-PORT-TCP", "30080")


def test_clusterip_balances_round_robin_over_all_pods(env: Env) -> None:
    batch = http_batch(env.local_pods[0].ns, VIP, 80, n=30)
    assert batch.ok_count == 30
    assert batch.names == {p.name: 10 for p in env.local_pods}

    def counted() -> None:  # IPVS folds its counters in with up to ~2 s of lag
        listed = parse_stats(env.run("ipvsadm", "-Ln", "--stats", "--exact"))[k(VIP, 80)]
        stats, per_dest = listed
        assert stats.conns >= 30
        assert all(per_dest[(p.ip, 80)].conns >= 10 for p in env.local_pods)

    eventually(counted, timeout=10, step=0.5)


@pytest.mark.parametrize(
    ("target", "port"),
    [("node", 30080), (LB_IP, 80), (EXT_IP, 80)],
    ids=["nodeport", "loadbalancer-ip", "external-ip"],
)
def test_external_addresses_reach_every_pod_masqueraded(env: Env, target: str, port: int) -> None:
    ip = env.node.ip if target == "node" else target
    batch = http_batch(env.lab.client.ns, ip, port, n=12)
    assert batch.ok_count == 12
    assert names(batch) == {p.name for p in env.local_pods}
    # off-cluster traffic is masqueraded: pods see the node, not the client
    assert set(batch.clients) == {env.node.gateway}


def test_udp_clusterip_and_nodeport(env: Env) -> None:
    inside = udp_query(env.local_pods[0].ns, VIP, 53, n=3)
    outside = udp_query(env.lab.client.ns, env.node.ip, 30053, n=3)
    assert inside.all_ok and outside.all_ok


def test_client_ip_affinity_is_ipvs_persistence(env: Env) -> None:
    vip = "10.96.0.81"
    env.api.upsert(
        make_service_obj(
            "default",
            "sticky",
            clusterIP=vip,
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        )
    )
    env.api.upsert(slice_of("sticky", env.local_pods, [("http", 80, "TCP")]))
    assert env.wait_vs(k(vip, 80)).persistent == 60
    env.wait_serving(k(vip, 80), env.local_pods)
    batch = http_batch(env.local_pods[0].ns, vip, 80, n=12)
    assert batch.ok_count == 12 and len(batch.names) == 1
    (chosen,) = batch.names
    pod_ip = next(p.ip for p in env.local_pods if p.name == chosen)
    persist = parse_list(env.run("ipvsadm", "-Ln", "--persistent-conn"))[k(vip, 80)]
    assert persist.dests[(pod_ip, 80)].persist == 1
    # another client gets its own (persistent) choice, and keeps it
    other = http_batch(env.local_pods[1].ns, vip, 80, n=6)
    assert other.ok_count == 6 and len(other.names) == 1


def test_scheduler_from_annotation_and_edited_in_place(env: Env) -> None:
    vip = "10.96.0.82"

    def svc(scheduler: str) -> dict[str, Any]:
        return make_service_obj(
            "default", "sched", clusterIP=vip, annotations={"kproxy.io/ipvs-scheduler": scheduler}
        )

    env.api.upsert(svc("sh"))
    env.api.upsert(slice_of("sched", env.local_pods, [("http", 80, "TCP")]))
    assert env.wait_vs(k(vip, 80)).scheduler == "sh"
    env.wait_serving(k(vip, 80), env.local_pods)
    before = http_batch(env.local_pods[0].ns, vip, 80, n=6)
    assert before.ok_count == 6 and len(before.names) == 1  # source hashing: one pod per client
    env.api.upsert(svc("wlc"))
    eventually(lambda: env.ipvsadm()[k(vip, 80)].scheduler == "wlc", timeout=20, step=0.3)
    assert len(env.ipvsadm()[k(vip, 80)].dests) == 3


def test_pod_reaches_itself_through_its_service(env: Env) -> None:
    me = env.local_pods[1]
    env.api.upsert(make_service_obj("default", "self", clusterIP="10.96.0.83"))
    env.api.upsert(slice_of("self", [me], [("http", 80, "TCP")]))
    env.wait_serving(k("10.96.0.83", 80), [me])
    batch = http_batch(me.ns, "10.96.0.83", 80, n=4)
    assert batch.ok_count == 4 and names(batch) == {me.name}
    # hairpin needs masquerade (KUBE-LOOP-BACK): the pod sees the node, not itself
    assert me.ip not in set(batch.clients)


def test_service_without_endpoints_refuses_at_once(env: Env) -> None:
    env.api.upsert(make_service_obj("default", "empty", clusterIP="10.96.0.84"))
    env.api.upsert(make_slice_obj("default", "empty-x1", "empty", []))
    assert env.wait_vs(k("10.96.0.84", 80)).dests == {}
    res = http_get(env.local_pods[0].ns, "10.96.0.84", 80, timeout=3.0)
    assert not res.ok and res.error_kind == "refused"
    assert res.elapsed < 1.0
    # a port of the VIP that no service uses is refused as well (KUBE-IPVS-FILTER)
    res = http_get(env.local_pods[0].ns, "10.96.0.84", 8080, timeout=3.0)
    assert not res.ok and res.error_kind == "refused"


def test_external_policy_local_keeps_client_ip_and_drops_without_local_endpoints(
    env: Env,
) -> None:
    here, there = env.local_pods[0], env.remote_pod
    node_port = k(env.node.ip, 30090)
    env.api.upsert(
        make_service_obj(
            "default",
            "local",
            type="NodePort",
            clusterIP="10.96.0.85",
            externalTrafficPolicy="Local",
            ports=[{"name": "http", "port": 80, "targetPort": 80, "nodePort": 30090}],
        )
    )
    env.api.upsert(slice_of("local", [here, there], [("http", 80, "TCP")]))
    env.wait_serving(node_port, [here])
    env.wait_serving(k("10.96.0.85", 80), [here, there])
    batch = http_batch(env.lab.client.ns, env.node.ip, 30090, n=4)
    assert batch.ok_count == 4 and names(batch) == {here.name}
    assert set(batch.clients) == {CLIENT_IP}  # not masqueraded
    # ClusterIP traffic still goes to every endpoint
    inside = http_batch(env.local_pods[1].ns, "10.96.0.85", 80, n=6)
    assert names(inside) == {here.name, there.name}

    env.api.upsert(slice_of("local", [there], [("http", 80, "TCP")]))
    # pods and the node still reach the service (through the remote pod); `here` drains
    env.wait_serving(node_port, [there])
    res = http_get(env.lab.client.ns, env.node.ip, 30090, timeout=1.5)
    assert not res.ok and res.error_kind == "timeout"  # dropped: this node has no local pod
    from_pod = http_get(env.local_pods[1].ns, env.node.ip, 30090, timeout=3.0)
    assert from_pod.ok and from_pod.name == there.name


def test_internal_policy_local_without_local_endpoints_drops(env: Env) -> None:
    env.api.upsert(
        make_service_obj("default", "itp", clusterIP="10.96.0.87", internalTrafficPolicy="Local")
    )
    env.api.upsert(slice_of("itp", [env.remote_pod], [("http", 80, "TCP")]))
    assert env.wait_vs(k("10.96.0.87", 80)).dests == {}
    res = http_get(env.local_pods[0].ns, "10.96.0.87", 80, timeout=1.5)
    assert not res.ok and res.error_kind == "timeout"


def test_load_balancer_source_ranges(env: Env) -> None:
    env.api.upsert(
        make_service_obj(
            "default",
            "fw",
            type="LoadBalancer",
            loadBalancerClass=OTHER_LB_CLASS,
            clusterIP="10.96.0.88",
            loadBalancerSourceRanges=["10.244.0.0/16"],
            ports=[{"name": "http", "port": 80, "targetPort": 80, "nodePort": 30091}],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.20"}]}},
        )
    )
    env.api.upsert(slice_of("fw", env.local_pods, [("http", 80, "TCP")]))
    env.wait_serving(k("203.0.113.20", 80), env.local_pods)
    allowed = http_get(env.local_pods[0].ns, "203.0.113.20", 80, timeout=3.0)
    assert allowed.ok
    denied = http_get(env.lab.client.ns, "203.0.113.20", 80, timeout=1.5)
    assert not denied.ok and denied.error_kind == "timeout"


def test_removed_endpoint_drains_with_weight_zero_and_comes_back(env: Env) -> None:
    vip = "10.96.0.86"
    key = k(vip, 80)
    pods = env.local_pods
    env.api.upsert(make_service_obj("default", "drain", clusterIP=vip))
    env.api.upsert(slice_of("drain", pods, [("http", 80, "TCP")]))
    env.wait_serving(key, pods)
    hold = start_hold(pods[0].ns, vip, 80, interval=0.2, timeout=3.0)
    hold.wait_started(timeout=60)

    def held() -> str:
        (busy,) = [a for a, (_w, active) in env.dests(key).items() if active == 1]
        return busy

    busy_ip = eventually(held, timeout=20, step=0.3)
    busy = next(p for p in pods if p.ip == busy_ip)
    keep, idle = [p for p in pods if p is not busy]
    # the held pod and an idle one leave the service
    env.api.upsert(slice_of("drain", [keep], [("http", 80, "TCP")]))

    def drained() -> None:
        dests = env.dests(key)
        assert idle.ip not in dests  # no connections: deleted at once
        assert dests.get(busy.ip) == (0, 1)  # draining: weight 0, its connection still active
        assert dests.get(keep.ip, (0, 0))[0] == 1

    eventually(drained, timeout=20, step=0.3)
    batch = http_batch(pods[1].ns, vip, 80, n=6)
    assert batch.ok_count == 6 and names(batch) == {keep.name}  # no new connection drains
    time.sleep(1.0)
    hold.stop()
    result = hold.result(timeout=60)
    assert result.ok, result.error  # the held connection never broke
    assert set(result.names) == {busy.name}
    # a returning endpoint is restored to weight 1
    env.api.upsert(slice_of("drain", [keep, busy], [("http", 80, "TCP")]))
    eventually(lambda: env.dests(key).get(busy.ip, (0, 0))[0] == 1, timeout=20, step=0.3)


def test_removed_udp_endpoint_is_deleted_at_once(env: Env) -> None:
    vip = "10.96.0.89"
    key = k(vip, 53, "UDP")
    pods = env.local_pods
    env.api.upsert(
        make_service_obj(
            "default",
            "udrain",
            clusterIP=vip,
            ports=[{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}],
        )
    )
    env.api.upsert(slice_of("udrain", pods, [("dns", 5353, "UDP")]))
    env.wait_serving(key, pods)
    assert udp_query(pods[0].ns, vip, 53, n=6).all_ok  # every real server has a connection
    env.api.upsert(slice_of("udrain", pods[:1], [("dns", 5353, "UDP")]))
    eventually(lambda: set(env.dests(key)) == {pods[0].ip}, timeout=20, step=0.3)
    replies = udp_query(pods[1].ns, vip, 53, n=3)
    assert replies.all_ok and names(replies) == {pods[0].name}


def test_deleted_service_leaves_no_virtual_server_or_vip(env: Env) -> None:
    env.api.upsert(make_service_obj("default", "gone", clusterIP="10.96.0.90"))
    env.api.upsert(slice_of("gone", env.local_pods, [("http", 80, "TCP")]))
    env.wait_serving(k("10.96.0.90", 80), env.local_pods)
    env.api.delete("Service", "default", "gone")

    def gone() -> None:
        assert k("10.96.0.90", 80) not in env.ipvsadm()
        assert "10.96.0.90" not in env.run("ip", "-o", "addr", "show", "dev", "kube-ipvs0")
        assert "10.96.0.90" not in env.run("ipset", "list", "KUBE-CLUSTER-IP")

    eventually(gone, timeout=20, step=0.3)


def test_foreign_virtual_servers_are_left_alone(env: Env) -> None:
    env.run("ipvsadm", "-A", "-t", "192.0.2.1:9999", "-s", "rr")
    try:
        time.sleep(7.0)  # at least one periodic full sync (--ipvs-sync-period 5s)
        assert k("192.0.2.1", 9999) in env.ipvsadm()
    finally:
        env.run("ipvsadm", "-D", "-t", "192.0.2.1:9999")


def _full_log(env: Env) -> str:
    return env.agent.log_path.read_text(errors="replace")


def test_idle_periodic_syncs_are_partial_and_an_outside_delete_is_repaired(env: Env) -> None:
    vip = "10.96.0.93"
    env.api.upsert(make_service_obj("default", "tampered", clusterIP=vip))
    env.api.upsert(slice_of("tampered", env.local_pods, [("http", 80, "TCP")]))
    env.wait_serving(k(vip, 80), env.local_pods)
    # idle: the periodic syncs (every 5 s here) are partial, and so never read the table back
    seen = len(_full_log(env))
    eventually(lambda: "partial sync (periodic)" in _full_log(env)[seen:], timeout=30, step=0.5)
    assert "full sync (periodic)" not in _full_log(env)[seen:]
    # the next period (earlier tests' outside edits repaired by now) finds every count as
    # written: the IPVS table, every kind of ipset, kube-ipvs0's addresses
    seen = len(_full_log(env))
    eventually(lambda: "partial sync (periodic)" in _full_log(env)[seen:], timeout=30, step=0.5)
    assert "changed from outside" not in _full_log(env)[seen:], _full_log(env)[seen:][-3000:]

    seen = len(_full_log(env))
    env.run("ipvsadm", "-D", "-t", f"{vip}:80")
    assert k(vip, 80) not in env.ipvsadm()
    # the next periodic check counts one virtual server and three real servers fewer than
    # kproxy wrote, and the sync it triggers is full: the virtual server is back
    env.wait_serving(k(vip, 80), env.local_pods, timeout=30)
    # (the sync's own log line follows the kernel write by a moment)
    eventually(lambda: "full sync (tampered)" in _full_log(env)[seen:], timeout=30, step=0.5)
    log = _full_log(env)[seen:]
    assert "changed from outside" in log and "virtual servers" in log, log[-3000:]
    assert http_batch(env.local_pods[0].ns, vip, 80, n=6).ok_count == 6


def test_an_outside_real_server_delete_is_repaired_by_the_next_periodic_check(env: Env) -> None:
    """IPv4's drift check sees every virtual server's real server count on every check
    (kproxy.backends.ipvs_census), so the bound is one period: the first periodic sync that
    starts after the delete is the full one (one partial may have started just before it)."""
    vip = "10.96.0.94"
    env.api.upsert(make_service_obj("default", "lostreal", clusterIP=vip))
    env.api.upsert(slice_of("lostreal", env.local_pods, [("http", 80, "TCP")]))
    env.wait_serving(k(vip, 80), env.local_pods)
    seen = len(_full_log(env))
    eventually(lambda: "partial sync (periodic)" in _full_log(env)[seen:], timeout=30, step=0.5)
    victim = env.local_pods[1]
    seen = len(_full_log(env))
    env.run("ipvsadm", "-d", "-t", f"{vip}:80", "-r", f"{victim.ip}:80")
    assert victim.ip not in env.dests(k(vip, 80))
    env.wait_serving(k(vip, 80), env.local_pods, timeout=30)
    eventually(lambda: "full sync (tampered)" in _full_log(env)[seen:], timeout=30, step=0.5)
    log = _full_log(env)[seen:]
    before = log[: log.index("full sync (tampered)")]
    assert before.count("partial sync (periodic)") <= 1, log[-3000:]
    assert "changed from outside" in before and "real servers" in before, log[-3000:]
    assert names(http_batch(env.local_pods[0].ns, vip, 80, n=9)) == {p.name for p in env.local_pods}


def test_an_ipset_entry_and_a_vip_deleted_from_outside_are_repaired(env: Env) -> None:
    """The drift check also counts the ipsets' elements (one header dump) and kube-ipvs0's
    addresses (one undecoded address dump)."""
    vip = "10.96.0.95"
    env.api.upsert(make_service_obj("default", "lostset", clusterIP=vip))
    env.api.upsert(slice_of("lostset", env.local_pods, [("http", 80, "TCP")]))
    env.wait_serving(k(vip, 80), env.local_pods)

    def has_entry() -> None:
        assert f"{vip},tcp:80" in env.run("ipset", "list", "KUBE-CLUSTER-IP")

    def has_vip() -> None:
        assert f"{vip}/32" in env.run("ip", "-o", "addr", "show", "dev", "kube-ipvs0")

    eventually(has_entry, timeout=20, step=0.3)
    for outside, present, what in (
        (["ipset", "del", "KUBE-CLUSTER-IP", f"{vip},tcp:80"], has_entry, "KUBE-CLUSTER-IP"),
        (["ip", "addr", "del", f"{vip}/32", "dev", "kube-ipvs0"], has_vip, "kube-ipvs0 holds"),
    ):
        seen = len(_full_log(env))
        env.run(*outside)
        with pytest.raises(AssertionError):
            present()
        eventually(present, timeout=30, step=0.5)
        eventually(
            lambda at=seen: "full sync (tampered)" in _full_log(env)[at:], timeout=30, step=0.5
        )
        log = _full_log(env)[seen:]
        assert "changed from outside" in log and what in log, log[-3000:]
    assert http_batch(env.local_pods[0].ns, vip, 80, n=6).ok_count == 6


# -- kproxy status / explain read the IPVS table -------------------------------------------
def kproxy_json(env: Env, *args: str, manifests: Path | None = None) -> tuple[int, Any]:
    """Run an inspection subcommand in node1's namespace with the agent's own settings."""
    res = env.lab.run(
        env.node.ns,
        module_argv(
            "kproxy",
            *args,
            "--proxy-mode",
            "ipvs",
            "--manifests",
            str(manifests or env.api.directory),
            "--hostname-override",
            env.node.name,
            "--cluster-cidr",
            CLUSTER_CIDR,
            "-o",
            "json",
        ),
        check=False,
        timeout=600,
    )
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def serve_nodeport(env: Env, name: str, vip: str, node_port: int, *, scheduler: str) -> None:
    """A NodePort service `name` (http 80 at `vip` and `node_port`, IPVS `scheduler`) over node1's
    pods; returns once both virtual servers are programmed with them."""
    env.api.upsert(
        make_service_obj(
            "default",
            name,
            clusterIP=vip,
            annotations={"kproxy.io/ipvs-scheduler": scheduler},
            ports=[{"name": "http", "port": 80, "targetPort": 80, "nodePort": node_port}],
            type="NodePort",
        )
    )
    env.api.upsert(slice_of(name, env.local_pods, [("http", 80, "TCP")]))
    env.wait_serving(k(vip, 80), env.local_pods)
    env.wait_serving(k(env.node.ip, node_port), env.local_pods)


def test_status_and_explain_show_the_programmed_virtual_servers(env: Env) -> None:
    vip = "10.96.0.91"
    pods = env.local_pods
    serve_nodeport(env, "insp", vip, 30092, scheduler="wrr")
    batch = http_batch(pods[0].ns, vip, 80, n=6)
    assert batch.ok_count == 6 and names(batch) == {p.name for p in pods}

    # status: read back from the kernel, every service port as wanted, with its counters
    rc, doc = kproxy_json(env, "status")
    assert doc["mode"] == "ipvs" and doc["rules_from"] == "ipvsadm -Ln"
    rows = {tuple(r["addresses"]): r for r in doc["services"]}
    row = rows[(f"{vip}:80",)]
    assert row["state"] == "ok" and row["problems"] == [], row
    want = sorted(f"{p.ip}:80" for p in pods)
    assert [b["endpoint"] for b in row["backends"]] == want
    assert row["expected_backends"] == want
    assert sum(b["share"] for b in row["backends"]) == pytest.approx(1.0)
    assert row["packets"] >= 1  # the connections just made (active or TIME_WAIT)
    assert rows[(f"{env.node.ip}:30092",)]["state"] == "ok"
    assert rc == 0 and doc["ok"], [r["problems"] for r in doc["services"] if r["problems"]]

    # a wanted state the kernel does not have yet is flagged: the same manifests plus a service
    wanted = env.lab.workdir / "wanted-ahead"
    shutil.copytree(env.api.directory, wanted, dirs_exist_ok=True)
    Manifests(wanted).upsert(make_service_obj("default", "ahead", clusterIP="10.96.0.92"))
    Manifests(wanted).upsert(slice_of("ahead", pods, [("http", 80, "TCP")]))
    rc, doc = kproxy_json(env, "status", manifests=wanted)
    assert rc == 1 and not doc["ok"]
    ahead = {tuple(r["addresses"]): r for r in doc["services"]}[("10.96.0.92:80",)]
    assert ahead["problems"] == ["virtual server wanted but not programmed"], ahead

    # explain from a pod: the virtual server, its scheduler and real servers as ipvsadm has them;
    # the pod's own IP among them is the hairpin case, the only one masqueraded
    rc, ex = kproxy_json(env, "explain", f"{vip}:80/tcp", "--from", pods[0].ip)
    assert rc == 0 and ex["mode"] == "ipvs" and ex["result"] == "ipvs", ex["result"]
    vs = ex["ipvs"]["virtual_server"]
    assert (vs["address"], vs["port"], vs["protocol"], vs["scheduler"]) == (vip, 80, "TCP", "wrr")
    reals = {r["address"]: r for r in vs["real_servers"]}
    assert set(reals) == set(names_to_ips(batch, pods))  # what real traffic reached
    assert {a: (r["forward"], r["weight"]) for a, r in reals.items()} == {
        p.ip: ("masq", 1) for p in pods
    }
    assert {a: r["masquerade"] for a, r in reals.items()} == {p.ip: p is pods[0] for p in pods}
    # and from outside the cluster to the NodePort: masqueraded to every real server
    rc, ex = kproxy_json(env, "explain", f"{env.node.ip}:30092/tcp", "--from", CLIENT_IP)
    assert rc == 0 and ex["result"] == "ipvs", ex["result"]
    reals = {r["address"]: r for r in ex["ipvs"]["virtual_server"]["real_servers"]}
    assert {a: r["masquerade"] for a, r in reals.items()} == {p.ip: True for p in pods}


def kproxy_bare(env: Env, *args: str) -> tuple[int, Any]:
    """An inspection subcommand in node1's namespace with no flags at all: the wanted state and
    the settings come from the running agent's socket."""
    res = env.lab.run(
        env.node.ns, module_argv("kproxy", *args, "-o", "json"), check=False, timeout=600
    )
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def test_status_and_explain_without_flags_read_the_running_agent(env: Env) -> None:
    vip = "10.96.0.93"
    pods = env.local_pods
    serve_nodeport(env, "bare", vip, 30093, scheduler="lc")

    # status: IPVS mode, node name, cluster CIDR... all from the agent; same rows as with flags
    rc, bare = kproxy_bare(env, "status")
    assert bare["mode"] == "ipvs" and bare["rules_from"] == "ipvsadm -Ln", bare
    assert bare["wanted_from"].startswith("the running agent (/run/kproxy/netns-")
    assert bare["agent"]["mode"] == "ipvs" and bare["agent"]["node_name"] == env.node.name
    rows = {tuple(r["addresses"]): r for r in bare["services"]}
    row = rows[(f"{vip}:80",)]
    want = sorted(f"{p.ip}:80" for p in pods)
    assert row["state"] == "ok" and row["expected_backends"] == want, row
    assert rows[(f"{env.node.ip}:30093",)]["state"] == "ok"
    assert rc == 0 and bare["ok"], [r["problems"] for r in bare["services"] if r["problems"]]
    _, flagged = kproxy_json(env, "status")

    def shape(doc: dict[str, Any]) -> dict[Any, Any]:
        return {
            tuple(r["addresses"]): (r["state"], r["expected_backends"], r["problems"])
            for r in doc["services"]
        }

    assert shape(bare) == shape(flagged)

    # explain from a pod: the virtual server with its scheduler, and the wanted endpoints
    rc, ex = kproxy_bare(env, "explain", f"{vip}:80/tcp", "--from", pods[0].ip)
    assert rc == 0 and ex["mode"] == "ipvs" and ex["result"] == "ipvs", ex["result"]
    vs = ex["ipvs"]["virtual_server"]
    assert (vs["address"], vs["scheduler"]) == (vip, "lc")
    assert ex["wanted"]["service"] == "default/bare:http" and not ex["wanted"]["differs"]
    assert sorted(ex["wanted"]["endpoints"]) == want
    _, ex_flags = kproxy_json(env, "explain", f"{vip}:80/tcp", "--from", pods[0].ip)
    assert ex_flags["wanted"]["endpoints"] == ex["wanted"]["endpoints"]
    assert {r["address"]: r["masquerade"] for r in vs["real_servers"]} == {
        r["address"]: r["masquerade"] for r in ex_flags["ipvs"]["virtual_server"]["real_servers"]
    }


def names_to_ips(batch: Batch, pods: list[Pod]) -> set[str]:
    by_name = {p.name: p.ip for p in pods}
    return {by_name[n] for n in batch.names}


# -- LoadBalancer addresses from a pool, announced on layer 2 (issue 13) ------------------------
# In IPVS mode every Service address, LoadBalancer addresses included, is bound to kube-ipvs0.
# With Linux's default arp_ignore=0 the node would then answer ARP for it on eth0 (every node
# would); with --lb-pool in IPVS mode kproxy sets strict ARP (arp_ignore=1, arp_announce=2, as
# MetalLB asks of kube-proxy), so only the elected node's responder answers while IPVS delivers
# the traffic. The agent reads manifests, so it is the whole cluster and allocates itself; the
# election among nodes and failover are tested in netns (tests/integration/test_lb_l2.py).
@dataclass
class LB:
    addresses: dict[str, tuple[str, str]]  # service -> (IPv4, IPv6) the allocator gave
    capture: Capture  # the frames the client saw from before the services existed


def lb_service(name: str, vips: list[str], node_port: int, **spec: Any) -> dict[str, Any]:
    """A dual-stack LoadBalancer of the pool's class: http 80/TCP and dns 53->5353/UDP."""
    dns = {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}
    return make_service_obj(
        "default",
        name,
        type="LoadBalancer",
        clusterIP=vips[0],
        clusterIPs=vips,
        ipFamilies=["IPv4", "IPv6"],
        ipFamilyPolicy="RequireDualStack",
        ports=[
            {
                "name": "http",
                "port": 80,
                "targetPort": 80,
                "protocol": "TCP",
                "nodePort": node_port,
            },
            {**dns, "nodePort": node_port + 1},
        ],
        **spec,
    )


def dual_stack_slices(name: str, pods: list[Pod]) -> list[dict[str, Any]]:
    return [
        make_slice_obj(
            "default",
            f"{name}-{fam}",
            name,
            [{"ip": ip, "node": p.node.name, "pod": p.name} for p, ip in addrs],
            [("http", 80, "TCP"), ("dns", 5353, "UDP")],
            address_type=f"IPv{fam}",
        )
        for fam, addrs in ((4, [(p, p.ip) for p in pods]), (6, [(p, p.ip6) for p in pods]))
    ]


def lb_report(env: Env) -> dict[str, Any]:
    """The agent's /lb document (what `kproxy status` shows of LoadBalancers)."""
    status, doc = _retry(http_json, env.node.ns, "127.0.0.1", 10249, path="/lb", timeout=5.0)
    assert status == 200, status
    return dict(doc)


def on_kube_ipvs0(env: Env) -> set[str]:
    out = env.run("ip", "-o", "addr", "show", "dev", "kube-ipvs0")
    return set(re.findall(r"inet6? ([0-9a-f.:]+)/(?:32|128)", out))


@pytest.fixture(scope="module")
def lb(env: Env) -> Iterator[LB]:
    """`lbweb` (node1's pods) and `lblocal` (externalTrafficPolicy Local, its one endpoint on
    node2), both dual-stack LoadBalancers that get their addresses from the agent's pools."""
    capture = Capture(env.lab.client.ns)
    try:
        env.api.upsert(lb_service("lbweb", ["10.96.5.80", "fd00:96::5:80"], 30580))
        env.api.upsert(
            lb_service(
                "lblocal",
                ["10.96.5.81", "fd00:96::5:81"],
                30582,
                externalTrafficPolicy="Local",
                healthCheckNodePort=32050,
            )
        )
        for obj in dual_stack_slices("lbweb", env.local_pods) + dual_stack_slices(
            "lblocal", [env.remote_pod]
        ):
            env.api.upsert(obj)

        def allocated() -> dict[str, tuple[str, str]]:
            rows = lb_report(env)["addresses"]
            got: dict[str, list[str]] = {}
            for row in rows:
                got.setdefault(row["service"].removeprefix("default/"), []).append(row["address"])
            assert sorted(got) == ["lblocal", "lbweb"], rows
            out = {}
            for name, ips in got.items():
                assert len(ips) == 2, rows  # one address per family, IPv4 first
                out[name] = (min(ips, key=lambda ip: ":" in ip), max(ips, key=lambda ip: ":" in ip))
            return out

        yield LB(eventually(allocated, timeout=60, step=1.0), capture)
    finally:
        capture.close()
        for name in ("lbweb", "lblocal"):
            env.api.delete("Service", "default", name)


def in_pool(ip: str) -> bool:
    first, last = (LB_POOL6 if ":" in ip else LB_POOL).split("-")
    return ip_address(first) <= ip_address(ip) <= ip_address(last)


def test_lb_pool_addresses_are_on_kube_ipvs0_with_virtual_servers_and_strict_arp(
    env: Env, lb: LB
) -> None:
    web4, web6 = lb.addresses["lbweb"]
    local4, local6 = lb.addresses["lblocal"]
    assert all(in_pool(ip) for ip in (web4, web6, local4, local6)), lb.addresses
    assert len({web4, web6, local4, local6}) == 4 and ":" in web6 + local6, lb.addresses
    # node1 announces lbweb's addresses; nobody lblocal's (no endpoint on node1)
    rows = {r["address"]: r["node"] for r in lb_report(env)["addresses"]}
    assert rows == {web4: "node1", web6: "node1", local4: "", local6: ""}, rows
    pods = [(p.ip, p.ip6) for p in env.local_pods]

    def programmed() -> None:
        table = env.ipvsadm()
        for fam, ip in enumerate((web4, web6)):
            for proto, port, target in (("TCP", 80, 80), ("UDP", 53, 5353)):
                assert (ip, proto, port) in table, f"{(ip, proto, port)} not in {sorted(table)}"
                assert set(table[(ip, proto, port)].dests) == {(a[fam], target) for a in pods}
        # lblocal's virtual servers exist too (pods reach the remote endpoint through them)
        assert {(local4, "TCP", 80), (local6, "UDP", 53)} <= set(table)
        assert {web4, web6, local4, local6} <= on_kube_ipvs0(env)

    eventually(programmed, timeout=30, step=0.5)

    # the takeover announcements (gratuitous ARP, unsolicited NA) came from node1 only
    def announcers() -> set[str]:
        v4, v6 = lb.capture.gratuitous(web4), lb.capture.gratuitous(web6)
        assert v4 and v6, "no gratuitous ARP / unsolicited NA seen"
        return {mac for _, mac in v4 + v6}

    assert eventually(announcers, timeout=10) == {mac_of(env.lab, env.node.ns)}
    assert not lb.capture.gratuitous(local4) and not lb.capture.gratuitous(local6)
    lb.capture.close()
    sysctls = env.run(
        "sysctl", "-n", "net.ipv4.conf.all.arp_ignore", "net.ipv4.conf.all.arp_announce"
    )
    assert sysctls.split() == ["1", "2"]


def test_lb_address_resolves_to_node1_only_and_reaches_the_pods_through_ipvs(
    env: Env, lb: LB
) -> None:
    web4, web6 = lb.addresses["lbweb"]
    node1 = mac_of(env.lab, env.node.ns)
    # ARP: node1's MAC, one reply per request (a kernel answering as well would double them)
    assert eventually(lambda: arping(env.lab, web4), timeout=20, step=0.5) == [node1] * 3
    assert solicit(env.lab, web6) == [node1] * 3  # NDP: the same
    client = env.lab.client.ns
    for ip in (web4, web6):
        batch = http_batch(client, ip, 80, n=6)
        assert batch.ok_count == 6 and names(batch) == {p.name for p in env.local_pods}, batch
    assert udp_query(client, web4, 53, n=2).all_ok
    # the client's own kernel resolved both addresses to node1 too
    neigh = env.lab.run(client, ["ip", "neigh", "show", "dev", "eth0"]).stdout
    for ip in (web4, web6):
        assert re.search(rf"^{re.escape(ip)} lladdr {node1}", neigh, re.M), neigh

    def counted() -> None:  # IPVS folds its counters in with up to ~2 s of lag
        stats = parse_stats(env.run("ipvsadm", "-Ln", "--stats", "--exact"))
        assert stats[k(web4, 80)][0].conns >= 6 and stats[k(web6, 80)][0].conns >= 6
        assert stats[k(web4, 53, "UDP")][0].conns >= 1

    eventually(counted, timeout=10, step=0.5)


def test_lb_address_only_on_kube_ipvs0_and_not_announced_gets_no_answer(env: Env, lb: LB) -> None:
    """lblocal: node1 has no endpoint, so nobody announces its addresses, though they sit on
    node1's kube-ipvs0; strict ARP keeps the kernel quiet (IPv6 never answers for another
    interface's address). Without strict ARP the kernel would answer: the check can fail."""
    local4, local6 = lb.addresses["lblocal"]
    assert {local4, local6} <= on_kube_ipvs0(env)
    assert arping(env.lab, local4, count=1) == []
    assert solicit(env.lab, local6, count=1) == []
    env.run("sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=0")
    try:
        assert arping(env.lab, local4, count=1) == [mac_of(env.lab, env.node.ns)]
    finally:
        env.run("sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1")
    assert arping(env.lab, local4, count=1) == []


def test_lb_deleted_service_stops_being_answered_and_leaves_kube_ipvs0(env: Env, lb: LB) -> None:
    """Both services go (the restart and cleanup tests that follow see none of them)."""
    web4, web6 = lb.addresses["lbweb"]
    assert arping(env.lab, web4, count=1)  # answered until the delete
    env.api.delete("Service", "default", "lbweb")
    env.api.delete("Service", "default", "lblocal")
    every = {ip for pair in lb.addresses.values() for ip in pair}

    def gone() -> None:
        assert not every & on_kube_ipvs0(env)
        assert not [key for key in env.ipvsadm() if key[0] in every]
        assert lb_report(env)["addresses"] == []

    eventually(gone, timeout=30, step=0.5)
    assert arping(env.lab, web4, count=1) == []
    assert solicit(env.lab, web6, count=1) == []


# -- restart and cleanup (last: they change the agent) -------------------------------------------
def shape(table: dict[Key, ListedService]) -> dict[Key, Any]:
    """What a restart must keep: services, schedulers, persistence, serving real servers
    (draining ones may finish draining meanwhile)."""
    return {
        key: (
            vs.scheduler,
            vs.persistent,
            {(a, p, d.weight) for (a, p), d in vs.dests.items() if d.weight > 0},
        )
        for key, vs in table.items()
    }


def test_restart_keeps_connections_and_the_table(env: Env) -> None:
    before = shape(env.ipvsadm())
    hold = start_hold(env.local_pods[0].ns, VIP, 80, interval=0.2, timeout=3.0)
    hold.wait_started(timeout=60)
    stream = start_stream(env.lab.client.ns, env.node.ip, 30080, interval=0.2, timeout=3.0)
    stream.wait_started(timeout=60)
    env.agent.stop()
    env.agent.start(wait=False)
    env.agent.wait_ready(timeout=300)
    time.sleep(1.0)
    stream.stop()
    hold.stop()
    streamed = stream.result(timeout=120)
    held = hold.result(timeout=120)
    assert held.ok, held.error
    assert streamed.failures == 0 and streamed.ok_count > 10
    assert shape(env.ipvsadm()) == before


def test_cleanup_leaves_nothing(env: Env) -> None:
    env.agent.stop()
    env.lab.run(
        env.node.ns,
        module_argv("kproxy", "cleanup", "--proxy-mode", "ipvs", "--cluster-cidr", CLUSTER_CIDR),
        timeout=600,
    )
    assert env.ipvsadm() == {}
    link = env.lab.run(env.node.ns, ["ip", "link", "show", "kube-ipvs0"], check=False)
    assert link.returncode != 0
    assert not [s for s in env.run("ipset", "list", "-n").split() if s.startswith("KUBE-")]
    for prog in ("iptables", "ip6tables"):
        for flavour in ("nft", "legacy"):
            save = env.run(f"{prog}-{flavour}-save")
            assert "KUBE-" not in save, f"{prog}-{flavour}: {save}"
