#!/usr/bin/env python3
"""LoadBalancer failover time in the namespace lab (issue 13's performance target).

Three node namespaces on one bridge with the outside client, a fake apiserver, the real agents
with `--lb-pool` and the default 2 s agent lease, one LoadBalancer service over a pod per node.
Each round takes the address's current owner away and measures, from the client:

sigkill   the owner's agent is SIGKILLed and its node's link goes down at once (the node died):
          time until the client's HTTP requests to the address succeed again (through the next
          node in the hash order, after its gratuitous ARP). Target p50 <= 3 s.
sigterm   the owner's agent gets SIGTERM (a clean stop; the node stays up): time until the
          successor's gratuitous ARP reaches the client (from then on the client sends to the
          successor). Target p50 <= 1 s.

After each round the node and its agent come back and the address returns to it (same hash).

    sudo python3 benchmarks/lb_failover_bench.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kproxy.lab.netlab import Lab
from kproxy.lab.servers import serve_pods
from kproxy.lab.traffic import http_get
from kproxy.lb.select import announcer
from tests.support.agent import Agent, serve_cluster_api
from tests.support.l2 import Capture, arping, mac_of
from tests.support.objects import make_service_obj, make_slice_obj

IP = "192.168.50.200"


def wait(check: object, timeout: float, step: float = 0.02) -> float:
    """Seconds until check() is truthy; raises after timeout."""
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not met")
        time.sleep(step)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    with Lab.create(nodes=3, pods_per_node=1, prefix="kplbb") as lab:  # noqa: SIM117
        with serve_cluster_api(lab) as (api, kubeconfig):
            serve_pods(lab, tcp=[80])
            extra = ["--lb-pool", "192.168.50.200-192.168.50.210", "--lb-lease-duration", "2s"]
            agents = [Agent(lab, n, kubeconfig, extra=extra) for n in lab.nodes]
            for a in agents:
                a.start(wait=False)
            for a in agents:
                a.wait_ready(60)
            api.upsert(
                make_service_obj(
                    "default",
                    "web",
                    type="LoadBalancer",
                    clusterIP="10.96.0.80",
                    ports=[{"name": "http", "port": 80, "targetPort": 80, "nodePort": 30080}],
                )
            )
            api.upsert(
                make_slice_obj(
                    "default",
                    "web-abc12",
                    "web",
                    [{"ip": p.ip, "node": p.node.name, "pod": p.name} for p in lab.pods],
                    [("http", 80, "TCP")],
                )
            )
            names = [n.name for n in lab.nodes]
            macs = {n.name: mac_of(lab, n.ns) for n in lab.nodes}
            owner = announcer(IP, names)
            assert owner is not None
            successor = announcer(IP, [n for n in names if n != owner])
            i = names.index(owner)
            node, agent = lab.nodes[i], agents[i]
            wait(lambda: set(arping(lab, IP, 1)) == {macs[owner]}, 30, 0.2)
            kill: list[float] = []
            term: list[float] = []
            for _ in range(args.rounds):
                capture = Capture(lab.client.ns)
                t0 = time.monotonic()
                agent.stop(signal.SIGKILL)
                lab.run(node.ns, ["ip", "link", "set", "eth0", "down"])
                wait(lambda: http_get(lab.client.ns, IP, 80, timeout=0.2).ok, 30)
                kill.append(time.monotonic() - t0)
                capture.close()
                lab.run(node.ns, ["ip", "link", "set", "eth0", "up"])
                lab.run(node.ns, ["ip", "route", "replace", "default", "via", lab.fabric_ip])
                agent.start()
                wait(lambda: set(arping(lab, IP, 1)) == {macs[owner]}, 30, 0.2)
                time.sleep(1.0)  # let the returning owner's announcements finish

                capture = Capture(lab.client.ns)
                t0 = time.monotonic()
                agent.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

                def announced(c: Capture = capture, since: float = t0) -> bool:
                    return any(m == macs[successor] and t >= since for t, m in c.gratuitous(IP))

                wait(announced, 30)
                term.append(time.monotonic() - t0)
                capture.close()
                agent.proc.wait(15)  # type: ignore[union-attr]
                agent.start()
                wait(lambda: set(arping(lab, IP, 1)) == {macs[owner]}, 30, 0.2)
                time.sleep(1.0)
            for label, xs in (("sigkill -> traffic", kill), ("sigterm -> successor GARP", term)):
                print(
                    f"{label:26} p50 {statistics.median(xs):.2f} s  max {max(xs):.2f} s  "
                    f"({', '.join(f'{x:.2f}' for x in xs)})"
                )


if __name__ == "__main__":
    main()
