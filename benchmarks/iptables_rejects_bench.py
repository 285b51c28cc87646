#!/usr/bin/env python3
"""What one refused service costs a full iptables sync (issue 12 item 2).

For each flavour and each N: N services x M endpoints in a fresh network namespace, synced by
the real IptablesProxier. "clean" is the full sync of the N good services; "one refused" is
the same N plus one service whose rules iptables-restore refuses (a 2,000-character name, in
the middle of the namespace/name order): the failed restore, the probes that find it, and the
full sync without it. Reported: both times, their ratio, the restores each took.

    sudo python3 benchmarks/iptables_rejects_bench.py --services 1000 5000 --endpoints 10
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import time

INNER = """
import json, sys, time
from kproxy.backends.iptables import IptablesProxier
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Store
from tests.support.builders import make_endpoint, make_service, make_slice

flavour, n, m, bad = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
store = Store()
services, slices = [], []
for i in range(n):
    name = f"svc{i:05d}"
    if bad and i == n // 2:
        name = "m" + "x" * 1999
    ip = f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}"
    services.append(make_service("ns", name, cluster_ips=(ip,)))
    eps = [make_endpoint(f"10.{i // 256 % 256}.{i % 256}.{j + 1}") for j in range(m)]
    slices.append(make_slice("ns", name, endpoints=eps))
store.replace_services(services)
store.replace_slices(slices)
p = IptablesProxier(options=ProxyOptions(node_name="n", cluster_cidrs=("10.0.0.0/8",)),
                    flavour=flavour)
snap, changes = store.take()
t0 = time.perf_counter()
res = p.sync(snap, changes, full=True)
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "restores": p.restores, "written": res.services_written,
                  "rejected": len(p.rejected)}))
"""


def run(flavour: str, n: int, m: int, bad: bool) -> dict[str, float]:
    ns = f"kprej{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        res = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-c",
                INNER,
                flavour,
                str(n),
                str(m),
                "1" if bad else "0",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:  # e.g. the host-wide xtables lock held by someone else
            raise SystemExit(f"{flavour} {n} failed: {res.stderr.strip().splitlines()[-1:]}")
        result: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
        return result
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, nargs="+", default=[1000])
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--flavours", nargs="+", default=["nft", "legacy"])
    args = ap.parse_args()
    print("flavour  services  clean s (restores)  one refused s (restores)  ratio")
    for flavour in args.flavours:
        for n in args.services:
            clean = run(flavour, n, args.endpoints, False)
            refused = run(flavour, n, args.endpoints, True)
            assert refused["rejected"] == 1 and refused["written"] == n - 1, refused
            print(
                f"{flavour:7}  {n:8}  {clean['seconds']:7.2f} ({clean['restores']:3.0f})"
                f"        {refused['seconds']:7.2f} ({refused['restores']:3.0f})"
                f"              {refused['seconds'] / clean['seconds']:.2f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    t = time.time()
    rc = main()
    print(f"# {time.time() - t:.0f} s", file=sys.stderr)
    raise SystemExit(rc)
