"""IPVS mode end to end: `IPVSProxier` programming N services x M real servers from empty, against
`ipvsadm -R` of the identical table, and one endpoint change at N services.

Run inside a kernel with IPVS (the qemu guest), as root:

    python3 tests/vm/run_in_vm.py -- '{python}' benchmarks/ipvs_proxier_bench.py \
        --services 2000 10000

Each measurement runs in a fresh network namespace (IPVS, ipsets, iptables and kube-ipvs0 are all
per namespace), so runs never see each other's state. What is timed:

- `ipvsadm -R`: the restore of exactly the virtual and real servers kproxy programs (made with
  `kproxy.render.ipvs.ipvsadm_rules`), one process, no ipsets, no addresses;
- kproxy full sync: `IPVSProxier.sync(full=True)` from a model that is already loaded: views,
  rendering, the kernel dump (empty), the diff, ipsets, companion rules, the VIPs on kube-ipvs0
  and the batched IPVS netlink apply; its IPVS part alone is reported too;
- one endpoint change: one EndpointSlice of one service gets one endpoint replaced, then the
  partial sync from `Store.take()` to the kernel, repeated; p50/p90/max. Beside it, the same
  change made by `ipvsadm` in the same table: the operations kproxy's plan held for it, undone
  and then redone by one `ipvsadm -R` each (a process start plus one netlink round trip per
  operation, what a script driving ipvsadm would pay); the ratio is kproxy's p50 over ipvsadm's;
- idle periodic sync: what the sync loop does every `--ipvs-sync-period` when nothing changed:
  the drift check (`IPVSProxier.drift`, one counted read of /proc/net/ip_vs) and a partial
  sync with no changes; beside it the full resync (whole table read back) that periodic syncs
  were before, which now runs only at start-up, after failures or drift, and once an hour.

Results print as a table and as JSON (--json FILE).
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def netns_exec(name: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", name, *argv], text=True, **kw)


def make_store(services: int, endpoints: int) -> Any:
    from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice, Service, ServicePort
    from kproxy.model.store import Store

    svcs = []
    slices = []
    for i in range(services):
        ip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        svcs.append(
            Service(
                "bench",
                f"s{i}",
                cluster_ips=(ip,),
                ports=(ServicePort("http", "TCP", 80, 8080),),
            )
        )
        eps = tuple(
            Endpoint(_endpoint_ip(i * endpoints + j), node_name="elsewhere")
            for j in range(endpoints)
        )
        slices.append(
            EndpointSlice(
                "bench",
                f"s{i}-x",
                f"s{i}",
                endpoints=eps,
                ports=(EndpointPort("http", "TCP", 8080),),
            )
        )
    store = Store()
    store.replace_services(svcs)
    store.replace_slices(slices)
    return store


def _endpoint_ip(n: int) -> str:
    return f"10.{128 + n // 65536}.{(n // 256) % 256}.{n % 256}"


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside a fresh namespace: one measurement, printed as JSON."""
    import logging

    from kproxy.backends.ipvs import IPVSProxier
    from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice
    from kproxy.model.options import ProxyOptions
    from kproxy.model.view import build_views
    from kproxy.render import ipvs as R

    logging.basicConfig(level=logging.WARNING)
    store = make_store(args.services, args.endpoints)
    out: dict[str, Any] = {"services": args.services, "endpoints": args.endpoints}
    options = ProxyOptions(family=4, node_name="bench", cluster_cidrs=("10.128.0.0/9",))
    if args.mode == "ipvsadm":
        snap, _ = store.take()
        views = build_views(snap, family=4, node_name="bench")
        desired = R.render_desired(views, options)
        text = R.ipvsadm_rules(desired.servers.values())
        t = time.perf_counter()
        subprocess.run(["ipvsadm", "-R"], input=text, text=True, check=True)
        out["ipvsadm_restore_s"] = time.perf_counter() - t
        out["lines"] = text.count("\n")
        return out

    proxier = IPVSProxier(options=options)
    snap, changes = store.take()
    t = time.perf_counter()
    result = proxier.sync(snap, changes, full=True)
    out["full_sync_s"] = time.perf_counter() - t
    out["full_sync_parts_s"] = dict(proxier.timings)
    out["full_sync_detail"] = result.detail
    out["ipvs_apply_s"] = proxier.timings.get("ipvs", 0.0)

    changes_s: list[float] = []
    raw_s: list[float] = []
    for k in range(args.changes):
        i = (k * 7919) % args.services
        eps = list(
            Endpoint(_endpoint_ip(i * args.endpoints + j), node_name="elsewhere")
            for j in range(args.endpoints)
        )
        eps[k % args.endpoints] = Endpoint(f"10.250.{k // 256}.{k % 256}", node_name="elsewhere")
        t = time.perf_counter()
        store.set_slice(
            EndpointSlice(
                "bench",
                f"s{i}-x",
                f"s{i}",
                endpoints=tuple(eps),
                ports=(EndpointPort("http", "TCP", 8080),),
            )
        )
        snap, changes = store.take()
        proxier.sync(snap, changes, full=False)
        changes_s.append(time.perf_counter() - t)
        raw_s.extend(_raw_same_change(proxier.last_plan))
    if raw_s:
        ordered = sorted(raw_s)
        out["raw_change_p50_ms"] = statistics.median(ordered) * 1000
        out["raw_change_p90_ms"] = ordered[int(len(ordered) * 0.9) - 1] * 1000
    if changes_s:
        ordered = sorted(changes_s)
        out["change_p50_ms"] = statistics.median(ordered) * 1000
        out["change_p90_ms"] = ordered[int(len(ordered) * 0.9) - 1] * 1000
        out["change_max_ms"] = ordered[-1] * 1000
        out["change_parts_s"] = dict(proxier.timings)
    # an idle periodic sync: the drift check, then a partial sync with nothing to do
    idle, checks = [], []
    for _ in range(3):
        t = time.perf_counter()
        found = proxier.drift()
        checks.append(time.perf_counter() - t)
        assert found is None, found
        snap, changes = store.take()
        proxier.sync(snap, changes, full=False)
        idle.append(time.perf_counter() - t)
    out["drift_check_s"] = statistics.median(checks)
    out["idle_periodic_s"] = statistics.median(idle)
    # the old periodic sync: a full resync with nothing changed
    snap, changes = store.take()
    t = time.perf_counter()
    proxier.sync(snap, changes, full=True)
    out["resync_s"] = time.perf_counter() - t
    out["resync_parts_s"] = dict(proxier.timings)
    return out


