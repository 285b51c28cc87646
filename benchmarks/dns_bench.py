"""DNS benchmark: kproxy's DNS against NSD, same names, same dnsperf load, same run.

    python3 benchmarks/dns_bench.py [--services 10000] [--duration 10] [--workers 1] [--churn]

Needs `dnsperf` and `nsd` (Debian packages of the same names) and root only if port < 1024.
Everything runs on loopback (127.0.0.201 for NSD, 127.0.0.202 for kproxy, high ports).

The zone: `--services` ClusterIP services (one named port, one EndpointSlice with two ready
endpoints each), `--headless` headless services with `--endpoints` endpoints each (StatefulSet
hostnames). The query mix: service A records, headless A sets, per-endpoint names, SRV, PTR, and
`--nx` (10%) names that do not exist.

For each server it reports: the maximum QPS dnsperf reaches (`-l duration`, `--clients`
sockets), the server's CPU time per query from /proc/PID/stat (dnsperf needs most of a core
here, so QPS alone is noisy), then p50/p99 latency at a fixed `--rate` (dnsperf -Q, per-query
latencies from -v). For kproxy also the index build time and the serving processes' RSS.

`--churn` runs what the daemon does beside DNS while kproxy is measured: every 100 ms one
service's endpoints change, the store snapshot is pushed to DNS, and the full iptables ruleset
for all services is rendered (the CPU of a proxy sync) in the daemon process.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from kproxy.dns import DNSOptions, DNSService
from kproxy.model.objects import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Service,
    ServicePort,
)
from kproxy.model.store import Store

ZONE = "cluster.local"
NSD_ADDR = ("127.0.0.201", 5301)
KPROXY_ADDR = ("127.0.0.202", 5302)
CLK = os.sysconf("SC_CLK_TCK")


# -- the model and the names ----------------------------------------------------------------


@dataclass
class Model:
    services: list[Service]
    slices: list[EndpointSlice]


def _ip(base: str, n: int) -> str:
    return str(ipaddress.ip_address(base) + n)


def build_model(services: int, headless: int, endpoints: int) -> Model:
    svcs: list[Service] = []
    slices: list[EndpointSlice] = []
    namespaces = max(1, services // 100)
    for i in range(services):
        ns, name = f"ns-{i % namespaces}", f"svc-{i}"
        svcs.append(
            Service(
                namespace=ns,
                name=name,
                cluster_ips=(_ip("10.96.0.10", i),),
                ports=(ServicePort("http", "TCP", 80, 8080),),
            )
        )
        eps = tuple(Endpoint(_ip("10.128.0.0", 2 * i + k), node_name=f"node-{k}") for k in range(2))
        slices.append(
            EndpointSlice(
                ns, f"{name}-abc", name, endpoints=eps, ports=(EndpointPort("http", "TCP", 8080),)
            )
        )
    for h in range(headless):
        ns, name = f"ns-{h % namespaces}", f"db-{h}"
        svcs.append(
            Service(
                namespace=ns,
                name=name,
                headless=True,
                ports=(ServicePort("peer", "TCP", 5432, 5432),),
            )
        )
        eps = tuple(
            Endpoint(_ip("10.200.0.0", h * endpoints + k), hostname=f"{name}-{k}")
            for k in range(endpoints)
        )
        slices.append(
            EndpointSlice(
                ns, f"{name}-xyz", name, endpoints=eps, ports=(EndpointPort("peer", "TCP", 5432),)
            )
        )
    return Model(svcs, slices)


def _svc_name(s: Service) -> str:
    return f"{s.name}.{s.namespace}.svc.{ZONE}"


def _rev(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


def zone_file(model: Model) -> str:
    """The same names as an NSD zone file."""
    out = [
        f"$ORIGIN {ZONE}.",
        "$TTL 5",
        f"@ IN SOA ns.dns.{ZONE}. hostmaster.{ZONE}. 1 7200 1800 86400 5",
        f"@ IN NS ns.dns.{ZONE}.",
        f"ns.dns IN A {KPROXY_ADDR[0]}",
        'dns-version IN TXT "1.1.0"',
    ]
    by_svc = {(sl.namespace, sl.service_name): sl for sl in model.slices}
    for s in model.services:
        fq = _svc_name(s) + "."
        sl = by_svc.get((s.namespace, s.name))
        if s.headless and sl is not None:
            for ep in sl.endpoints:
                host = f"{ep.hostname}.{fq}"
                out.append(f"{fq} IN A {ep.address}")
                out.append(f"{host} IN A {ep.address}")
                for p in sl.ports:
                    out.append(f"_{p.name}._tcp.{fq} IN SRV 0 5 {p.port} {host}")
        else:
            for ip in s.cluster_ips:
                out.append(f"{fq} IN A {ip}")
            for p in s.ports:
                out.append(f"_{p.name}._tcp.{fq} IN SRV 0 100 {p.port} {fq}")
            if sl is not None:
                for ep in sl.endpoints:
                    out.append(f"{ep.address.replace('.', '-')}.{fq} IN A {ep.address}")
    return "\n".join(out) + "\n"


def reverse_zone_file(model: Model) -> str:
    out = [
        "$ORIGIN in-addr.arpa.",
        "$TTL 5",
        f"@ IN SOA ns.dns.{ZONE}. hostmaster.{ZONE}. 1 7200 1800 86400 5",
        f"@ IN NS ns.dns.{ZONE}.",
    ]
    for s in model.services:
        for ip in s.cluster_ips:
            out.append(f"{_rev(ip)}. IN PTR {_svc_name(s)}.")
    return "\n".join(out) + "\n"


def query_file(model: Model, count: int, nx: float, seed: int = 7) -> str:
    rnd = random.Random(seed)
    normal = [s for s in model.services if not s.headless]
    headless = [s for s in model.services if s.headless]
    lines = []
    for i in range(count):
        r = rnd.random()
        if r < nx:
            lines.append(f"missing-{i}.ns-{i % 7}.svc.{ZONE} A")
        elif r < nx + 0.55:
            lines.append(f"{_svc_name(rnd.choice(normal))} A")
        elif r < nx + 0.65 and headless:
            lines.append(f"{_svc_name(rnd.choice(headless))} A")
        elif r < nx + 0.75 and headless:
            h = rnd.choice(headless)
            lines.append(f"{h.name}-{rnd.randrange(20)}.{_svc_name(h)} A")
        elif r < nx + 0.85:
            lines.append(f"_http._tcp.{_svc_name(rnd.choice(normal))} SRV")
        else:
            lines.append(f"{_rev(rnd.choice(normal).cluster_ips[0])} PTR")
    return "\n".join(lines) + "\n"


# -- process accounting ---------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pids_with(needle: str) -> list[int]:
    """Processes whose command line contains `needle` (NSD forks its servers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline:
                pids.append(int(entry.name))
    return pids


# -- dnsperf ----------------------------------------------------------------------------------


@dataclass
class Run:
    qps: float
    lost: float
    cpu_us_per_query: float
    completed: int
    latencies_ms: list[float]

    def pct(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def dnsperf(
    addr: tuple[str, int],
    qfile: str,
    *,
    duration: int,
    clients: int,
    pids: list[int],
    rate: int | None = None,
) -> Run:
    cmd = ["dnsperf", "-s", addr[0], "-p", str(addr[1]), "-d", qfile, "-l", str(duration)]
    cmd += ["-c", str(clients), "-q", "500", "-t", "2"]
    if rate:
        cmd += ["-Q", str(rate), "-v"]
    before = cpu_seconds(pids)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = cpu_seconds(pids)
    qps = lost = 0.0
    completed = 0
    lat: list[float] = []
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("Queries per second:"):
            qps = float(s.split()[-1])
        elif s.startswith("Queries lost:"):
            lost = float(s.split("(")[1].rstrip("%)"))
        elif s.startswith("Queries completed:"):
            completed = int(s.split()[2])
        elif rate and s.startswith(">"):
            with contextlib.suppress(ValueError):
                lat.append(float(s.split()[-1]) * 1000)
    cpu = (after - before) / max(completed, 1) * 1e6
    return Run(qps=qps, lost=lost, cpu_us_per_query=cpu, completed=completed, latencies_ms=lat)


# -- servers ----------------------------------------------------------------------------------


def start_nsd(model: Model, workdir: Path, servers: int) -> subprocess.Popen[bytes]:
    (workdir / f"{ZONE}.zone").write_text(zone_file(model))
    (workdir / "in-addr.arpa.zone").write_text(reverse_zone_file(model))
    conf = workdir / "nsd.conf"
    conf.write_text(
        f"""server:
  ip-address: {NSD_ADDR[0]}@{NSD_ADDR[1]}
  port: {NSD_ADDR[1]}
  server-count: {servers}
  username: ""
  chroot: ""
  zonesdir: "{workdir}"
  pidfile: "{workdir}/nsd.pid"
  database: ""
  zonelistfile: "{workdir}/zone.list"
  xfrdfile: "{workdir}/xfrd.state"
  xfrdir: "{workdir}"
  logfile: "{workdir}/nsd.log"
  rrl-ratelimit: 0
  verbosity: 1
remote-control:
  control-enable: no
zone:
  name: {ZONE}
  zonefile: {ZONE}.zone
zone:
  name: in-addr.arpa
  zonefile: in-addr.arpa.zone
"""
    )
    proc = subprocess.Popen(["nsd", "-d", "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = subprocess.run(
            [
                "dig",
                f"@{NSD_ADDR[0]}",
                "-p",
                str(NSD_ADDR[1]),
                f"dns-version.{ZONE}",
                "TXT",
                "+short",
                "+time=1",
                "+tries=1",
            ],
            capture_output=True,
            text=True,
        )
        if "1.1.0" in probe.stdout:
            return proc
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("NSD did not come up; see " + str(workdir / "nsd.log"))


def churn(
    store: Store, dns: DNSService, model: Model, stop: threading.Event, out: dict[str, float]
) -> None:
    """Daemon-side load: endpoint changes, DNS updates and full iptables renders."""
    from kproxy.model.options import ProxyOptions
    from kproxy.model.view import build_views
    from kproxy.render.iptables import render_ruleset

    rnd = random.Random(1)
    opts = ProxyOptions(cluster_cidrs=("10.128.0.0/9",))
    n = 0
    while not stop.is_set():
        sl = rnd.choice(model.slices[: len(model.slices) - 100])
        n += 1
        eps = (Endpoint(_ip("10.250.0.0", n % 60000)), *sl.endpoints[1:])
        store.set_slice(replace(sl, endpoints=eps))
        snap = store.peek()
        dns.update(snap)
        t0 = time.monotonic()
        render_ruleset(build_views(snap, family=4, node_name="node-0"), opts)
        out["render_s"] += time.monotonic() - t0
        out["changes"] += 1
        stop.wait(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--headless", type=int, default=100)
    ap.add_argument("--endpoints", type=int, default=20)
    ap.add_argument("--nx", type=float, default=0.10)
    ap.add_argument("--queries", type=int, default=50_000)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rate", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--nsd-servers", type=int, default=1)
    ap.add_argument("--churn", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds per server")
    ap.add_argument("--skip-nsd", action="store_true")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()

    for tool in ("dnsperf",) + (() if args.skip_nsd else ("nsd",)):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install dnsperf nsd)", file=sys.stderr)
            return 2

    model = build_model(args.services, args.headless, args.endpoints)
    workdir = Path(tempfile.mkdtemp(prefix="kproxy-dnsbench-"))
    qfile = workdir / "queries.txt"
    qfile.write_text(query_file(model, args.queries, args.nx))
    results: dict[str, object] = {
        "services": args.services,
        "headless": f"{args.headless}x{args.endpoints}",
        "nx": args.nx,
        "duration_s": args.duration,
        "clients": args.clients,
        "workers": args.workers,
        "churn": args.churn,
        "rounds": args.rounds,
    }

    store = Store()
    store.replace_services(model.services)
    store.replace_slices(model.slices)
    nsd = None
    dns = DNSService(
        options=DNSOptions(
            listen=(f"{KPROXY_ADDR[0]}:{KPROXY_ADDR[1]}",),
            workers=args.workers,
            create_interface=False,
            upstreams=(),
        )
    )
    stop = threading.Event()
    churned = {"changes": 0, "render_s": 0.0}
    try:
        if not args.skip_nsd:
            nsd = start_nsd(model, workdir, args.nsd_servers)
        dns.start()
        t0 = time.monotonic()
        dns.update(store.peek())
        dns.flush(120)
        results["kproxy_index_build_s"] = round(time.monotonic() - t0, 3)
        pids = list(dns.worker_pids)
        results["kproxy_rss_mb"] = round(sum(rss_mb(p) for p in pids), 1)
        results["daemon_rss_mb"] = round(rss_mb(os.getpid()), 1)

        def warm(addr: tuple[str, int], ps: list[int]) -> None:
            """One pass through the query file, so that both servers start warm."""
            subprocess.run(
                ["dnsperf", "-s", addr[0], "-p", str(addr[1]), "-d", str(qfile), "-n", "1"],
                capture_output=True,
                check=True,
            )

        servers = []
        if nsd is not None:
            servers.append(("nsd", NSD_ADDR, pids_with(str(workdir / "nsd.conf"))))
        servers.append(("kproxy", KPROXY_ADDR, pids))
        for _, addr, ps in servers:
            warm(addr, ps)
        churner = None
        if args.churn:
            churner = threading.Thread(target=churn, args=(store, dns, model, stop, churned))
            churner.start()
        # rounds alternate between the servers so that both see the same machine load
        tops: dict[str, list[Run]] = {name: [] for name, _, _ in servers}
        fixed: dict[str, list[Run]] = {name: [] for name, _, _ in servers}
        for _ in range(args.rounds):
            for name, addr, ps in servers:
                tops[name].append(
                    dnsperf(addr, str(qfile), duration=args.duration, clients=args.clients, pids=ps)
                )
            for name, addr, ps in servers:
                fixed[name].append(
                    dnsperf(
                        addr,
                        str(qfile),
                        duration=args.duration,
                        clients=args.clients,
                        pids=ps,
                        rate=args.rate,
                    )
                )
        stop.set()
        if churner is not None:
            churner.join()
            results["churn"] = {
                "model_changes": churned["changes"],
                "iptables_render_s_mean": round(
                    churned["render_s"] / max(churned["changes"], 1), 3
                ),
            }
        for name, _, _ in servers:
            top = max(tops[name], key=lambda r: r.qps)
            lat = sorted(fixed[name], key=lambda r: r.pct(99))[len(fixed[name]) // 2]
            results[name] = {
                "max_qps": round(top.qps),
                "max_qps_rounds": [round(r.qps) for r in tops[name]],
                "lost_pct": top.lost,
                "cpu_us_per_query": round(
                    statistics.median(r.cpu_us_per_query for r in tops[name]), 2
                ),
                f"at_{args.rate}_qps": {
                    "qps": round(lat.qps),
                    "lost_pct": lat.lost,
                    "p50_ms": round(lat.pct(50), 3),
                    "p99_ms": round(lat.pct(99), 3),
                    "p99_ms_rounds": [round(r.pct(99), 3) for r in fixed[name]],
                    "max_ms": round(max(lat.latencies_ms, default=float("nan")), 3),
                },
            }
        results["kproxy_rss_mb_after"] = round(sum(rss_mb(p) for p in dns.worker_pids), 1)
        if nsd is not None:
            k, ns_ = results["kproxy"], results["nsd"]
            assert isinstance(k, dict) and isinstance(ns_, dict)
            results["qps_ratio_kproxy_to_nsd"] = round(k["max_qps"] / max(ns_["max_qps"], 1), 2)
            results["cpu_ratio_kproxy_to_nsd"] = round(
                k["cpu_us_per_query"] / max(ns_["cpu_us_per_query"], 0.01), 2
            )
    finally:
        stop.set()
        dns.stop()
        if nsd is not None:
            nsd.send_signal(signal.SIGTERM)
            try:
                nsd.wait(10)
            except subprocess.TimeoutExpired:
                nsd.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
