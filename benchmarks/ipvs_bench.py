"""IPVS programming benchmark: kproxy's batched netlink adapter against `ipvsadm -R`, same table,
same kernel, same run. Needs a kernel with IPVS: run it inside the test VM,

    python3 tests/vm/run_in_vm.py -- python3 benchmarks/ipvs_bench.py [--sizes 2000,10000]

(plain `python3 benchmarks/ipvs_bench.py` on a host whose kernel has IPVS works too). Root.

For each size N it programs N TCP virtual servers (rr) x `--dests` masquerade real servers from an
empty table, each side in a fresh network namespace of its own:

- **kproxy**: `IPVSAdapter.apply(ops)` of one `AddVS` per virtual server, as the diff emits them
  (encoding and the per-real-server requests included; building the desired table is the
  renderer's work and is not timed);
- **ipvsadm -R**: the same table as restore text on stdin (text generated beforehand), timed
  around the process, with the cost of starting an ipvsadm in the namespace (`ipvsadm -Ln` of an
  empty table) shown beside it.

Then, at N services, one real server change: a weight edit, and an add + delete of a real server,
each timed `--repeat` times through `apply` (median and max). `--pyroute2 N` also times pyroute2's
own `IPVS().service/dest("add")` for N services (one request and acknowledgement at a time).
The table is checked after each load (counts from a dump). Figures print as a table and, with
`--json FILE`, as JSON.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kproxy.backends.ipvs_netlink import IPVSAdapter, IPVSUnavailable
from kproxy.render.ipvs import Dest, VirtualServer, VSKey
from kproxy.render.ipvs_diff import AddDest, AddVS, DelDest, EditDest, Op

Table = list[VirtualServer]
T = TypeVar("T")


def make_table(services: int, dests: int) -> Table:
    vbase = int(ipaddress.IPv4Address("10.96.0.0"))
    rbase = int(ipaddress.IPv4Address("10.128.0.0"))
    return [
        VirtualServer(
            VSKey(str(ipaddress.IPv4Address(vbase + i)), "TCP", 80),
            "rr",
            dests=tuple(
                Dest(str(ipaddress.IPv4Address(rbase + i * 16 + j)), 8080) for j in range(dests)
            ),
        )
        for i in range(services)
    ]


def add_ops(table: Table) -> list[Op]:
    return [AddVS(vs) for vs in table]


def restore_text(table: Table) -> str:
    lines: list[str] = []
    for vs in table:
        vip = f"{vs.key.address}:{vs.key.port}"
        lines.append(f"-A -t {vip} -s {vs.scheduler}")
        lines.extend(f"-a -t {vip} -r {d.address}:{d.port} -m -w {d.weight}" for d in vs.dests)
    return "\n".join(lines) + "\n"


class Netns:
    def __init__(self) -> None:
        self.name = f"kpbench{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        # IPVS refuses real servers (EINVAL) while the namespace has no local routing table yet:
        # the kernel then classifies every address as broadcast. Bringing lo up creates it.
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def count(adapter: IPVSAdapter) -> tuple[int, int]:
    table = adapter.dump()
    return len(table), sum(len(o.dests) for o in table.values())


def bench_kproxy(table: Table, dests: int, repeat: int) -> dict[str, Any]:
    build, ops = timed(lambda: add_ops(table))
    with Netns() as ns, IPVSAdapter(netns=ns.name) as adapter:
        seconds, result = timed(lambda: adapter.apply(ops))
        if not result.ok:
            raise SystemExit(f"apply failed: {result.failures[:3]}")
        dump_s, counts = timed(lambda: count(adapter))
        if counts != (len(table), len(table) * dests):
            raise SystemExit(f"kernel holds {counts}, wanted {len(table)} x {dests}")
        # one real server change at this size
        vs = table[0]
        edit_times: list[float] = []
        churn_times: list[float] = []
        extra = Dest("10.255.0.1", 8080)
        for i in range(repeat):
            edit: list[Op] = [EditDest(vs.key, Dest(vs.dests[0].address, 8080, weight=2 + i % 5))]
            t, r = timed(functools.partial(adapter.apply, edit))
            edit_times.append(t)
            t1, r1 = timed(lambda: adapter.apply([AddDest(vs.key, extra)]))
            t2, r2 = timed(lambda: adapter.apply([DelDest(vs.key, extra.address, extra.port)]))
            if not (r.ok and r1.ok and r2.ok):
                raise SystemExit("a single change failed")
            churn_times.extend((t1, t2))
    return {
        "ops": len(ops),
        "build_ops_s": build,
        "apply_s": seconds,
        "sends": result.sends,
        "dump_s": dump_s,
        "edit_median_ms": statistics.median(edit_times) * 1e3,
        "edit_max_ms": max(edit_times) * 1e3,
        "add_or_del_median_ms": statistics.median(churn_times) * 1e3,
        "add_or_del_max_ms": max(churn_times) * 1e3,
    }


def bench_ipvsadm(table: Table) -> dict[str, Any]:
    text = restore_text(table)
    with Netns() as ns:
        start_s, _ = timed(
            lambda: subprocess.run(
                ["ip", "netns", "exec", ns.name, "ipvsadm", "-Ln"], capture_output=True, check=True
            )
        )
        seconds, proc = timed(
            lambda: subprocess.run(
                ["ip", "netns", "exec", ns.name, "ipvsadm", "-R"],
                input=text,
                capture_output=True,
                text=True,
                check=False,
            )
        )
        if proc.returncode != 0:
            raise SystemExit(f"ipvsadm -R failed: {proc.stderr[:300]}")
        with IPVSAdapter(netns=ns.name) as adapter:
            counts = count(adapter)
    return {"restore_s": seconds, "process_start_s": start_s, "counts": counts}


def bench_pyroute2(table: Table) -> float:
    from pyroute2 import IPVS, IPVSDest, IPVSService  # the one-request-at-a-time API

    with Netns() as ns:
        t = time.perf_counter()
        with IPVS(netns=ns.name) as ipvs:
            for vs in table:
                svc = IPVSService(
                    addr=vs.key.address, port=vs.key.port, protocol=6, sched_name="rr"
                )
                ipvs.service("add", service=svc)
                for rs in vs.dests:
                    ipvs.dest(
                        "add",
                        service=svc,
                        dest=IPVSDest(addr=rs.address, port=rs.port, fwd_method=0, weight=1),
                    )
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,10000", help="service counts (comma-separated)")
    parser.add_argument("--dests", type=int, default=10, help="real servers per service")
    parser.add_argument("--repeat", type=int, default=20, help="single-change samples")
    parser.add_argument("--pyroute2", type=int, default=0, help="also time pyroute2 for N")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("ipvs_bench: needs root", file=sys.stderr)
        return 2
    try:
        IPVSAdapter().close()
    except IPVSUnavailable as err:
        print(f"ipvs_bench: {err}; run it inside the VM (tests/vm/run_in_vm.py)", file=sys.stderr)
        return 2
    figures: dict[str, Any] = {"kernel": os.uname().release, "dests": args.dests, "runs": []}
    print(f"kernel {figures['kernel']}, {args.dests} real servers per service")
    header = (
        f"{'services':>8} {'requests':>8} | {'kproxy s':>9} {'sends':>5} | {'ipvsadm -R s':>12} "
        f"{'(start s)':>9} | {'ratio':>5} | {'dump s':>6} | {'edit ms':>13} {'add/del ms':>13}"
    )
    print(header)
    print("-" * len(header))
    for n in (int(x) for x in args.sizes.split(",")):
        table = make_table(n, args.dests)
        k = bench_kproxy(table, args.dests, args.repeat)
        r = bench_ipvsadm(table)
        ratio = k["apply_s"] / r["restore_s"]
        print(
            f"{n:>8} {k['ops']:>8} | {k['apply_s']:>9.3f} {k['sends']:>5} | "
            f"{r['restore_s']:>12.3f} {r['process_start_s']:>9.3f} | {ratio:>5.2f} | "
            f"{k['dump_s']:>6.2f} | {k['edit_median_ms']:>5.2f} (max {k['edit_max_ms']:>5.2f}) "
            f"{k['add_or_del_median_ms']:>5.2f} (max {k['add_or_del_max_ms']:>5.2f})",
            flush=True,
        )
        figures["runs"].append({"services": n, "kproxy": k, "ipvsadm": r, "ratio": ratio})
    if args.pyroute2:
        table = make_table(args.pyroute2, args.dests)
        seconds = bench_pyroute2(table)
        figures["pyroute2"] = {"services": args.pyroute2, "seconds": seconds}
        print(f"pyroute2 IPVS().service/dest('add'), {args.pyroute2} services: {seconds:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
