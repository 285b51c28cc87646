"""`kproxy demo`: the classic Services lab in throwaway network namespaces, with kproxy in it.

Builds one node namespace with four routed pods (nginx-1..3 and mysql-0) and an outside client,
starts kproxy in the node against the bundled manifests (kproxy/examples/classic-lab.yaml), then
shows what a student would try: a NodePort from outside spreading over the pods, the
LoadBalancer service getting an address from a pool (--lb-pool) that the client reaches by ARP,
the database
ClusterIP from inside a pod, cluster DNS, and the rules that did it. Everything is torn down at
the end (the rules live in the node namespace, so they go with it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from kproxy.lab.netlab import Lab
from kproxy.lab.nsexec import module_argv
from kproxy.lab.servers import start_servers
from kproxy.lab.traffic import http_batch, http_get, wait_http

NODE_NAME = "lab-node"
NODEPORT = 30080
LB_POOL = "192.168.50.240-192.168.50.250"  # on the client's segment: reached by ARP
MYSQL_VIP = "10.96.100.50"
DNS_IP = "169.254.20.10"


def agent_argv(manifests: Path, proxy_mode: str, *extra: str) -> list[str]:
    """`kproxy run` for a lab node: the lab's manifests, node name and cluster CIDR, syncs at
    once, health and metrics on the node's loopback; `extra` adds flags (DNS, pools)."""
    return module_argv(
        "kproxy",
        "run",
        "--manifests",
        str(manifests),
        "--hostname-override",
        NODE_NAME,
        "--proxy-mode",
        proxy_mode,
        "--cluster-cidr",
        "10.244.0.0/16",
        "--iptables-min-sync-period",
        "0s",
        "--healthz-bind-address",
        "127.0.0.1:10256",
        "--metrics-bind-address",
        "127.0.0.1:10249",
        *extra,
    )


def _say(text: str = "") -> None:
    print(text, flush=True)


def _title(text: str) -> None:
    _say()
    _say(f"== {text}")


def _manifests(into: Path) -> Path:
    src = resources.files("kproxy").joinpath("examples/classic-lab.yaml")
    target = into / "manifests"
    target.mkdir()
    (target / "classic-lab.yaml").write_text(src.read_text())
    return target


def _show(lab: Lab, ns: str, argv: list[str], *, grep: str = "") -> None:
    out = lab.run(ns, argv, capture_output=True, text=True, check=False).stdout
    lines = [line for line in out.splitlines() if grep in line] if grep else out.splitlines()
    for line in lines:
        _say(f"    {line}")


def _loadbalancer(lab: Lab) -> None:
    """nginx-loadbalancer gets an EXTERNAL-IP from the pool; the client finds it by ARP."""
    _title(f"LoadBalancer nginx-loadbalancer: an address from the pool {LB_POOL}")
    node = lab.nodes[0]
    address = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not address:
        res = http_get(node.ns, "127.0.0.1", 10249, timeout=1.0, path="/lb")
        try:
            rows = json.loads(res.body).get("addresses") or [] if res.ok else []
        except ValueError:
            rows = []
        address = next(
            (r["address"] for r in rows if r["service"] == "default/nginx-loadbalancer"), ""
        )
        if not address:
            time.sleep(0.2)
    if not address:
        _say("  no address was assigned (see the kproxy log)")
        return
    _say(f"  EXTERNAL-IP {address}, announced by {NODE_NAME}")
    if shutil.which("arping"):
        _say(f"  arping from the client (who answers ARP for {address}?):")
        _show(
            lab,
            lab.client.ns,
            ["arping", "-I", "eth0", "-c", "2", "-w", "3", address],
            grep="reply",
        )
    ready = wait_http(lab.client.ns, address, 80, deadline=10.0, expect="nginx")
    if not ready.ok:
        _say(f"  the client cannot reach {address}:80 ({ready.error_kind})")
        return
    batch = http_batch(lab.client.ns, address, 80, n=6)
    _say(f"  6 requests from the client to {address}:80:")
    for name, count in sorted(batch.names.items()):
        _say(f"  {name}: {'#' * count} {count}")


