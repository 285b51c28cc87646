#!/usr/bin/env python3
"""The dataplane modes side by side on one lab: requests/s, latency and bulk throughput through a
ClusterIP in each mode, next to pod-to-pod direct.

One throwaway lab (a node namespace, three routed pods; nothing outside the namespaces is
touched). Pod `bench-client` runs the load, pod `web` serves HTTP (benchmarks/fast_http.py) and
iperf3. Two ClusterIP services with that one pod as their only endpoint, so every row does the
same server work:

    web    10.96.0.80:80   -> web:80      short HTTP requests (wrk, a new connection each)
    bulk   10.96.0.81:5201 -> web:5201    one bulk TCP transfer (iperf3, client -> server)

Rows: `direct` (the pod's own IP: no proxy at all), then each mode kproxy offers here
(iptables, nftables, userspace; not IPVS, which needs the VM kernel). For each mode a real
`kproxy run --manifests` starts in the node, is waited for, measured, stopped, and
`kproxy cleanup` removes its rules before the next mode.

Columns: wrk's requests/s and p50/p99 latency at `--connections` concurrent connections for
`--seconds` s with `Connection: close` (a new connection per request), with the share of direct;
iperf3's received throughput (Gbit/s) and its share of direct; CPU time per request during the
wrk run of the kproxy process ("cpu us/r", with its user-space share: the userspace proxy's own
cost, near zero for the kernel modes, whose work happens in softirq context charged to the
sending processes), of the HTTP server ("srv") and of wrk; and "est. 2cpu": the requests/s
that this CPU per request of client, server and proxy would allow on two otherwise idle cores,
the proxy's single thread on at most one of them. On a shared machine the measured requests/s
say more about the neighbours than about kproxy; the CPU per request and the estimate do not.

    sudo python3 benchmarks/modes_bench.py [--seconds 5] [--connections 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kproxy.config import MODES
from kproxy.lab.demo import NODE_NAME, agent_argv
from kproxy.lab.netlab import Lab, Pod
from kproxy.lab.nsexec import module_argv
from kproxy.lab.traffic import wait_http

WEB_VIP = "10.96.0.80"
BULK_VIP = "10.96.0.81"
HERE = Path(__file__).resolve().parent

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: bench}}
spec:
  clusterIP: {web_vip}
  ports: [{{name: http, port: 80, targetPort: 80, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: bench
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 80, protocol: TCP}}]
endpoints: [{{addresses: ["{ip}"], conditions: {{ready: true}}, nodeName: {node}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: bulk, namespace: bench}}
spec:
  clusterIP: {bulk_vip}
  ports: [{{name: iperf, port: 5201, targetPort: 5201, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bulk-1
  namespace: bench
  labels: {{kubernetes.io/service-name: bulk}}
addressType: IPv4
ports: [{{name: iperf, port: 5201, protocol: TCP}}]
endpoints: [{{addresses: ["{ip}"], conditions: {{ready: true}}, nodeName: {node}}}]
"""


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res: dict[str, float] = {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": float(total.group(1)) if total else 0.0,
        "errors": float(sum(int(g) for g in errors.groups()) if errors else 0)
        + float(non2xx.group(1) if non2xx else 0),
    }
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = _ms(m.group(1)) if m else float("nan")
    return res


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run_wrk(lab: Lab, client: Pod, ip: str, *, seconds: float, conns: int) -> dict[str, float]:
    argv = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{seconds:g}s",
        "--latency",
        "-H",
        "Connection: close",
        f"http://{ip}:80/",
    ]
    out = lab.run(client.ns, argv, capture_output=True, text=True, check=False)
    return parse_wrk(out.stdout)


def run_iperf(lab: Lab, client: Pod, ip: str, *, seconds: float) -> float:
    """Gbit/s received by the server in one TCP stream."""
    argv = ["iperf3", "-c", ip, "-p", "5201", "-t", str(seconds), "-J"]
    out = lab.run(client.ns, argv, capture_output=True, text=True, check=False)
    try:
        doc = json.loads(out.stdout)
        return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError):
        print(f"  iperf3 failed: {out.stdout[-300:]} {out.stderr[-300:]}", file=sys.stderr)
        return 0.0


def measure(
    lab: Lab,
    client: Pod,
    web_ip: str,
    bulk_ip: str,
    *,
    seconds: float,
    conns: int,
    pid: int | None,
    server_pid: int,
) -> dict[str, Any]:
    before = cpu_times(pid) if pid else (0.0, 0.0)
    server_before = cpu_times(server_pid)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk = run_wrk(lab, client, web_ip, seconds=seconds, conns=conns)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_used = (children_after.ru_utime + children_after.ru_stime) - (
        children.ru_utime + children.ru_stime
    )
    after = cpu_times(pid) if pid else (0.0, 0.0)
    server_after = cpu_times(server_pid)
    user, system = after[0] - before[0], after[1] - before[1]
    used = user + system
    server_used = sum(server_after) - sum(server_before)
    time.sleep(0.5)
    gbps = run_iperf(lab, client, bulk_ip, seconds=seconds)
    row: dict[str, Any] = dict(wrk)
    row["gbps"] = gbps
    row["proxy_cpu_s"] = used
    row["proxy_us_per_req"] = (used / wrk["requests"] * 1e6) if pid and wrk["requests"] else None
    row["proxy_user_share"] = user / used if used else None
    row["server_us_per_req"] = server_used / wrk["requests"] * 1e6 if wrk["requests"] else None
    row["client_us_per_req"] = client_used / wrk["requests"] * 1e6 if wrk["requests"] else None
    return row


