#!/usr/bin/env python3
"""iptables mode: kproxy's sync time beside raw iptables-restore of the identical text.

For each flavour (legacy, nft) and each N (services, each with M endpoints), in a throwaway
network namespace:
- full sync: kproxy's IptablesProxier from an empty model state (build views, render, restore)
  vs `iptables-<flavour>-restore --noflush` of the exact text kproxy applied, in a fresh netns;
- one endpoint change (network programming latency): the time from the EndpointSlice update
  arriving in the store to the restore returning, p50/p95 over --changes changes, vs a raw
  `--noflush` restore of the same one-service text.
Prints a table; the figures go in docs/benchmarks.md. Needs root. Touches only its namespaces.

    sudo python3 benchmarks/iptables_sync_bench.py --services 1000 10000 --endpoints 10
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from typing import Any

from kproxy.backends.iptables import IptablesProxier
from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice, Service, ServicePort
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Changes, Store


def make_store(n: int, m: int) -> Store:
    store = Store()
    services = []
    slices = []
    for i in range(n):
        ip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        services.append(
            Service(
                namespace="bench",
                name=f"svc-{i}",
                cluster_ips=(ip,),
                ports=(ServicePort("http", "TCP", 80, 8080),),
            )
        )
        slices.append(slice_for(i, m, gen=0))
    store.replace_services(services)
    store.replace_slices(slices)
    return store


def slice_for(i: int, m: int, *, gen: int) -> EndpointSlice:
    base = 10 * i
    eps = tuple(
        Endpoint(
            address=f"10.{200 + (base + k) // 65536}.{((base + k) // 256) % 256}.{(base + k) % 256}"
        )
        for k in range(m)
    )
    if gen:  # replace the first endpoint by a new address
        eps = (Endpoint(address=f"10.250.{gen // 256 % 256}.{gen % 256}"), *eps[1:])
    return EndpointSlice(
        namespace="bench",
        name=f"svc-{i}-x",
        service_name=f"svc-{i}",
        endpoints=eps,
        ports=(EndpointPort("http", "TCP", 8080),),
    )


class Recorder:
    """A subprocess.run that remembers the last restore input (to replay it raw)."""

    def __init__(self) -> None:
        self.last_input = ""

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        if "restore" in argv[0]:
            self.last_input = kw.get("input") or ""
        return subprocess.run(argv, **kw)


def raw_restore(flavour: str, text: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [f"iptables-{flavour}-restore", "--noflush", "-w", "5"],
        input=text,
        text=True,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def inner(flavour: str, n: int, m: int, changes: int, phase: str, text_path: str) -> dict[str, Any]:
    """Runs inside a namespace."""
    if phase == "raw":
        with open(text_path) as fh:
            return {"raw_full": raw_restore(flavour, fh.read())}
    store = make_store(n, m)
    rec = Recorder()
    proxier = IptablesProxier(options=ProxyOptions(node_name="bench"), flavour=flavour, run=rec)
    snap, ch = store.take()
    started = time.perf_counter()
    proxier.sync(snap, Changes(services=ch.services, full=True), full=True)
    full = time.perf_counter() - started
    full_text = rec.last_input
    with open(text_path, "w") as fh:
        fh.write(full_text)
    lat, raw = [], []
    for k in range(1, changes + 1):
        i = (k * 7919) % n
        started = time.perf_counter()
        store.set_slice(slice_for(i, m, gen=k))
        snap, ch = store.take()
        proxier.sync(snap, ch, full=False)
        lat.append(time.perf_counter() - started)
        raw.append(raw_restore(flavour, rec.last_input))
    return {
        "full": full,
        "rules": sum(1 for line in full_text.splitlines() if line.startswith("-A")),
        "p50": statistics.median(lat),
        "p95": sorted(lat)[int(0.95 * (len(lat) - 1))],
        "raw_p50": statistics.median(raw),
    }


def in_netns(args: list[str]) -> dict[str, Any]:
    ns = f"kpbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                os.path.abspath(__file__),
                "--inner",
                *args,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--flavours", nargs="+", default=["nft", "legacy"])
    parser.add_argument("--inner", nargs=5, metavar=("FLAVOUR", "N", "M", "CHANGES", "PHASE"))
    parser.add_argument("--text", default="/tmp/kproxy-bench-restore.txt")
    args = parser.parse_args()
    if args.inner:
        flavour, n, m, changes, phase = args.inner
        result = inner(flavour, int(n), int(m), int(changes), phase, args.text)
        print(json.dumps(result))
        return
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    print(
        f"{'flavour':8} {'services':>8} {'rules':>7} {'full kproxy':>12} {'full raw':>9} "
        f"{'ratio':>6} {'change p50':>11} {'p95':>8} {'raw 1-svc':>9}"
    )
    for flavour in args.flavours:
        for n in args.services:
            common = ["--text", args.text]
            r = in_netns(
                [flavour, str(n), str(args.endpoints), str(args.changes), "kproxy", *common]
            )
            raw = in_netns([flavour, str(n), str(args.endpoints), "0", "raw", *common])
            print(
                f"{flavour:8} {n:8d} {r['rules']:7d} {r['full'] * 1000:10.0f}ms "
                f"{raw['raw_full'] * 1000:7.0f}ms {r['full'] / raw['raw_full']:6.2f} "
                f"{r['p50'] * 1000:9.1f}ms {r['p95'] * 1000:6.1f}ms {r['raw_p50'] * 1000:7.1f}ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
