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
  the drift check (`IPVSProxier.drift`: the getsockopt census of the IPv4 virtual servers, the
  ipsets' header counts, kube-ipvs0's address count) and a partial sync with no changes, which
  must write nothing; CPU time per period (user + system) and its share of one core at
  `--sync-period`. Beside it, each read of the check alone, the netlink fallback (service count
  and one rotating slice of real server dumps), the old check (/proc/net/ip_vs read and
  counted) and the full resync (whole table read back) that periodic syncs were before;
- the soak (`--soak SECONDS`): one endpoint change every `--interval` (1.5 s), each timed from
  the EndpointSlice update to the kernel, with the periodic sync every `--sync-period` in
  between; after each, the same change made by `ipvsadm -R` (undone, then redone); p50/p90/p99
  of both, and every changed virtual server read back at the end (no change lost).

    python3 tests/vm/run_in_vm.py --memory 4G --timeout 3000 -- '{python}' \
        benchmarks/ipvs_proxier_bench.py --services 10000 --no-restore --soak 300

Results print as a table and as JSON (--json FILE).
"""

from __future__ import annotations

import argparse
import json
import math
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
        changes_s.append(_change_one_endpoint(args, proxier, store, i, k, "10.250")[0])
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
    out.update(_idle(args, proxier, store))
    if args.soak > 0:
        out.update(_soak(args, proxier, store))
    # the old periodic sync: a full resync with nothing changed
    snap, changes = store.take()
    t = time.perf_counter()
    proxier.sync(snap, changes, full=True)
    out["resync_s"] = time.perf_counter() - t
    out["resync_parts_s"] = dict(proxier.timings)
    return out


def _change_one_endpoint(
    args: argparse.Namespace, proxier: Any, store: Any, i: int, k: int, prefix: str
) -> tuple[float, list[Any]]:
    """Replace endpoint k % endpoints of service i with `prefix.x.y` and sync: the seconds from
    the EndpointSlice update to the kernel, and the new endpoints."""
    from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice

    eps = [
        Endpoint(_endpoint_ip(i * args.endpoints + j), node_name="elsewhere")
        for j in range(args.endpoints)
    ]
    eps[k % args.endpoints] = Endpoint(f"{prefix}.{k // 256}.{k % 256}", node_name="elsewhere")
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
    return time.perf_counter() - t, eps


def _idle(args: argparse.Namespace, proxier: Any, store: Any) -> dict[str, Any]:
    """What the sync loop does every --ipvs-sync-period when nothing changed: the drift check,
    then a partial sync with nothing to do. CPU time (process_time: user + system, the kernel's
    work for kproxy's reads included) and wall time per period; the check's own parts; and the
    reads it replaces or falls back to, timed in the same table."""
    import re

    from kproxy.backends import ipvs_procfs as procfs
    from kproxy.backends.ipvs_census import Rotation
    from kproxy.render import ipvs as R

    cpu, wall, checks = [], [], []
    for _ in range(args.idle_periods):
        w, c = time.perf_counter(), time.process_time()
        found = proxier.drift()
        checks.append(time.perf_counter() - w)
        assert found is None, found
        snap, changes = store.take()
        result = proxier.sync(snap, changes, full=False)
        # writes nothing: no service rendered anew, an empty IPVS plan (and so no ipset or
        # address change either: those follow from changed contributions only)
        assert not result.full and result.services_written == 0, result
        assert proxier.last_plan.empty, proxier.last_plan
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    out: dict[str, Any] = {
        "idle_cpu_s": statistics.mean(cpu),
        "idle_cpu_max_s": max(cpu),
        "idle_periodic_s": statistics.median(wall),
        "drift_check_s": statistics.median(checks),
        "idle_core_pct": 100 * statistics.mean(cpu) / args.sync_period,
    }
    parts: dict[str, float] = {}

    def timed(name: str, fn: Any) -> None:
        t = time.perf_counter()
        fn()
        parts[name] = time.perf_counter() - t

    timed("census_sockopt", lambda: proxier._census(4))
    timed("ipset_headers", proxier.ipsets.drift)
    timed("kube_ipvs0_count", lambda: proxier.device.count(4))
    keys = list(proxier._dest_counts)
    rot = Rotation()
    timed("netlink_service_count", lambda: proxier.ipvs.count_services(4))
    timed(
        f"netlink_dest_slice_{rot.size(len(keys))}",
        lambda: [proxier.ipvs.count_dests(k) for k in rot.take(keys)],
    )
    service = re.compile(rb"^(?:TCP|UDP|SCTP) +[0-9A-Fa-f]{8}:", re.M)
    dest = re.compile(rb"^  -> [0-9A-Fa-f]{8}:", re.M)

    def old_check() -> None:  # the check before: /proc/net/ip_vs read and counted
        with open(procfs.PATH, "rb") as fh:
            data = fh.read()
        assert len(service.findall(data)) == len(keys) and len(dest.findall(data)) > 0

    if args.proc_compare:
        timed("old_proc_count", old_check)
    out["drift_parts_s"] = parts
    out["vips"] = len(proxier.ipsets.contents[R.IPVS_IPS])
    return out


def _soak(args: argparse.Namespace, proxier: Any, store: Any) -> dict[str, Any]:
    """One endpoint change every --interval seconds (later when the previous change's ipvsadm
    comparison overran its slot: counted as late) for --soak seconds, each timed from the
    EndpointSlice update entering the store to the kernel (snapshot, partial render, diff,
    netlink), with the periodic sync (drift check + partial sync) every --sync-period in
    between, as the sync loop runs them; after each change the same change by ipvsadm (undone,
    then redone by one `ipvsadm -R`). At the end every changed virtual server is read back: no
    change may be lost."""
    from kproxy.render import ipvs as R

    mine: list[float] = []
    raw: list[float] = []
    periodic: list[float] = []
    expected: dict[int, set[str]] = {}
    slips = 0
    start = time.perf_counter()
    next_periodic = start + args.sync_period
    slot = start
    k = 0
    while slot < start + args.soak:
        now = time.perf_counter()
        if now < slot:
            time.sleep(slot - now)
        elif k:
            slips += 1  # the previous change's ipvsadm comparison ran past this slot
        slot = max(slot, now) + args.interval
        i = (k * 104729 + 17) % args.services
        seconds, eps = _change_one_endpoint(args, proxier, store, i, k, "10.251")
        mine.append(seconds)
        expected[i] = {e.address for e in eps}
        raw.extend(_raw_same_change(proxier.last_plan))
        if time.perf_counter() >= next_periodic:
            t = time.perf_counter()
            assert proxier.drift() is None
            snap, changes = store.take()
            proxier.sync(snap, changes, full=False)
            periodic.append(time.perf_counter() - t)
            next_periodic += args.sync_period
        k += 1
    lost = 0
    for i, want in expected.items():
        key = R.VSKey(f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}", "TCP", 80)
        have = {d.address for d in proxier.ipvs.dests(key)}
        lost += have != want
    out: dict[str, Any] = {
        "soak_changes": k,
        "soak_lost": lost,
        "soak_slipped": slips,
        "soak_seconds": time.perf_counter() - start,
        "soak_periodic_syncs": len(periodic),
        "soak_periodic_max_s": max(periodic, default=0.0),
    }
    out.update(_quantiles("soak", mine))
    out.update(_quantiles("soak_ipvsadm", raw))
    return out


def _quantiles(prefix: str, samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def q(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)] * 1000

    return {
        f"{prefix}_p50_ms": statistics.median(ordered) * 1000,
        f"{prefix}_p90_ms": q(0.9),
        f"{prefix}_p99_ms": q(0.99),
        f"{prefix}_max_ms": ordered[-1] * 1000,
    }


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
                "--idle-periods",
                str(args.idle_periods),
                "--sync-period",
                str(args.sync_period),
                "--soak",
                str(args.soak),
                "--interval",
                str(args.interval),
                *([] if args.proc_compare else ["--no-proc-compare"]),
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
    parser.add_argument(
        "--idle-periods", type=int, default=10, help="idle periodic syncs timed (default 10)"
    )
    parser.add_argument(
        "--sync-period",
        type=float,
        default=30.0,
        help="the --ipvs-sync-period the idle cost is a share of, and the soak's periodic syncs",
    )
    parser.add_argument(
        "--soak", type=float, default=0.0, help="seconds of the soak (0: no soak; issue: 300)"
    )
    parser.add_argument(
        "--interval", type=float, default=1.5, help="seconds between the soak's changes"
    )
    parser.add_argument(
        "--no-restore",
        dest="restore",
        action="store_false",
        help="skip the `ipvsadm -R` of the whole table (minutes at 10k under emulation)",
    )
    parser.add_argument(
        "--no-proc-compare",
        dest="proc_compare",
        action="store_false",
        help="skip timing the old drift check (/proc/net/ip_vs read and counted)",
    )
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
        ref = run_in_fresh_netns(args, "ipvsadm", n) if args.restore else {}
        mine = run_in_fresh_netns(args, "kproxy", n)
        row = {**ref, **mine}
        restore = ref.get("ipvsadm_restore_s")
        if restore:
            row["ratio_full"] = mine["full_sync_s"] / restore
            row["ratio_ipvs"] = mine["ipvs_apply_s"] / restore
        rows.append(row)
        print(
            f"{n:>6} services x {args.endpoints}: "
            + (
                f"ipvsadm -R {restore:.2f} s ({row['ratio_full']:.2f}x full sync) | "
                if restore
                else ""
            )
            + f"kproxy full sync {mine['full_sync_s']:.2f} s, IPVS apply "
            f"{mine['ipvs_apply_s']:.2f} s | one endpoint change p50 "
            f"{mine.get('change_p50_ms', 0):.1f} ms p90 {mine.get('change_p90_ms', 0):.1f} ms | "
            f"idle resync {mine['resync_s']:.2f} s",
            flush=True,
        )
        raw50 = mine.get("raw_change_p50_ms", 0.0)
        print(
            f"        same change by ipvsadm -R: p50 {raw50:.1f} ms "
            f"p90 {mine.get('raw_change_p90_ms', 0):.1f} ms "
            f"(kproxy/ipvsadm p50 {mine.get('change_p50_ms', 0) / raw50 if raw50 else 0:.2f})",
            flush=True,
        )
        print(
            f"        idle periodic sync: CPU {mine['idle_cpu_s'] * 1000:.0f} ms per period "
            f"(max {mine['idle_cpu_max_s'] * 1000:.0f} ms) = {mine['idle_core_pct']:.2f} % of a "
            f"core at {args.sync_period:g} s; wall {mine['idle_periodic_s'] * 1000:.0f} ms "
            f"(drift check {mine['drift_check_s'] * 1000:.0f} ms); writes nothing; vs full "
            f"resync {mine['resync_s']:.2f} s",
            flush=True,
        )
        if "soak_p50_ms" in mine:
            s50, r50 = mine["soak_p50_ms"], mine.get("soak_ipvsadm_p50_ms", 0.0)
            s99, r99 = mine["soak_p99_ms"], mine.get("soak_ipvsadm_p99_ms", 0.0)
            print(
                f"        soak {mine['soak_changes']} changes / {mine['soak_seconds']:.0f} s "
                f"({mine['soak_lost']} lost, {mine['soak_slipped']} late, "
                f"{mine['soak_periodic_syncs']} periodic syncs, max "
                f"{mine['soak_periodic_max_s'] * 1000:.0f} ms): kproxy p50 {s50:.1f} / p99 "
                f"{s99:.1f} ms; ipvsadm -R of the same change p50 {r50:.1f} / p99 {r99:.1f} ms; "
                f"ratio p50 {s50 / r50 if r50 else 0:.2f}, p99 {s99 / r99 if r99 else 0:.2f}",
                flush=True,
            )
        for label, key in (
            ("full", "full_sync_parts_s"),
            ("change", "change_parts_s"),
            ("drift", "drift_parts_s"),
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
