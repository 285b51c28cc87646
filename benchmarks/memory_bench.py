#!/usr/bin/env python3
"""Memory: RSS of the real agent and its DNS worker at N services x M endpoints, and where it goes.

Two parts, both in throwaway network namespaces (nothing outside them is touched):

agent      `python -m kproxy run` (iptables mode, DNS on) against the fake apiserver
           (tests/support/fakeapi.py, through a kubeconfig) serving N Services and N
           EndpointSlices of M endpoints each, shaped like what a real apiserver returns
           (uid, resourceVersion, labels, ownerReferences, managedFields, targetRef per
           endpoint). Addresses follow benchmarks/iptables_bench.py. Once the first full sync
           has landed and the DNS worker answers for the last service, VmRSS and VmHWM of the
           agent and of each DNS worker process are read from /proc; then --changes endpoint
           changes go through the API (one every --change-interval s) and RSS is read again.
breakdown  the same objects through kproxy's pipeline in one process under tracemalloc, stage by
           stage: the raw list pages (json.loads), conversion into the model store, a snapshot,
           the iptables proxier's full sync (its retained state: the per-service blocks), the
           daemon's per-service views, the DNS delta sent to the worker (pickled size) and the
           DNS index the worker builds from it. For each stage: what it keeps (traced bytes
           still allocated afterwards), its peak, and the top allocation sites.

    sudo python3 benchmarks/memory_bench.py --services 10000 --endpoints 10
    sudo python3 benchmarks/memory_bench.py --services 10000 --part breakdown
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import pickle
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NODE = "bench-node"
NAMESPACE = "bench"


# -- the objects (raw API JSON) ---------------------------------------------------------------
def cluster_ip(i: int) -> str:
    return f"172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def endpoint_ip(k: int) -> str:
    return f"10.{k // 65536 % 256}.{k // 256 % 256}.{k % 256}"


def _uid(kind: str, i: int) -> str:
    h = f"{abs(hash((kind, i))) % (1 << 64):016x}{i:016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _managed(manager: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "manager": manager,
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2026-12-01T10:00:00Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        }
    ]


def service_obj(i: int) -> dict[str, Any]:
    name = f"svc-{i}"
    ip = cluster_ip(i)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": _uid("svc", i),
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {"app": name},
            "managedFields": _managed(
                "kubectl-client-side-apply",
                {
                    "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                    "f:spec": {
                        "f:internalTrafficPolicy": {},
                        "f:ports": {
                            ".": {},
                            'k:{"port":80,"protocol":"TCP"}': {
                                ".": {},
                                "f:name": {},
                                "f:port": {},
                                "f:protocol": {},
                                "f:targetPort": {},
                            },
                        },
                        "f:selector": {},
                        "f:sessionAffinity": {},
                        "f:type": {},
                    },
                },
            ),
        },
        "spec": {
            "clusterIP": ip,
            "clusterIPs": [ip],
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": name},
            "sessionAffinity": "None",
            "type": "ClusterIP",
        },
        "status": {"loadBalancer": {}},
    }


def slice_obj(i: int, m: int, *, gen: int = 0) -> dict[str, Any]:
    name = f"svc-{i}"
    endpoints = []
    for k in range(m):
        ip = endpoint_ip(m * i + k)
        if gen and k == 0:  # the first endpoint is replaced by a new pod
            ip = f"10.250.{gen // 256 % 256}.{gen % 256}"
        pod = f"{name}-{k if not (gen and k == 0) else f'g{gen}'}-7d9f8b6c5d"
        endpoints.append(
            {
                "addresses": [ip],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node-{(i + k) % 50}",
                "targetRef": {
                    "kind": "Pod",
                    "name": pod,
                    "namespace": NAMESPACE,
                    "uid": _uid(pod, k),
                },
                "zone": f"zone-{(i + k) % 3}",
            }
        )
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-abcde",
            "namespace": NAMESPACE,
            "generateName": f"{name}-",
            "uid": _uid("slice", i),
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "generation": 1 + gen,
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": name,
                "app": name,
            },
            "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime()
                )
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": name,
                    "uid": _uid("svc", i),
                    "blockOwnerDeletion": True,
                    "controller": True,
                }
            ],
            "managedFields": _managed(
                "kube-controller-manager",
                {
                    "f:addressType": {},
                    "f:endpoints": {},
                    "f:metadata": {"f:labels": {}, "f:ownerReferences": {}},
                    "f:ports": {},
                },
            ),
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node_obj() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-0"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]},
    }


# -- /proc -----------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of `pid` in MB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# -- part 1: the real agent ------------------------------------------------------------------
@contextlib.contextmanager
def netns() -> Iterator[str]:
    ns = f"kpmem{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def dig(ns: str, name: str) -> str:
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "dig", "+short", "+time=1", "+tries=1", "@127.0.0.1", name],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.stdout.strip()


def wait_for(what: str, check: Any, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def agent_rss(pid: int) -> dict[str, Any]:
    workers = [c for c in children(pid) if "kproxy.dns.worker" in cmdline(c)]
    agent = proc_status(pid)
    dns = [proc_status(w) for w in workers]
    return {
        "agent": agent,
        "dns_workers": dns,
        "total_rss": agent["VmRSS"] + sum(d["VmRSS"] for d in dns),
        "total_hwm": agent["VmHWM"] + sum(d["VmHWM"] for d in dns),
    }


def run_agent(args: argparse.Namespace) -> dict[str, Any]:
    from tests.support.fakeapi import FakeApiServer

    n, m = args.services, args.endpoints
    out: dict[str, Any] = {"services": n, "endpoints": m}
    with netns() as ns, tempfile.TemporaryDirectory(prefix="kproxy-membench-") as tmp:
        api = FakeApiServer(
            netns=ns,
            history_limit=max(10_000, args.changes + 10),
            token=None if args.master else "kproxy-test-token",  # --master: no auth
        )
        api.start()
        started = time.monotonic()
        api.upsert(node_obj())
        for i in range(n):
            api.upsert(service_obj(i))
            api.upsert(slice_obj(i, m))
        list_bytes = sum(
            len(json.dumps(o, separators=(",", ":")))
            for kind in ("Service", "EndpointSlice")
            for o in api.objects(kind)
        )
        out["api_objects_mb"] = round(list_bytes / 1e6, 1)
        print(
            f"fake apiserver: {2 * n} objects ({list_bytes / 1e6:.0f} MB of JSON) in "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
        kubeconfig = api.write_kubeconfig(os.path.join(tmp, "kubeconfig"))
        log_path = Path(tmp, "kproxy.log")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        argv = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "kproxy", "run",
            *(["--master", api.url] if args.master else ["--kubeconfig", kubeconfig]),
            "--hostname-override", NODE,
            "--cluster-cidr", "10.0.0.0/8",
            "--proxy-mode", args.mode,
            "--dns-listen", "127.0.0.1:53",
            "--dns-upstream", "127.0.0.1:5399",
            "--healthz-bind-address", "127.0.0.1:10256",
            "--metrics-bind-address", "127.0.0.1:10249",
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            started = time.monotonic()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            last = f"svc-{n - 1}.{NAMESPACE}.svc.cluster.local"

            def synced() -> bool:
                if proc.poll() is not None:
                    raise SystemExit(f"kproxy exited:\n{log_path.read_text()[-3000:]}")
                return "synced all rules" in log_path.read_text(errors="replace")

            out["first_sync_s"] = round(wait_for("the first full sync", synced, args.timeout), 1)
            wait_for("DNS", lambda: dig(ns, last) == cluster_ip(n - 1), args.timeout)
            out["ready_s"] = round(time.monotonic() - started, 1)
            time.sleep(args.settle)
            out["after_start"] = agent_rss(proc.pid)
            report("after start-up", out["after_start"])
            for k in range(1, args.changes + 1):
                i = (k * 7919) % n
                api.upsert(slice_obj(i, m, gen=k))
                time.sleep(args.change_interval)
            if args.changes:
                i = (args.changes * 7919) % n
                want = f"10.250.{args.changes // 256 % 256}.{args.changes % 256}"
                name = f"10-250-{args.changes // 256 % 256}-{args.changes % 256}"
                wait_for(
                    "the last change in DNS",
                    lambda: dig(ns, f"{name}.svc-{i}.{NAMESPACE}.svc.cluster.local") == want,
                    args.timeout,
                )
                time.sleep(args.settle)
                out["after_changes"] = agent_rss(proc.pid)
                report(f"after {args.changes} endpoint changes", out["after_changes"])
            out["log_tail"] = log_path.read_text(errors="replace").splitlines()[-3:]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            api.stop()
    return out


def report(when: str, rss: dict[str, Any]) -> None:
    a = rss["agent"]
    line = (
        f"{when}: agent RSS {a['VmRSS']:.1f} MB (peak {a['VmHWM']:.1f}, anon {a['RssAnon']:.1f}, "
        f"file {a['RssFile']:.1f})"
    )
    for k, d in enumerate(rss["dns_workers"]):
        line += (
            f"; DNS worker {k} RSS {d['VmRSS']:.1f} MB (peak {d['VmHWM']:.1f}, "
            f"anon {d['RssAnon']:.1f}, file {d['RssFile']:.1f})"
        )
    line += f"; total {rss['total_rss']:.1f} MB (sum of peaks {rss['total_hwm']:.1f})"
    print(line, flush=True)


# -- part 2: the breakdown, in one process ---------------------------------------------------
class Stages:
    """tracemalloc figures per stage: kept (allocated at the end) and peak, with top sites."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.rows: list[dict[str, Any]] = []
        tracemalloc.start(1)
        self._base = tracemalloc.take_snapshot()
        self._kept0 = tracemalloc.get_traced_memory()[0]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        gc.collect()
        before_snap = tracemalloc.take_snapshot()
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        yield
        elapsed = time.perf_counter() - t0
        gc.collect()
        kept, peak = tracemalloc.get_traced_memory()
        after_snap = tracemalloc.take_snapshot()
        sites = after_snap.compare_to(before_snap, "lineno")[: self.top]
        row = {
            "stage": name,
            "kept_mb": (kept - before) / 1e6,
            "peak_mb": (peak - before) / 1e6,
            "total_mb": (kept - self._kept0) / 1e6,
            "rss_mb": proc_status(os.getpid())["VmRSS"],
            "seconds": elapsed,
            "sites": [
                (
                    f"{Path(s.traceback[0].filename).relative_to(ROOT)}:{s.traceback[0].lineno}"
                    if s.traceback[0].filename.startswith(str(ROOT))
                    else f"{Path(s.traceback[0].filename).name}:{s.traceback[0].lineno}",
                    s.size_diff / 1e6,
                    s.count_diff,
                )
                for s in sites
            ],
        }
        self.rows.append(row)
        print(
            f"{name:38} kept {row['kept_mb']:8.1f} MB  peak {row['peak_mb']:8.1f} MB  "
            f"traced {row['total_mb']:7.1f} MB  RSS {row['rss_mb']:7.1f} MB  "
            f"({elapsed:.1f} s)",
            flush=True,
        )
        for where, size, count in row["sites"]:
            if abs(size) >= 0.5:
                print(f"    {size:+8.1f} MB {count:+9d} blocks  {where}", flush=True)