def run_demo(*, keep: bool = False, proxy_mode: str = "iptables") -> int:
    if os.geteuid() != 0:
        print("kproxy demo needs root (network namespaces): sudo kproxy demo", file=sys.stderr)
        return 1
    if shutil.which("ip") is None or shutil.which("iptables-restore") is None:
        print("kproxy demo needs iproute2 and iptables installed", file=sys.stderr)
        return 1
    _title("building the lab: one node, four pods, one outside client")
    with Lab.create(nodes=1, prefix="kpdemo") as lab:
        node = lab.nodes[0]
        nginx = [lab.add_pod(0, f"nginx-{i}") for i in (1, 2, 3)]
        mysql = lab.add_pod(0, "mysql-0")
        start_servers(lab, [(p.ns, p.name) for p in nginx], tcp=[80])
        start_servers(lab, [(mysql.ns, mysql.name)], tcp=[3306])
        _say(f"  node {NODE_NAME}: {node.ip} (namespace {node.ns})")
        for pod in [*nginx, mysql]:
            _say(f"  pod {pod.name}: {pod.ip}")
        _say(f"  client (outside the cluster): {lab.client.ip}")

        manifests = _manifests(lab.workdir)
        argv = agent_argv(
            manifests, proxy_mode, "--dns-listen", f"{DNS_IP}:53", "--lb-pool", LB_POOL
        )
        _title(f"starting kproxy in the node: kproxy run --manifests {manifests}")
        log_path = lab.workdir / "kproxy.log"
        with open(log_path, "wb") as log_file:
            agent = lab.spawn(node.ns, argv, stdout=log_file, stderr=subprocess.STDOUT)
        ready = wait_http(lab.client.ns, node.ip, NODEPORT, deadline=20.0, expect="nginx")
        if not ready.ok:
            _say(f"  kproxy did not program the rules in time; its log ({log_path}):")
            _say(log_path.read_text()[-3000:])
            return 1
        _say("  rules programmed")

        _title(f"9 requests from the client to the NodePort {node.ip}:{NODEPORT}")
        batch = http_batch(lab.client.ns, node.ip, NODEPORT, n=9)
        for name, count in sorted(batch.names.items()):
            _say(f"  {name}: {'#' * count} {count}")

        _loadbalancer(lab)

        _title(f"from pod nginx-1 to mysql-service {MYSQL_VIP}:3306 (ClusterIP)")
        one = http_batch(nginx[0].ns, MYSQL_VIP, 3306, n=1).results[0]
        _say(f"  answered by: {one.body.strip() if one.ok else one.error_kind}")

        _title(f"cluster DNS on {DNS_IP} (from the node)")
        if shutil.which("dig"):
            for name in (
                "mysql-service.default.svc.cluster.local",
                "web-headless.default.svc.cluster.local",
                "web-0.web-headless.default.svc.cluster.local",
                "nginx-external.default.svc.cluster.local",
            ):
                out = lab.run(
                    node.ns,
                    ["dig", "+short", "+time=1", "+tries=1", f"@{DNS_IP}", name],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                answers = " ".join(out.stdout.split()) or "(no answer)"
                _say(f"  {name} -> {answers}")
        else:
            _say("  (install dig, package bind9-dnsutils, to see DNS answers)")

        _title("the NAT rules that did it (iptables -t nat -S, nginx-nodeport's chains)")
        _show(lab, node.ns, ["iptables-save", "-t", "nat"], grep="default/nginx-nodeport")

        _title(f"kproxy explain {node.ip}:{NODEPORT} --from {lab.client.ip}")
        _show(
            lab,
            node.ns,
            module_argv("kproxy", "explain", f"{node.ip}:{NODEPORT}/tcp", "--from", lab.client.ip),
        )

        if proxy_mode == "userspace":
            _title("kproxy status: the proxy's listeners, their endpoints and the next in turn")
            _show(lab, node.ns, module_argv("kproxy", "status"))

        if keep:
            _title(f"lab is up; try: ip netns exec {lab.client.ns} curl {node.ip}:{NODEPORT}")
            _say("  Ctrl-C to tear it down")
            try:
                while agent.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        _title("tearing the lab down")
    _say("done")
    return 0