def _ipvsadm_line(op: Any, *, undo: bool) -> str:
    """One `ipvsadm -R` line for a real server operation of a plan (or its inverse)."""
    from kproxy.render import ipvs_diff as D

    flag = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[op.key.protocol]
    vs = f"{flag} {op.key.address}:{op.key.port}"
    if isinstance(op, D.DelDest):
        rs = f"{op.address}:{op.port}"
        return f"-a {vs} -r {rs} -m -w 1" if undo else f"-d {vs} -r {rs}"
    rs = f"{op.dest.address}:{op.dest.port}"
    if isinstance(op, D.AddDest):
        return f"-d {vs} -r {rs}" if undo else f"-a {vs} -r {rs} -m -w {op.dest.weight}"
    if isinstance(op, D.EditDest):
        return f"-e {vs} -r {rs} -m -w {1 if undo else op.dest.weight}"
    raise ValueError(f"not a real server operation: {op!r}")


def _raw_same_change(plan: Any) -> list[float]:
    """Undo kproxy's last change with ipvsadm, then time ipvsadm making it again."""
    undo = "".join(_ipvsadm_line(op, undo=True) + "\n" for op in reversed(plan.ops))
    redo = "".join(_ipvsadm_line(op, undo=False) + "\n" for op in plan.ops)
    if not redo:
        return []
    subprocess.run(["ipvsadm", "-R"], input=undo, text=True, check=True)
    t = time.perf_counter()
    subprocess.run(["ipvsadm", "-R"], input=redo, text=True, check=True)
    return [time.perf_counter() - t]


def run_in_fresh_netns(args: argparse.Namespace, mode: str, services: int) -> dict[str, Any]:
    name = f"kpbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        netns_exec(name, ["ip", "link", "set", "lo", "up"], check=True)
        proc = netns_exec(
            name,
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--services",
                str(services),
                "--endpoints",
                str(args.endpoints),
                "--changes",
                str(args.changes),
            ],
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        if proc.returncode:
            raise RuntimeError(f"{mode} {services}: {proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=("ipvsadm", "kproxy"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        args.services = args.services[0]
        print(json.dumps(child(args)))
        return 0
    rows = []
    for n in args.services:
        ref = run_in_fresh_netns(args, "ipvsadm", n)
        mine = run_in_fresh_netns(args, "kproxy", n)
        row = {**ref, **mine}
        row["ratio_full"] = mine["full_sync_s"] / ref["ipvsadm_restore_s"]
        row["ratio_ipvs"] = mine["ipvs_apply_s"] / ref["ipvsadm_restore_s"]
        rows.append(row)
        print(
            f"{n:>6} services x {args.endpoints}: ipvsadm -R {ref['ipvsadm_restore_s']:.2f} s | "
            f"kproxy full sync {mine['full_sync_s']:.2f} s ({row['ratio_full']:.2f}x), "
            f"IPVS apply {mine['ipvs_apply_s']:.2f} s ({row['ratio_ipvs']:.2f}x) | "
            f"one endpoint change p50 {mine.get('change_p50_ms', 0):.1f} ms "
            f"p90 {mine.get('change_p90_ms', 0):.1f} ms | idle resync {mine['resync_s']:.2f} s",
            flush=True,
        )
        raw50 = mine.get("raw_change_p50_ms", 0.0)
        print(
            f"        same change by ipvsadm -R: p50 {raw50:.1f} ms "
            f"p90 {mine.get('raw_change_p90_ms', 0):.1f} ms "
            f"(kproxy/ipvsadm p50 {mine.get('change_p50_ms', 0) / raw50 if raw50 else 0:.2f}) | "
            f"idle periodic sync {mine['idle_periodic_s'] * 1000:.0f} ms "
            f"(drift check {mine['drift_check_s'] * 1000:.0f} ms) vs full resync "
            f"{mine['resync_s']:.2f} s",
            flush=True,
        )
        for label, key in (
            ("full", "full_sync_parts_s"),
            ("change", "change_parts_s"),
            ("resync", "resync_parts_s"),
        ):
            parts = mine.get(key) or {}
            text = ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
            print(f"        {label:>6} parts (s): {text}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
