"""A port someone else holds (kube-proxy on 10256/10249, systemd-resolved or another DNS server on
:53) must not take kproxy down: one log line naming the address and the likely holder, no
traceback, services keep working, /healthz says what is not served, and the port is bound once
it is free."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from kproxy.lab.netlab import Lab
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_batch, http_get
from tests.integration.test_inspect_e2e import VIP, web_service, web_slice
from tests.support.agent import Agent, eventually, http_json
from tests.support.fakeapi import FakeApiServer

pytestmark = [pytest.mark.netns]

NODE_LOCAL = "169.254.20.10"

HOLD = """
import socket, sys, time
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND: the address may not exist yet
s.bind((host, port))
if kind == "tcp":
    s.listen()
print("held", flush=True)
time.sleep(3600)
"""

CLASHES = [
    pytest.param("healthz", "tcp", "127.0.0.1", 10256, "kube-proxy", id="healthz-10256"),
    pytest.param("metrics", "tcp", "127.0.0.1", 10249, "kube-proxy", id="metrics-10249"),
    pytest.param("DNS", "udp", NODE_LOCAL, 53, "systemd-resolved", id="dns-53"),
]


def dig(lab: Lab, ns: str, name: str) -> list[str]:
    out = lab.run(
        ns,
        ["dig", f"@{NODE_LOCAL}", "+time=1", "+tries=1", "+short", name],
        check=False,
    )
    return str(out.stdout).split()


@pytest.mark.parametrize(("name", "kind", "host", "port", "holder"), CLASHES)
def test_a_taken_port_is_logged_retried_and_bound_when_freed(
    lab: Lab,
    cluster_api: tuple[FakeApiServer, str],
    name: str,
    kind: str,
    host: str,
    port: int,
    holder: str,
) -> None:
    api, kubeconfig = cluster_api
    node, pod = lab.nodes[0], lab.pods[0]
    serve_pods(lab, tcp=[80])
    api.upsert(web_service())
    api.upsert(web_slice(lab.pods))
    hold = lab.spawn(node.ns, [sys.executable, "-c", HOLD, kind, host, str(port)])
    eventually(lambda: "held" in lab.read_log(hold), timeout=10)

    dns = name == "DNS"
    agent = Agent(
        lab, node, kubeconfig, dns=dns, extra=["--dns-upstream", "127.0.0.1:9"] if dns else []
    )
    agent.start(wait=False)
    address = f"{host}:{port}"

    def logged() -> list[str]:
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()
        text = agent.log()
        assert "synced all rules" in text
        lines = [line for line in text.splitlines() if f"cannot listen on {address}" in line]
        assert lines, text
        return lines

    lines = eventually(logged, timeout=30)
    assert len(lines) == 1, lines
    assert f"for {name}: address already in use" in lines[0] and holder in lines[0], lines[0]
    assert "proxying continues" in lines[0]
    assert "Traceback" not in agent.log()

    # proxying works meanwhile
    batch = http_batch(pod.ns, VIP, 80, n=20)
    assert batch.ok_count == 20, batch.errors
    # /healthz (on the metrics port when the healthz port is the taken one) says what is missing
    health_port = 10249 if name == "healthz" else 10256
    status, body = http_json(node.ns, "127.0.0.1", health_port, path="/healthz")
    assert status == 200 and body["unbound"] == {f"{name} {address}": "address already in use"}
    if dns:
        assert VIP not in dig(lab, pod.ns, "web.default.svc.cluster.local")  # the holder is mute

    lab.stop(hold)

    def bound() -> Any:
        assert f"now listening on {address} for {name}" in agent.log()
        status, body = http_json(node.ns, "127.0.0.1", 10256, path="/healthz")
        assert status == 200 and "unbound" not in body, body
        return True

    eventually(bound, timeout=30)
    if name == "metrics":
        res = http_get(node.ns, "127.0.0.1", 10249, path="/metrics", timeout=2.0)
        assert res.ok and "kproxy_sync_proxy_rules_last_timestamp_seconds" in res.body
        # kube-proxy's /configz: the settings in effect
        status, body = http_json(node.ns, "127.0.0.1", 10249, path="/configz")
        config = body["kubeproxy.config.k8s.io"]
        assert (status, config["mode"], config["hostnameOverride"]) == (200, "iptables", node.name)
    if dns:
        eventually(lambda: dig(lab, pod.ns, "web.default.svc.cluster.local") == [VIP], timeout=15)
    assert "Traceback" not in agent.log()
    assert agent.stop() == 0
