#!/usr/bin/env python3
"""How the userspace proxy moves bulk data: os.splice through a pipe against recv_into/send.

The proxy (kproxy.backends.userspace_proxy) copies small transfers through one Python buffer and
switches a direction to os.splice once a read fills that buffer. This measures what that choice
is worth: one iperf3 TCP stream over loopback, direct and through an in-process ProxyEngine with
splice on and off (the engine's `splice` switch), each `--rounds` times, interleaved.

    python3 benchmarks/userspace_copy_bench.py [--seconds 3] [--rounds 3]

Only loopback addresses are used; no root needed.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kproxy.backends.userspace_balance import Balancer
from kproxy.backends.userspace_proxy import ProxyEngine, TCPListener, bind_socket

SERVER_PORT = 25201


def cpu() -> float:
    """CPU seconds used by this process so far (the proxies' loop threads; the main thread
    only waits for iperf3)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def iperf(port: int, seconds: float) -> float:
    """Gbit/s of one stream; retried while the server still finishes the previous test."""
    doc: dict[str, Any] = {}
    for _ in range(5):
        out = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        doc = json.loads(out or "{}")
        if "sum_received" in doc.get("end", {}):
            return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9
        time.sleep(0.5)
    raise RuntimeError(f"iperf3 failed: {doc.get('error')}")


def proxy(splice: bool) -> tuple[ProxyEngine, int]:
    engine = ProxyEngine()
    engine.splice = splice
    sock = bind_socket(socket.SOCK_STREAM, "127.0.0.1", 0)
    sock.listen(128)
    listener = TCPListener(engine, sock, Balancer([f"127.0.0.1:{SERVER_PORT}"]))
    engine.start()
    engine.call_soon(listener.register)
    return engine, listener.port


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("iperf3") is None:
        print("needs iperf3 (scripts/setup.sh installs it)", file=sys.stderr)
        return 1
    server = subprocess.Popen(["iperf3", "-s", "-p", str(SERVER_PORT)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        spliced, spliced_port = proxy(True)
        copied, copied_port = proxy(False)
        time.sleep(0.2)
        results: dict[str, list[float]] = {"direct": [], "splice": [], "recv/send": []}
        cost: dict[str, list[float]] = {"direct": [], "splice": [], "recv/send": []}
        for _ in range(args.rounds):
            for name, port in (
                ("direct", SERVER_PORT),
                ("splice", spliced_port),
                ("recv/send", copied_port),
            ):
                before = cpu()
                gbps = iperf(port, args.seconds)
                used = cpu() - before
                results[name].append(gbps)
                gbytes = gbps * args.seconds / 8
                cost[name].append(used / gbytes if gbytes else 0.0)
        spliced.stop()
        copied.stop()
    finally:
        server.kill()
    direct = statistics.median(results["direct"])
    header = f"{'path':<10} {'median Gbit/s':>14} {'of direct':>10} {'proxy CPU s/GB':>15}"
    print(header + "   runs")
    for name, runs in results.items():
        med = statistics.median(runs)
        per_gb = statistics.median(cost[name])
        print(
            f"{name:<10} {med:>14.2f} {med / direct:>10.0%} {per_gb:>15.2f}   "
            + " ".join(f"{r:.2f}" for r in runs)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
