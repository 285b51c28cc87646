#!/usr/bin/env python3
"""iptables mode: kproxy's sync times beside raw iptables-restore of the identical input.

For each flavour (nft, legacy) and each N (services with M endpoints each), in throwaway network
namespaces (nothing outside them is touched):

full sync     kproxy: IptablesProxier.sync(full=True) from a fresh model snapshot into an
              empty namespace (build views, render, read back the tables, restore);
              raw: iptables-<flavour>-restore --noflush of exactly the inputs kproxy wrote
              (the same number of invocations), in another empty namespace. Ratio = kproxy/raw.
              For nft, where kproxy splits large full syncs, "raw 1 input" also restores the
              whole text as a single input (skipped above --single-max services: it is
              quadratic and takes tens of minutes at 10k).
resync        a second full sync on the populated tables (the periodic resync).
change        one endpoint change at N services: from the EndpointSlice update arriving in the
              store to the restore returning (network programming latency), p50/p95 over
              --changes changes; beside a raw one-chain --noflush restore (the service's
              KUBE-SVC chain) into the same populated tables; and the raw one-chain
              restore again after unhooking nat PREROUTING/OUTPUT (what it costs when no
              packet can reach kproxy's chains: on nft the kernel then has little to
              re-validate).

    sudo python3 benchmarks/iptables_bench.py --services 1000 10000 --endpoints 10
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kproxy.backends.iptables import IptablesProxier
from kproxy.backends.iptables_exec import ProcessRestorer
from kproxy.model.objects import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Service,
    ServicePort,
)
from kproxy.model.options import ProxyOptions
from kproxy.model.store import Store
from kproxy.render import chains as C


def service(i: int) -> Service:
    return Service(
        namespace="bench",
        name=f"svc-{i}",
        cluster_ips=(f"172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}",),
        ports=(ServicePort("http", "TCP", 80, 8080),),
    )


def endpoint_slice(i: int, m: int, *, gen: int = 0) -> EndpointSlice:
    base = m * i
    eps = [
        Endpoint(
            address=f"10.{(base + k) // 65536 % 256}.{(base + k) // 256 % 256}.{(base + k) % 256}"
        )
        for k in range(m)
    ]
    if gen:  # the first endpoint is replaced by a new pod
        eps[0] = Endpoint(address=f"10.250.{gen // 256 % 256}.{gen % 256}")
    return EndpointSlice(
        namespace="bench",
        name=f"svc-{i}-abcde",
        service_name=f"svc-{i}",
        endpoints=tuple(eps),
        ports=(EndpointPort("http", "TCP", 8080),),
    )


class TimedRun:
    """subprocess.run that records the time spent in iptables-save calls."""

    def __init__(self) -> None:
        self.save_s = 0.0

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        started = time.perf_counter()
        try:
            return subprocess.run(argv, **kw)
        finally:
            if "save" in argv[0]:
                self.save_s += time.perf_counter() - started


class RecordingRestorer:
    """kproxy's streaming restorer, remembering every input (to replay it raw)."""

    def __init__(self) -> None:
        self.inputs: list[list[str]] = []

    def open(self, argv: Any) -> Any:
        sink = ProcessRestorer().open(argv)
        parts: list[str] = []
        self.inputs.append(parts)

        class Sink:
            def write(self, text: str) -> None:
                parts.append(text)
                sink.write(text)

            def end(self) -> None:
                sink.end()

            def wait(self) -> None:
                sink.wait()

            def abort(self) -> None:
                sink.abort()

        return Sink()

    def texts(self) -> list[str]:
        return ["".join(p) for p in self.inputs]


