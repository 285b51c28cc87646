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

With --agent, the whole agent instead (`kproxy run` in a lab node namespace, fed by the fake
apiserver, real TCP traffic from a pod namespace), per flavour, in one run (issue 9):

cold start    process start to the first full sync's end (and that sync's own duration);
idle          --idle seconds after start-up: CPU % of one core of the agent's process group, and
              writes (restores reported by the sync log lines, plus whether the tables'
              fingerprint, the nf_tables generation or legacy's table entry counts, moved);
soak          one endpoint change every --interval seconds for --soak seconds: a prober in a pod
              namespace polls the Service (a new TCP connection every ~4 ms) from just before
              the EndpointSlice update until the new pod answers; p50/p99 of that delay, and
              changes the prober never saw (lost after --lost-after s);
raw           a rule-adding one-chain `iptables-<flavour>-restore --noflush` (a KUBE-SVC chain
              re-declared with its own rules) into the same tables right after the soak;
burst         --burst endpoint changes across as many services sent back to back: how many
              syncs until all are in the kernel, and a sample checked with `iptables -S`.

    sudo python3 benchmarks/iptables_bench.py --agent --services 10000 --idle 300 --soak 300
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


# -- the whole agent: idle, soak, burst (issue 9) ---------------------------------------------
PROBER = r"""
import socket, sys, time
def fetch(vip, port):
    s = socket.socket()
    s.settimeout(0.25)
    try:
        s.connect((vip, port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return data.decode(errors="replace")
            data += chunk
    except OSError:
        return ""
    finally:
        s.close()
for line in sys.stdin:
    vip, port, want, limit = line.split()
    deadline, tries = time.time() + float(limit), 0
    while True:
        tries += 1
        if want in fetch(vip, int(port)):
            print(f"ok {time.time():.6f} {tries}", flush=True)
            break
        if time.time() > deadline:
            print(f"lost {time.time():.6f} {tries}", flush=True)
            break
        time.sleep(0.004)
"""

SYNC_LOG = re.compile(
    r"^(\S+Z) \w+ kproxy synced (all rules|changes) in ([\d.]+) ms: \w+ sync \((\w+)\), "
    r"(\d+) services, (\d+) changed, (\d+) written",
    re.M,
)


@dataclass
class SyncLine:
    end: float  # wall clock
    full: bool
    ms: float
    reason: str
    changed: int
    written: int


def sync_lines(text: str) -> list[SyncLine]:
    out = []
    for m in SYNC_LOG.finditer(text):
        stamp = datetime.datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S.%fZ")
        end = stamp.replace(tzinfo=datetime.UTC).timestamp()
        out.append(SyncLine(end, m[2] == "all rules", float(m[3]), m[4], int(m[6]), int(m[7])))
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and of its children it has waited for (the
    iptables-restore and -save runs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def agent_run(flavour: str, n: int, m: int, args: argparse.Namespace) -> dict[str, Any]:
    """One agent run at n services x m endpoints: cold start, idle, soak, raw, burst."""
    from kproxy.lab.netlab import Lab
    from kproxy.lab.servers import serve_pods
    from tests.support.agent import Agent, serve_cluster_api
    from tests.support.objects import make_service_obj, make_slice_obj

    probes = min(args.probe_services, n)
    lab = Lab.create(nodes=1, pods_per_node=4, prefix="kpb")
    out: dict[str, Any] = {"flavour": flavour, "services": n, "endpoints": m}
    try:
        client, backends = lab.pods[0], lab.pods[1:]
        serve_pods(lab, backends, tcp=[8080])
        node = lab.nodes[0]
        if flavour == "legacy":  # kubelet's hint makes kproxy pick legacy, as on a real node
            lab.run(node.ns, ["iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
        with serve_cluster_api(lab) as (api, kubeconfig):
            current: dict[int, int] = {}

            def slice_obj(i: int, gen: int = 0) -> dict[str, Any]:
                if i < probes:
                    pod = backends[current.setdefault(i, i % len(backends))]
                    eps: list[Any] = [{"ip": pod.ip, "node": node.name, "pod": pod.name}]
                else:
                    eps = [e.address for e in endpoint_slice(i, m, gen=gen).endpoints]
                return make_slice_obj("bench", f"svc-{i}-abcde", f"svc-{i}", eps, [("http", 8080)])

            started = time.perf_counter()
            for i in range(n):
                svc = service(i)
                api.upsert(
                    make_service_obj(
                        "bench",
                        svc.name,
                        clusterIP=svc.cluster_ips[0],
                        ports=[{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
                    )
                )
                api.upsert(slice_obj(i))
            out["api_fill_s"] = time.perf_counter() - started
            agent = Agent(
                lab,
                node,
                kubeconfig,
                extra=["--iptables-min-sync-period", args.min_sync],
            )
            spawned = time.time()
            agent.start(wait=False)
            assert agent.proc is not None
            deadline = time.time() + 900
            while not any(s.full for s in sync_lines(full_log(agent))):
                if time.time() > deadline or agent.proc.poll() is not None:
                    raise RuntimeError(f"no first sync:\n{agent.log()}")
                time.sleep(0.2)
            first = next(s for s in sync_lines(full_log(agent)) if s.full)
            out["cold_start_s"] = first.end - spawned  # process start to rules in the kernel
            out["cold_sync_s"] = first.ms / 1000  # the first (full) sync itself
            gen_of = GEN_PROBE.replace("FLAVOUR", flavour)

            def generation() -> str:
                res = lab.run(
                    node.ns, [sys.executable, "-c", gen_of], capture_output=True, text=True
                )
                return res.stdout.strip()

            # idle
            time.sleep(2.0)
            before_lines = len(sync_lines(full_log(agent)))
            gen0, cpu0, t0 = generation(), process_cpu(agent.proc.pid), time.perf_counter()
            time.sleep(args.idle)
            cpu1, t1, gen1 = process_cpu(agent.proc.pid), time.perf_counter(), generation()
            idle_syncs = sync_lines(full_log(agent))[before_lines:]
            out.update(
                idle_s=t1 - t0,
                idle_cpu_pct=100 * (cpu1 - cpu0) / (t1 - t0),
                idle_writes=sum(s.written for s in idle_syncs) + (gen0 != gen1),
                idle_tables_unchanged=gen0 == gen1,
                idle_syncs=len(idle_syncs),
                idle_full_syncs=sum(s.full for s in idle_syncs),
            )
            # soak: one change every interval, the prober timing each from the API update to
            # the first answer of the new pod
            prober = lab.spawn(
                client.ns,
                [sys.executable, "-c", PROBER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert prober.stdin is not None and prober.stdout is not None
            lat, lost, tries = [], 0, []
            soak_end = time.monotonic() + args.soak
            k = 0
            cpu_s0, ts0, soak_wall = process_cpu(agent.proc.pid), time.perf_counter(), time.time()
            while time.monotonic() < soak_end:
                tick = time.monotonic()
                i = k % probes
                current[i] = (current.get(i, i % len(backends)) + 1) % len(backends)
                want = backends[current[i]]
                vip = service(i).cluster_ips[0]
                prober.stdin.write(f"{vip} 80 {want.name} {args.lost_after}\n")
                prober.stdin.flush()
                time.sleep(0.02)  # the prober is polling the old pod by now
                t_update = time.time()
                api.upsert(slice_obj(i))
                kind, when, n_tries = prober.stdout.readline().split()
                if kind == "ok":
                    lat.append(float(when) - t_update)
                    tries.append(int(n_tries))
                else:
                    lost += 1
                k += 1
                time.sleep(max(0.0, args.interval - (time.monotonic() - tick)))
            out.update(
                soak_changes=k,
                soak_lost=lost,
                soak_p50=statistics.median(lat) if lat else None,
                soak_p99=pct(lat, 0.99) if lat else None,
                soak_max=max(lat) if lat else None,
                soak_cpu_pct=100
                * (process_cpu(agent.proc.pid) - cpu_s0)
                / (time.perf_counter() - ts0),
                soak_full_syncs=sum(
                    s.full for s in sync_lines(full_log(agent)) if s.end > soak_wall
                ),
            )
            prober.stdin.close()
            prober.wait(10)
            # raw: a rule-adding one-chain restore into the same tables, now
            chain = C.svc_chain("bench/svc-0:http", "tcp")
            listed = lab.run(
                node.ns,
                [f"iptables-{flavour}", "-w", "5", "-t", "nat", "-S", chain],
                capture_output=True,
                text=True,
            ).stdout
            rules = "".join(ln + "\n" for ln in listed.splitlines() if ln.startswith("-A "))
            text = f"*nat\n:{chain} - [0:0]\n{rules}COMMIT\n"
            raw = []
            for _ in range(args.raw_changes):
                t = time.perf_counter()
                lab.run(
                    node.ns,
                    [f"iptables-{flavour}-restore", "--noflush", "-w", "5"],
                    input=text,
                    text=True,
                    capture_output=True,
                )
                raw.append(time.perf_counter() - t)
                time.sleep(0.2)
            out.update(raw_p50=statistics.median(raw), raw_p99=pct(raw, 0.99))
            # burst: 100 endpoint changes across 100 services within one second
            burst = [probes + j for j in range(min(args.burst, n - probes))]
            mark = len(sync_lines(full_log(agent)))
            t_burst = time.time()
            for j, i in enumerate(burst):  # as fast as the API takes them (well within 1 s)
                api.upsert(slice_obj(i, gen=1000 + j))
            t_sent = time.time()
            deadline = time.time() + 120
            needed: list[SyncLine] = []
            while time.time() < deadline:
                new = [s for s in sync_lines(full_log(agent))[mark:] if s.changed]
                if sum(s.changed for s in new) >= len(burst):
                    needed = new
                    break
                time.sleep(0.1)
            sample = burst[:: max(1, len(burst) // 5)]
            present = 0
            for j, i in ((b - probes, b) for b in sample):
                new_ip = f"10.250.{(1000 + j) // 256 % 256}.{(1000 + j) % 256}"
                svc_rules = lab.run(
                    node.ns,
                    [
                        f"iptables-{flavour}",
                        "-w",
                        "5",
                        "-t",
                        "nat",
                        "-S",
                        C.svc_chain(f"bench/svc-{i}:http", "tcp"),
                    ],
                    capture_output=True,
                    text=True,
                ).stdout
                present += new_ip in svc_rules
            soak_syncs = [s for s in sync_lines(full_log(agent)) if s.end > soak_wall]
            partial_ms = [s.ms for s in soak_syncs if not s.full and s.written]
            out.update(
                sync_partial_p50_ms=statistics.median(partial_ms) if partial_ms else None,
                burst_changes=len(burst),
                burst_send_s=t_sent - t_burst,
                burst_syncs=len(needed) if needed else None,
                burst_done_s=(needed[-1].end - t_burst) if needed else None,
                burst_sampled_in_kernel=f"{present}/{len(sample)}",
            )
            agent.stop()
    finally:
        if args.keep_logs:
            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            log_copy = Path(args.keep_logs, f"kproxy-{flavour}-{n}.log")
            log_copy.write_text(full_log(agent) if "agent" in locals() else "")
        lab.teardown()
    return out


def full_log(agent: Any) -> str:
    try:
        return Path(agent.log_path).read_text(errors="replace")
    except OSError:
        return ""


GEN_PROBE = (
    "from kproxy.backends.iptables_drift import fingerprint;"
    "print(fingerprint('FLAVOUR', 4, ('nat', 'filter', 'mangle')))"
)


def agent_main(args: argparse.Namespace) -> None:
    rows = []
    for n in args.services:
        for flavour in args.flavours:
            row = agent_run(flavour, n, args.endpoints, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        return
    print(
        f"\n{'flavour':7} {'services':>8} {'cold s':>6} {'idle CPU%':>9} {'idle writes':>11} "
        f"{'soak p50/p99 ms':>15} {'raw p50/p99 ms':>14} {'p50 ratio':>9} {'p99 ratio':>9} "
        f"{'lost':>4} {'burst syncs':>11} {'burst s':>7}"
    )
    for r in rows:
        p50r = r["soak_p50"] / r["raw_p50"] if r.get("soak_p50") else float("nan")
        p99r = r["soak_p99"] / r["raw_p99"] if r.get("soak_p99") else float("nan")
        print(
            f"{r['flavour']:7} {r['services']:8d} {r['cold_start_s']:6.1f} "
            f"{r['idle_cpu_pct']:9.2f} {r['idle_writes']:11d} "
            f"{ms(r['soak_p50']) + '/' + ms(r['soak_p99']):>15} "
            f"{ms(r['raw_p50']) + '/' + ms(r['raw_p99']):>14} {p50r:9.2f} {p99r:9.2f} "
            f"{r['soak_lost']:4d} {r['burst_syncs']!s:>11} {r['burst_done_s'] or 0:7.2f}"
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
    agent = parser.add_argument_group("--agent: the whole agent (idle, soak, burst)")
    agent.add_argument("--agent", action="store_true", help="run the agent scenarios")
    agent.add_argument("--idle", type=float, default=300.0, help="idle seconds (5 min)")
    agent.add_argument("--soak", type=float, default=300.0, help="soak seconds (5 min)")
    agent.add_argument("--interval", type=float, default=1.5, help="seconds between changes")
    agent.add_argument("--lost-after", type=float, default=30.0)
    agent.add_argument("--burst", type=int, default=100)
    agent.add_argument("--probe-services", type=int, default=20)
    agent.add_argument("--raw-changes", type=int, default=20)
    agent.add_argument("--min-sync", default="1s", help="--iptables-min-sync-period")
    agent.add_argument("--keep-logs", default="", help="copy the agent logs to this directory")
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
    if args.agent:
        agent_main(args)
        return
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
            change = ms(k.get("change_p50")) + "/" + ms(k.get("change_p95"))
            raw_change = ms(k.get("raw_change_p50")) + "/" + ms(k.get("raw_change_p95"))
            print(
                f"{flavour:7} {n:8d} {k['rules']['nat']:9d} {k['restores']:8d} {ms(full):>8} "
                f"{ms(raw_full):>8} {full / raw_full:5.2f} {one:>11} "
                f"{ms(k.get('resync')):>9} {change:>17} {raw_change:>19}",
                flush=True,
            )
            print(
                f"        first run: iptables-save {ms(k['full_save'])}, kproxy process CPU "
                f"{ms(k['full_cpu'])} (model, render, pipe writes; overlapped with the restore "
                f"for legacy); resync CPU {ms(k.get('resync_cpu'))}, save "
                f"{ms(k.get('resync_save'))}; runs: kproxy {', '.join(ms(x) for x in fulls)}, raw "
                f"{', '.join(ms(x) for x in raws)}; raw 1-chain p50 with PREROUTING/OUTPUT "
                f"unhooked {ms(k.get('raw_change_unhooked_p50'))}",
                flush=True,
            )


if __name__ == "__main__":
    main()