def start_agent(lab: Lab, mode: str, manifests: Path) -> subprocess.Popen[Any]:
    argv = agent_argv(manifests, mode, "--no-dns")
    return lab.spawn(lab.nodes[0].ns, argv, log=f"kproxy-{mode}")


def cleanup(lab: Lab) -> None:
    lab.run(lab.nodes[0].ns, module_argv("kproxy", "cleanup"), capture_output=True, check=False)


def available_modes() -> list[str]:
    out = [m for m in MODES if m != "ipvs"]  # IPVS needs the VM's kernel
    if "nftables" in out and shutil.which("nft") is None:
        out.remove("nftables")
    return out


def capacity(row: dict[str, Any]) -> str:
    """Requests/s this CPU cost per request would allow on 2 otherwise idle cores: all three
    processes' CPU shared over both, and the single-threaded proxy at most one core. An
    estimate for a quiet machine (softirq work outside these processes is not counted)."""
    proxy = row["proxy_us_per_req"] or 0.0
    total = proxy + (row["server_us_per_req"] or 0.0) + (row["client_us_per_req"] or 0.0)
    if not total:
        return "-"
    bound = 2e6 / total
    if proxy:
        bound = min(bound, 1e6 / proxy)
    return f"{bound:.0f}"


def fmt(row: dict[str, Any], direct: dict[str, Any]) -> str:
    share = row["gbps"] / direct["gbps"] if direct["gbps"] else 0.0
    rshare = row["rps"] / direct["rps"] if direct["rps"] else 0.0
    cpu = row["proxy_us_per_req"]
    user = row["proxy_user_share"]
    srv = row["server_us_per_req"]
    cli = row["client_us_per_req"]
    return (
        f"{row['name']:<10} {row['rps']:>9.0f} {rshare:>6.0%} {row['p50_ms']:>8.2f} "
        f"{row['p99_ms']:>8.2f} {row['gbps']:>8.2f} {share:>6.0%} "
        f"{'-' if cpu is None else f'{cpu:.0f}':>9} "
        f"{'-' if user is None else f'{user:.0%}':>6} "
        f"{'-' if srv is None else f'{srv:.0f}':>9} "
        f"{'-' if cli is None else f'{cli:.0f}':>9} {capacity(row):>9} {row['errors']:>6.0f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--modes", nargs="*", default=None, help="default: every available")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    for tool in ("wrk", "iperf3"):
        if shutil.which(tool) is None:
            print(f"needs {tool} (scripts/setup.sh installs it)", file=sys.stderr)
            return 1
    # direct is always the first row; only proxy modes start an agent
    modes = [m for m in (args.modes or available_modes()) if m != "direct"]
    rows: list[dict[str, Any]] = []
    with Lab.create(nodes=1, pods_per_node=0, prefix="kpmodes") as lab:
        client = lab.add_pod(0, "bench-client")
        web = lab.add_pod(0, "web")
        server = lab.spawn(web.ns, [sys.executable, str(HERE / "fast_http.py"), "--name", "web"])
        lab.spawn(web.ns, ["iperf3", "-s", "-p", "5201"])
        manifests = lab.workdir / "manifests"
        manifests.mkdir()
        (manifests / "bench.yaml").write_text(
            MANIFESTS.format(web_vip=WEB_VIP, bulk_vip=BULK_VIP, ip=web.ip, node=NODE_NAME)
        )
        if not wait_http(client.ns, web.ip, 80, deadline=10.0).ok:
            print("the web pod's server did not start", file=sys.stderr)
            return 1
        time.sleep(0.5)  # iperf3 -s
        print(
            f"one lab: client pod {client.ip} -> server pod {web.ip}; "
            f"wrk -c{args.connections} {args.seconds:g}s Connection: close; iperf3 1 stream "
            f"{args.seconds:g}s",
            flush=True,
        )
        direct = measure(
            lab,
            client,
            web.ip,
            web.ip,
            seconds=args.seconds,
            conns=args.connections,
            pid=None,
            server_pid=server.pid,
        )
        direct["name"] = "direct"
        rows.append(direct)
        for mode in modes:
            cleanup(lab)
            agent = start_agent(lab, mode, manifests)
            ok = wait_http(client.ns, WEB_VIP, 80, deadline=30.0).ok
            if not ok:
                print(f"{mode}: kproxy did not come up:\n{lab.read_log(agent)[-2000:]}")
                lab.stop(agent)
                continue
            time.sleep(0.5)
            row = measure(
                lab,
                client,
                WEB_VIP,
                BULK_VIP,
                seconds=args.seconds,
                conns=args.connections,
                pid=agent.pid,
                server_pid=server.pid,
            )
            row["name"] = mode
            rows.append(row)
            lab.stop(agent)
        cleanup(lab)
    print()
    print(
        f"{'mode':<10} {'req/s':>9} {'ofdir':>6} {'p50 ms':>8} {'p99 ms':>8} {'Gbit/s':>8} "
        f"{'ofdir':>6} {'cpu us/r':>9} {'user':>6} {'srv us/r':>9} {'wrk us/r':>9} "
        f"{'est. 2cpu':>9} {'errors':>6}"
    )
    for row in rows:
        print(fmt(row, direct))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