def restore(flavour: str, text: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [f"iptables-{flavour}-restore", "--noflush", "-w", "5"],
        input=text,
        text=True,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- inside a namespace ------------------------------------------------------------------------
def inner_kproxy(flavour: str, n: int, m: int, changes: int, workdir: str) -> dict[str, Any]:
    store = Store()
    store.replace_services([service(i) for i in range(n)])
    store.replace_slices([endpoint_slice(i, m) for i in range(n)])
    run, restorer = TimedRun(), RecordingRestorer()
    options = ProxyOptions(node_name="bench", cluster_cidrs=("10.0.0.0/8",))
    proxier = IptablesProxier(options=options, flavour=flavour, run=run, restorer=restorer)
    snap, changed = store.take()
    started, cpu = time.perf_counter(), time.process_time()
    result = proxier.sync(snap, changed, full=True)
    full = time.perf_counter() - started
    out: dict[str, Any] = {
        "full": full,
        "full_cpu": time.process_time() - cpu,
        "full_save": run.save_s,
        "restores": len(restorer.inputs),
        "rules": result.rules,
    }
    for k, text in enumerate(restorer.texts()):
        Path(workdir, f"full-{k:04d}.txt").write_text(text)
    if not changes:
        return out
    run.save_s, restorer.inputs = 0.0, []
    started, cpu = time.perf_counter(), time.process_time()
    proxier.sync(*store.take(), full=True)
    out["resync"] = time.perf_counter() - started
    out["resync_cpu"] = time.process_time() - cpu
    out["resync_save"] = run.save_s

    latencies, raw, inputs = [], [], []
    for k in range(1, changes + 1):
        i = (k * 7919) % n
        restorer.inputs = []
        started = time.perf_counter()
        store.set_slice(endpoint_slice(i, m, gen=k))
        snap, changed = store.take()
        proxier.sync(snap, changed, full=False)
        latencies.append(time.perf_counter() - started)
        # the raw one-chain change: the same service's KUBE-SVC chain, as kproxy wrote it
        svc = C.svc_chain(f"bench/svc-{i}:http", "tcp")
        rules = "".join(
            ln + "\n" for ln in restorer.texts()[-1].splitlines() if ln.startswith(f"-A {svc} ")
        )
        inputs.append(f"*nat\n:{svc} - [0:0]\n{rules}COMMIT\n")
        raw.append(restore(flavour, inputs[-1]))
    # The same raw one-chain restores once the built-in chains no longer jump into kproxy's
    # chains (same tables otherwise). On nft every input that adds a rule makes the kernel
    # re-validate every chain reachable from a base chain, so this isolates that cost: it is
    # the condition of the often-quoted ~16 ms, which a working node never is in.
    subprocess.run(
        [f"iptables-{flavour}", "-t", "nat", "-F", "PREROUTING"], check=True, capture_output=True
    )
    subprocess.run(
        [f"iptables-{flavour}", "-t", "nat", "-F", "OUTPUT"], check=True, capture_output=True
    )
    unhooked = [restore(flavour, text) for text in inputs]
    out.update(
        change_p50=statistics.median(latencies),
        change_p95=pct(latencies, 0.95),
        raw_change_p50=statistics.median(raw),
        raw_change_p95=pct(raw, 0.95),
        raw_change_unhooked_p50=statistics.median(unhooked),
    )
    return out


def inner_raw(flavour: str, workdir: str, single: bool) -> dict[str, Any]:
    texts = [p.read_text() for p in sorted(Path(workdir).glob("full-*.txt"))]
    if single:
        merged = merge(texts)
        return {"raw_single": restore(flavour, merged)}
    return {"raw": sum(restore(flavour, t) for t in texts)}


def merge(texts: list[str]) -> str:
    """The restore inputs of one sync as one input (same lines, one transaction per table)."""
    tables: dict[str, tuple[list[str], list[str]]] = {}
    for text in texts:
        table = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
                tables.setdefault(table, ([], []))
            elif line != "COMMIT":
                decl, rest = tables[table]
                (decl if line.startswith(":") else rest).append(line)
    return "".join(
        f"*{t}\n" + "".join(x + "\n" for x in decl + rest) + "COMMIT\n"
        for t, (decl, rest) in tables.items()
    )


# -- outside -----------------------------------------------------------------------------------
def in_netns(args: list[str], *, timeout: float | None = None) -> dict[str, Any] | None:
    ns = f"kpbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        argv = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--inner"]
        res = subprocess.run(
            [*argv, *args], check=True, capture_output=True, text=True, timeout=timeout
        )
        result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        return result
    except subprocess.TimeoutExpired:
        return None
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def ms(seconds: float | None) -> str:
    return (
        "-"
        if seconds is None
        else f"{seconds * 1000:.0f}"
        if seconds >= 1
        else f"{seconds * 1000:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--flavours", nargs="+", default=["nft", "legacy"])
    parser.add_argument("--single-max", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="full-sync runs (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    parser.add_argument("--inner", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        mode, flavour, *rest = args.inner
        if mode == "kproxy":
            n, m, changes, workdir = rest
            print(json.dumps(inner_kproxy(flavour, int(n), int(m), int(changes), workdir)))
        else:
            workdir, single = rest
            print(json.dumps(inner_raw(flavour, workdir, single == "1")))
        return
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    header = (
        f"{'flavour':7} {'services':>8} {'nat rules':>9} {'restores':>8} {'full ms':>8} "
        f"{'raw ms':>8} {'ratio':>5} {'raw 1 input':>11} {'resync ms':>9} "
        f"{'change p50/p95 ms':>17} {'raw 1-chain p50/p95':>19}"
    )
    if not args.json:
        print(header)
    for flavour in args.flavours:
        for n in args.services:
            fulls, raws, first, single = [], [], None, None
            for rep in range(args.repeat):
                changes = args.changes if rep == 0 else 0
                with tempfile.TemporaryDirectory(prefix="kproxy-iptbench-") as workdir:
                    # alternate kproxy and raw so that load from elsewhere hits both alike
                    k = in_netns(
                        ["kproxy", flavour, str(n), str(args.endpoints), str(changes), workdir]
                    )
                    raw = in_netns(["raw", flavour, workdir, "0"])
                    if rep == 0 and k and k["restores"] > 1 and n <= args.single_max:
                        single = in_netns(["raw", flavour, workdir, "1"])
                assert k is not None and raw is not None
                first = first or k
                fulls.append(k["full"])
                raws.append(raw["raw"])
            k = first
            assert k is not None
            full, raw_full = statistics.median(fulls), statistics.median(raws)
            row = {
                "flavour": flavour,
                "services": n,
                **k,
                "full": full,
                "raw": raw_full,
                "fulls": fulls,
                "raws": raws,
                **(single or {}),
            }
            if args.json:
                print(json.dumps(row), flush=True)
                continue
            one = ms(single["raw_single"]) if single else ("-" if k["restores"] == 1 else "n/a")
            print(
                f"{flavour:7} {n:8d} {k['rules']['nat']:9d} {k['restores']:8d} {ms(full):>8} "
                f"{ms(raw_full):>8} {full / raw_full:5.2f} {one:>11} "
                f"{ms(k['resync']):>9} "
                f"{ms(k['change_p50']) + '/' + ms(k['change_p95']):>17} "
                f"{ms(k['raw_change_p50']) + '/' + ms(k['raw_change_p95']):>19}",
                flush=True,
            )
            print(
                f"        first run: iptables-save {ms(k['full_save'])}, kproxy process CPU "
                f"{ms(k['full_cpu'])} (model, render, pipe writes; overlapped with the restore "
                f"for legacy); resync CPU {ms(k['resync_cpu'])}, save {ms(k['resync_save'])}; "
                f"runs: kproxy {', '.join(ms(x) for x in fulls)}, raw "
                f"{', '.join(ms(x) for x in raws)}; raw 1-chain p50 with PREROUTING/OUTPUT "
                f"unhooked {ms(k['raw_change_unhooked_p50'])}",
                flush=True,
            )


if __name__ == "__main__":
    main()