def breakdown(args: argparse.Namespace) -> None:
    from kproxy.backends.iptables import IptablesProxier
    from kproxy.dns.index import IndexBuilder, diff_snapshots
    from kproxy.kube.ingest import StoreSink
    from kproxy.model.options import ProxyOptions
    from kproxy.model.store import Store
    from kproxy.model.view import build_views

    n, m = args.services, args.endpoints
    page = 500
    # the list responses as bytes, as they arrive (built before tracing starts)
    pages = {
        kind: [
            json.dumps({"items": [make(i) for i in range(lo, min(n, lo + page))]}).encode()
            for lo in range(0, n, page)
        ]
        for kind, make in (("Service", service_obj), ("EndpointSlice", lambda i: slice_obj(i, m)))
    }
    print(
        f"list responses: {sum(len(p) for v in pages.values() for p in v) / 1e6:.0f} MB of JSON",
        flush=True,
    )
    stages = Stages(args.top)
    store = Store()
    sink = StoreSink(store, node_name=NODE)
    with stages.stage("list + convert into the store"):
        # as the API source does it: each page decoded while the sink converts its items
        sink.replace("Node", [node_obj()])
        for kind, chunks in pages.items():
            sink.replace(kind, (item for chunk in chunks for item in json.loads(chunk)["items"]))
    with stages.stage("snapshot (store.take)"):
        snap, changes = store.take()
    options = ProxyOptions(node_name=NODE, cluster_cidrs=("10.0.0.0/8",))
    proxier = IptablesProxier(options=options)
    with stages.stage("iptables full sync (proxier state)"):
        proxier.sync(snap, changes, full=True)
    with stages.stage("daemon views of every service"):
        views = dict(build_views(snap, family=4, node_name=NODE))
    with stages.stage("DNS delta (diff_snapshots)"):
        delta = diff_snapshots(None, snap)
    with stages.stage("DNS delta pickled (the init frame)"):
        pickled = pickle.dumps(delta, protocol=pickle.HIGHEST_PROTOCOL)
    print(f"    pickled DNS delta: {len(pickled) / 1e6:.1f} MB", flush=True)
    del delta
    builder = IndexBuilder(ns_addresses=["127.0.0.1"])
    with stages.stage("DNS index (the worker's copy)"):
        index, _ = builder.apply(pickle.loads(pickled))
    assert views and index is not None
    if args.json:
        print(json.dumps(stages.rows))


def inner(args: argparse.Namespace) -> None:
    breakdown(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--part", choices=("agent", "breakdown", "both"), default="both")
    parser.add_argument("--mode", default="iptables", choices=("iptables",))
    parser.add_argument(
        "--master",
        action="store_true",
        help="agent: --master instead of a kubeconfig (imports what the in-cluster account does)",
    )
    parser.add_argument("--changes", type=int, default=20, help="endpoint changes after start")
    parser.add_argument("--change-interval", type=float, default=0.5)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before reading RSS")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--top", type=int, default=6, help="allocation sites shown per stage")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    if args.part in ("agent", "both"):
        result = run_agent(args)
        if args.json:
            print(json.dumps(result))
    if args.part in ("breakdown", "both"):
        print(f"\nbreakdown at {args.services} services x {args.endpoints} endpoints:", flush=True)
        with netns() as ns:
            argv = [sys.argv[0], *sys.argv[1:], "--inner"]
            subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, *argv],
                check=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )


if __name__ == "__main__":
    main()
