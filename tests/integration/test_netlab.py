"""The namespace lab itself, checked with real traffic and no kproxy: routing between client,
nodes and pods, the servers' replies, the traffic helpers' failure kinds, and teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from kproxy.lab.netlab import Lab, LabCommandError, cleanup_stale
from kproxy.lab.nsexec import helper_env
from kproxy.lab.servers import serve_pods, start_server
from kproxy.lab.traffic import (
    http_batch,
    http_get,
    http_many,
    http_names,
    start_hold,
    start_stream,
    udp_query,
    wait_http,
)

pytest_plugins = ["tests.support.lab"]
pytestmark = pytest.mark.netns

HTTP, UDP = 8080, 5353


def _netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_client_reaches_every_pod_unnatted(lab: Lab) -> None:
    serve_pods(lab, tcp=(HTTP,), udp=(UDP,))
    for pod in lab.pods:
        got = http_get(lab.client.ns, pod.ip, HTTP)
        assert got.ok, got
        assert got.name == pod.name
        assert got.client_ip == lab.client.ip
        assert got.fields["server"] == f"{pod.ip}:{HTTP}"


def test_pods_reach_pods_on_other_nodes(lab2: Lab) -> None:
    serve_pods(lab2, tcp=(HTTP,))
    for src in lab2.pods:
        remote = [p for p in lab2.pods if p.node != src.node]
        got = http_many(src.ns, [(p.ip, HTTP) for p in remote])
        assert got.all_ok, (src.name, got.errors)
        assert [(r.name, r.client_ip) for r in got.results] == [(p.name, src.ip) for p in remote]


def test_nodes_and_pods_reach_each_other(lab2: Lab) -> None:
    serve_pods(lab2, tcp=(HTTP,))
    for node in lab2.nodes:
        start_server(lab2, node.ns, name=node.name, tcp=(HTTP,))
    for node in lab2.nodes:
        to_pods = http_many(node.ns, [(p.ip, HTTP) for p in lab2.pods])
        # A node reaches its own pods from its pod-network gateway address, others unNATted.
        assert [(r.name, r.client_ip) for r in to_pods.results] == [
            (p.name, node.gateway if p.node == node else node.ip) for p in lab2.pods
        ]
        from_client = http_get(lab2.client.ns, node.ip, HTTP)
        assert (from_client.name, from_client.client_ip) == (node.name, lab2.client.ip)
    for pod in lab2.pods:
        to_nodes = http_many(pod.ns, [(n.ip, HTTP) for n in lab2.nodes])
        assert [(r.name, r.client_ip) for r in to_nodes.results] == [
            (n.name, pod.ip) for n in lab2.nodes
        ]


def test_fabric_hosts_a_server_every_namespace_reaches(lab2: Lab) -> None:
    # Where a shared fake apiserver listens in two-node tests.
    start_server(lab2, lab2.fabric_ns, name="control-plane", tcp=(HTTP,))
    for ns, src in [
        *((n.ns, n.ip) for n in lab2.nodes),
        *((p.ns, p.ip) for p in lab2.pods),
        (lab2.client.ns, lab2.client.ip),
    ]:
        got = http_get(ns, lab2.fabric_ip, HTTP)
        assert (got.name, got.client_ip) == ("control-plane", src), (ns, got)


def test_batch_makes_a_new_connection_per_request(lab: Lab) -> None:
    serve_pods(lab, tcp=(HTTP,))
    pod = lab.pods[0]
    batch = http_batch(lab.client.ns, pod.ip, HTTP, n=40)
    assert batch.all_ok, batch.errors
    assert batch.names == {pod.name: 40}
    assert batch.clients == {lab.client.ip: 40}
    assert len({r.client_port for r in batch.results}) == 40
    assert http_names(lab.client.ns, pod.ip, HTTP, n=5) == {pod.name: 5}


def test_no_listener_is_refused_at_once_and_drop_times_out(lab: Lab) -> None:
    client, target = lab.pods[0], lab.pods[1]
    start_server(lab, target.ns, name=target.name, tcp=(HTTP,), udp=(UDP,))
    refused = http_get(client.ns, target.ip, HTTP + 1, timeout=2.0)
    assert refused.error_kind == "refused"
    assert refused.elapsed < 1.0
    udp_refused = udp_query(client.ns, target.ip, UDP + 1, timeout=2.0).results[0]
    assert udp_refused.error_kind == "refused"
    assert udp_refused.elapsed < 1.0

    for proto, port in (("tcp", HTTP), ("udp", UDP)):
        drop = ["iptables", "-A", "INPUT", "-p", proto, "--dport", str(port), "-j", "DROP"]
        lab.run(target.ns, drop)
    dropped = http_get(client.ns, target.ip, HTTP, timeout=0.3)
    assert dropped.error_kind == "timeout"
    assert dropped.elapsed >= 0.3
    udp_dropped = udp_query(client.ns, target.ip, UDP, timeout=0.3).results[0]
    assert udp_dropped.error_kind == "timeout"


def test_reject_with_host_unreachable_is_unreachable(lab: Lab) -> None:
    client, target = lab.pods[0], lab.pods[1]
    reject = ["iptables", "-A", "INPUT", "-p", "tcp", "-j", "REJECT"]
    lab.run(target.ns, [*reject, "--reject-with", "icmp-host-unreachable"])
    got = http_get(client.ns, target.ip, HTTP, timeout=2.0)
    assert got.error_kind == "unreachable"
    assert got.elapsed < 1.0


def test_unclaimed_service_ip_has_a_route_and_dies_quietly(lab: Lab) -> None:
    # No kproxy: a ClusterIP nobody DNATs must time out (a route exists), never fail with
    # "network unreachable", from the node itself and from a pod.
    for ns in (lab.nodes[0].ns, lab.pods[0].ns):
        got = http_get(ns, "10.96.0.10", 80, timeout=0.3)
        assert got.error_kind == "timeout", (ns, got)


def test_udp_keeps_a_fixed_source_port_across_calls(lab: Lab) -> None:
    serve_pods(lab, tcp=(), udp=(UDP,))
    pod = lab.pods[2]
    first = udp_query(lab.pods[0].ns, pod.ip, UDP, src_port=40123, n=3)
    second = udp_query(lab.pods[0].ns, pod.ip, UDP, src_port=40123)
    replies = [*first.results, *second.results]
    assert all(r.ok for r in replies), replies
    assert {(r.name, r.client_ip, r.client_port) for r in replies} == {
        (pod.name, lab.pods[0].ip, 40123)
    }


def test_stream_counts_successes_and_sees_a_dead_server(lab: Lab) -> None:
    pod = lab.pods[0]
    (server,) = serve_pods(lab, [pod], tcp=(HTTP,)).values()
    healthy = start_stream(lab.client.ns, pod.ip, HTTP, duration=0.4, interval=0.02)
    result = healthy.result()
    assert result.failures == 0
    assert result.ok_count >= 5
    assert result.names == {pod.name: result.ok_count}

    broken = start_stream(lab.client.ns, pod.ip, HTTP, interval=0.02, timeout=0.2)
    broken.wait_started()
    time.sleep(0.2)
    lab.stop(server)
    time.sleep(0.2)
    broken.stop()
    outcome = broken.result()
    assert outcome.ok_count > 0
    assert outcome.errors["refused"] > 0


def test_hold_keeps_one_connection_and_notices_when_it_breaks(lab: Lab) -> None:
    pod = lab.pods[1]
    (server,) = serve_pods(lab, [pod], tcp=(HTTP,)).values()
    hold = start_hold(lab.client.ns, pod.ip, HTTP, interval=0.02)
    hold.wait_started()
    time.sleep(0.3)
    hold.stop()
    kept = hold.result()
    assert kept.ok, kept.error
    assert len(kept.exchanges) >= 3
    assert {r.client_port for r in kept.exchanges} == {kept.local[1]}
    assert kept.names == {pod.name: len(kept.exchanges)}

    broken = start_hold(lab.client.ns, pod.ip, HTTP, interval=0.02, timeout=0.5)
    broken.wait_started()
    time.sleep(0.1)
    lab.stop(server)
    lost = broken.result(timeout=10)
    assert not lost.ok
    assert lost.exchanges
    assert lost.error_kind in {"closed", "reset", "refused"}


def test_wait_http_retries_until_a_server_comes_up(lab: Lab) -> None:
    pod = lab.pods[0]
    not_yet = wait_http(lab.client.ns, pod.ip, HTTP, deadline=0.2, timeout=0.1)
    assert not not_yet.ok
    start_server(lab, pod.ns, name="late", tcp=(HTTP,))
    up = wait_http(lab.client.ns, pod.ip, HTTP, deadline=5, expect="name=late")
    assert up.ok and up.name == "late"


def test_dual_stack_lab_routes_ipv6(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=2, pods_per_node=1, ipv6=True)
    serve_pods(lab, tcp=(HTTP,), udp=(UDP,))
    a, b = lab.pods
    assert a.ip6 and b.ip6 and lab.client.ip6
    across = http_get(a.ns, b.ip6, HTTP)
    assert (across.name, across.client_ip) == (b.name, a.ip6)
    from_client = http_get(lab.client.ns, a.ip6, HTTP)
    assert (from_client.name, from_client.client_ip) == (a.name, lab.client.ip6)
    udp = udp_query(lab.client.ns, b.ip6, UDP).results[0]
    assert (udp.name, udp.client_ip) == (b.name, lab.client.ip6)
    # IPv4 keeps working beside it.
    assert http_get(a.ns, b.ip, HTTP).client_ip == a.ip


def test_added_pod_is_routed_and_removed_pod_is_gone(lab2: Lab) -> None:
    pod = lab2.add_pod(1, name="late-pod")
    assert pod.node is lab2.nodes[1]
    assert pod.ip not in {p.ip for p in lab2.pods if p is not pod}
    start_server(lab2, pod.ns, name=pod.name, tcp=(HTTP,))
    assert http_get(lab2.pods[0].ns, pod.ip, HTTP).name == "late-pod"
    lab2.remove_pod(pod)
    assert pod.ns not in _netns_list()
    assert not http_get(lab2.client.ns, pod.ip, HTTP, timeout=0.3).ok


def test_parallel_labs_share_addresses_without_colliding(lab_factory: Callable[..., Lab]) -> None:
    first, second = lab_factory(nodes=1, pods_per_node=1), lab_factory(nodes=1, pods_per_node=1)
    assert not set(first.namespaces) & set(second.namespaces)
    assert first.pods[0].ip == second.pods[0].ip
    start_server(first, first.pods[0].ns, name="first", tcp=(HTTP,))
    start_server(second, second.pods[0].ns, name="second", tcp=(HTTP,))
    assert http_get(first.client.ns, first.pods[0].ip, HTTP).name == "first"
    assert http_get(second.client.ns, second.pods[0].ip, HTTP).name == "second"


def test_run_reports_stderr_on_failure(lab: Lab) -> None:
    with pytest.raises(LabCommandError, match="nosuchdev"):
        lab.run(lab.nodes[0].ns, ["ip", "link", "show", "nosuchdev"])
    assert lab.run(lab.nodes[0].ns, ["ip", "link", "show", "nosuchdev"], check=False).returncode


def test_teardown_kills_processes_and_deletes_namespaces(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(nodes=2, pods_per_node=3)
    tracked = lab.spawn(lab.pods[0].ns, ["sleep", "60"])
    untracked = subprocess.Popen(
        ["ip", "netns", "exec", lab.nodes[1].ns, "sleep", "60"], start_new_session=True
    )
    names = set(lab.namespaces)
    assert len(names) == 2 + 2 + 6
    assert names <= _netns_list()
    lab.teardown()
    untracked.wait(timeout=5)
    assert untracked.returncode == -signal.SIGKILL
    assert tracked.poll() is not None and not _alive(tracked.pid)
    assert not names & _netns_list()
    assert not lab.workdir.exists()
    lab.teardown()  # idempotent
    # Shown with `pytest -rP`: how long a 2-node, 6-pod lab took to build and to tear down.
    print(f"lab create {lab.timings['create']:.3f}s teardown {lab.timings['teardown']:.3f}s")


def test_cleanup_stale_removes_only_labs_of_dead_processes(lab: Lab) -> None:
    script = (
        "import os, signal\n"
        "from kproxy.lab.netlab import Lab\n"
        "lab = Lab.create(nodes=1, pods_per_node=1, prefix='kplstale')\n"
        "lab.spawn(lab.pods[0].ns, ['sleep', '60'])\n"
        "print(' '.join(lab.namespaces), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    leaked = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=helper_env(),
        check=False,
    )
    names = set(leaked.stdout.split())
    assert len(names) == 4, leaked.stderr
    assert names <= _netns_list()
    removed = cleanup_stale()
    assert names <= set(removed)
    assert not names & _netns_list()
    assert set(lab.namespaces) <= _netns_list()  # a live lab is left alone


def test_spawn_logs_output(lab: Lab) -> None:
    script = "echo addresses=$(ip -o -4 addr show eth0 | wc -l)"
    proc = lab.spawn(lab.client.ns, ["sh", "-c", script])
    assert proc.wait(timeout=5) == 0
    assert lab.read_log(proc).strip() == "addresses=1"
