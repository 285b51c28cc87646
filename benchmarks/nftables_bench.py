"""nftables mode end to end: `NftablesProxier` at N services x M endpoints, against raw `nft -f`.

Run as root (each measurement in a fresh network namespace):

    python3 benchmarks/nftables_bench.py --services 10000 --endpoints 10 --json out.json

What is timed (all wall clock, one run):

- full sync from empty: `NftablesProxier.sync(full=True)` from a loaded model (views, encoding,
  the read-back of the absent table, the netlink batch and its commit), against `nft -f` of
  the text of the same transaction (what `kproxy render` prints);
- one endpoint change: one EndpointSlice gets one endpoint replaced in the `Store`, then
  `Store.take()` and the partial sync to the kernel (the netlink batch), repeated; p50/p99/max,
  and the kernel's share (the `sendmsg` of the batch, which the kernel processes inside the
  call). Compared with `nft -f` of the same delta text (the command kube-proxy-style tools
  would run), timed the same way;
- one service added (and removed again), the same way; plain ClusterIP services take the
  chainless fast path, so both are element-only commits;
- one NodePort service added (kube-proxy's chain layout: a commit the kernel validates);
- idle: a proxier with nothing to do runs its periodic `drift()` check; CPU seconds per check.
  Writes while idle: the ruleset generation must not move;
- first packet: TCP connects from a client namespace through the node namespace to a ClusterIP
  whose endpoint is a local listener namespace, among N services, in nftables and in iptables
  mode (iptables-nft-restore of kproxy's iptables ruleset): median connect time over many new
  connections (each one a new conntrack entry, so each is NATed by the rules).
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


def _ip(base: int, n: int) -> str:
    return f"10.{base + n // 65536}.{(n // 256) % 256}.{n % 256}"


def make_store(services: int, endpoints: int) -> Any:
    from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice, Service, ServicePort
    from kproxy.model.store import Store

    svcs = []
    slices = []
    for i in range(services):
        svcs.append(
            Service(
                "bench",
                f"s{i}",
                cluster_ips=(_ip(96, i),),
                ports=(ServicePort("http", "TCP", 80, 8080),),
            )
        )
        eps = tuple(
            Endpoint(_ip(128, i * endpoints + j), node_name="elsewhere") for j in range(endpoints)
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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def nft_f(text: str) -> float:
    start = time.perf_counter()
    res = subprocess.run(["nft", "-f", "-"], input=text, text=True, capture_output=True)
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return elapsed


def generation() -> int:
    from kproxy.backends.nft_netlink import NftSocket

    sock = NftSocket()
    try:
        return sock.generation()
    finally:
        sock.close()


def inner(
    n: int, m: int, repeats: int, raw_repeats: int = 20, full_only: int = 0
) -> dict[str, Any]:
    """Runs inside a fresh namespace."""
    from dataclasses import replace

    from kproxy.backends.nftables import NftablesProxier
    from kproxy.model.objects import (
        Endpoint,
        Ref,
        Service,
        ServicePort,
    )
    from kproxy.model.options import ProxyOptions
    from kproxy.render.nftables import delta_ops, full_text, ops_text

    out: dict[str, Any] = {"services": n, "endpoints": m}
    options = ProxyOptions(node_name="bench-node", cluster_cidrs=("10.128.0.0/9",))
    store = make_store(n, m)
    snapshot, changes = store.take()
    proxier = NftablesProxier(options=options)

    # raw nft -f of the same full text first, then kproxy from empty
    blocks = proxier._render_all(snapshot)
    text = full_text(proxier.renderer, blocks.values())
    out["raw_full"] = nft_f(text)
    subprocess.run(["nft", "delete", "table", "ip", "kube-proxy"], check=True)
    start = time.perf_counter()
    proxier.sync(snapshot, changes, full=True)
    out["kproxy_full"] = time.perf_counter() - start
    out["chains"] = sum(len(b.chains) for b in blocks.values()) + 16
    # full syncs the kernel refused over netlink (each then went through nft -f)
    out["netlink_full_failures"] = proxier.netlink_full_failures
    if full_only:
        # more rounds, alternating, each kproxy sync by a new proxier into an empty table
        out["raw_fulls"], out["kproxy_fulls"] = [out["raw_full"]], [out["kproxy_full"]]
        for _ in range(full_only - 1):
            subprocess.run(["nft", "delete", "table", "ip", "kube-proxy"], check=True)
            out["raw_fulls"].append(nft_f(text))
            subprocess.run(["nft", "delete", "table", "ip", "kube-proxy"], check=True)
            fresh = NftablesProxier(options=options)
            start = time.perf_counter()
            fresh.sync(snapshot, changes, full=True)
            out["kproxy_fulls"].append(time.perf_counter() - start)
            out["netlink_full_failures"] += fresh.netlink_full_failures
        return out

    writer: Any = proxier.writer

    # one endpoint change
    lat, kern = [], []
    for r in range(repeats):
        i = (r * 7919) % n
        old = snapshot.slices_for(Ref("bench", f"s{i}"))[0]
        eps = list(old.endpoints)
        eps[0] = Endpoint(_ip(200, r), node_name="elsewhere")
        start = time.perf_counter()
        store.set_slice(replace(old, endpoints=tuple(eps)))
        snap, ch = store.take()
        proxier.sync(snap, ch, full=False)
        lat.append(time.perf_counter() - start)
        kern.append(writer.last_send_seconds)
        snapshot = snap
    out["endpoint_change"] = _summary(lat)
    out["endpoint_change_kernel"] = _summary(kern)

    # the same deltas through nft -f (forward, then back, so the proxier's memory stays true)
    raw = []
    for r in range(raw_repeats):
        ref = sorted(proxier.programmed)[(r * 104729) % n]
        before = proxier.programmed[ref]
        views_old = before
        alt = _with_endpoint(proxier, snapshot, ref, _ip(220, r))
        maps = proxier._count_maps
        ops, _ = delta_ops({ref: views_old}, {ref: alt}, proxier._counts, count_maps=maps)
        back, _ = delta_ops({ref: alt}, {ref: views_old}, proxier._counts, count_maps=maps)
        raw.append(nft_f(ops_text(ops, 4)))
        nft_f(ops_text(back, 4))
    out["endpoint_change_raw_nft"] = _summary(raw)

    # add one service, then remove it again
    add, add_k, rm = [], [], []
    for r in range(min(repeats, 40)):
        name = f"new{r}"
        svc = Service(
            "bench", name, cluster_ips=(_ip(90, r),), ports=(ServicePort("http", "TCP", 80, 8080),)
        )
        sl = _slice(name, 210, r, m)
        add.append(_timed_sync(store, proxier, svc, sl))
        add_k.append(writer.last_send_seconds)
        rm.append(_timed_sync(store, proxier, svc, sl, delete=True))
    out["service_add"] = _summary(add)
    out["service_add_kernel"] = _summary(add_k)
    out["service_remove"] = _summary(rm)
    # raw nft -f of adding one service (the text a partial sync would send), then deleting it
    raw_add = []
    for r in range(raw_repeats):
        svc = Service(
            "bench",
            f"raw{r}",
            cluster_ips=(_ip(91, r),),
            ports=(ServicePort("http", "TCP", 80, 8080),),
        )
        from kproxy.model.view import service_views

        sl = _slice(f"raw{r}", 211, r, m)
        block = proxier.renderer.render_service(
            service_views(svc, [sl], family=4, node_name="bench-node")
        )
        maps = proxier._count_maps
        ops, counts = delta_ops({}, {svc.ref: block}, proxier._counts, count_maps=maps)
        back, _ = delta_ops(
            {svc.ref: block},
            {svc.ref: replace(block, chains=(), elements=())},
            counts,
            count_maps=maps,
        )
        raw_add.append(nft_f(ops_text(ops, 4)))
        nft_f(ops_text(back, 4))
    out["service_add_raw_nft"] = _summary(raw_add)

    # add one NodePort service (kube-proxy's chain layout: chains, and a commit the kernel
    # validates), then remove it again
    add_np, add_np_k = [], []
    for r in range(min(repeats, 40)):
        name = f"np{r}"
        svc = Service(
            "bench",
            name,
            type="NodePort",
            cluster_ips=(_ip(92, r),),
            ports=(ServicePort("http", "TCP", 80, 8080, node_port=30000 + r),),
        )
        sl = _slice(name, 212, r, m)
        add_np.append(_timed_sync(store, proxier, svc, sl))
        add_np_k.append(writer.last_send_seconds)
        _timed_sync(store, proxier, svc, sl, delete=True)
    out["nodeport_add"] = _summary(add_np)
    out["nodeport_add_kernel"] = _summary(add_np_k)

    # idle: the periodic drift check, and no writes
    gen = generation()
    cpu0 = time.process_time()
    checks = 50
    for _ in range(checks):
        assert proxier.drift() is None
    out["drift_check_cpu"] = (time.process_time() - cpu0) / checks
    out["idle_writes"] = generation() - gen
    return out


def _slice(name: str, octet: int, r: int, m: int) -> Any:
    """The EndpointSlice of service `name`: `m` endpoints 10.<octet>.x.y, numbered from r*m."""
    from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice

    return EndpointSlice(
        "bench",
        f"{name}-x",
        name,
        endpoints=tuple(Endpoint(_ip(octet, r * m + j), node_name="x") for j in range(m)),
        ports=(EndpointPort("http", "TCP", 8080),),
    )


def _timed_sync(store: Any, proxier: Any, svc: Any, sl: Any, *, delete: bool = False) -> float:
    """Add (or delete) one service and its slice, then a partial sync: the seconds from the
    store update to the kernel."""
    start = time.perf_counter()
    if delete:
        store.delete_slice(sl.ref)
        store.delete_service(svc.ref)
    else:
        store.set_service(svc)
        store.set_slice(sl)
    snap, ch = store.take()
    proxier.sync(snap, ch, full=False)
    return time.perf_counter() - start


def first_packet(mode: str, n: int, m: int, connects: int) -> dict[str, Any]:
    """Runs inside a fresh namespace: N services programmed by `mode`'s proxier; the last
    service (the end of iptables' KUBE-SERVICES list) has one endpoint, a listener on a local
    address; time `connects` new TCP connections from this namespace to its ClusterIP (each a
    new conntrack entry, so each first packet traverses the nat rules)."""
    import socket
    import threading

    from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice, Ref
    from kproxy.model.options import ProxyOptions

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "10.250.0.1/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "route", "add", "default", "dev", "lo"], check=True)
    store = make_store(n, m)
    last = Ref("bench", f"s{n - 1}")
    store.set_slice(
        EndpointSlice(
            "bench",
            f"s{n - 1}-x",
            f"s{n - 1}",
            endpoints=(Endpoint("10.250.0.1", node_name="elsewhere"),),
            ports=(EndpointPort("http", "TCP", 8080),),
        )
    )
    snapshot, changes = store.take()
    options = ProxyOptions(node_name="bench-node", cluster_cidrs=("10.128.0.0/9",))
    proxier: Any
    if mode == "nftables":
        from kproxy.backends.nftables import NftablesProxier

        proxier = NftablesProxier(options=options)
    else:
        from kproxy.backends.iptables import IptablesProxier

        proxier = IptablesProxier(options=options, flavour="nft")
    proxier.sync(snapshot, changes, full=True)
    vip = snapshot.services[last].cluster_ips[0]

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("10.250.0.1", 8080))
    srv.listen(1024)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    times = []
    for _ in range(connects):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        start = time.perf_counter()
        c.connect((vip, 80))
        times.append(time.perf_counter() - start)
        c.close()
    srv.close()
    return {"mode": mode, "connect": _summary(times)}


def _with_endpoint(proxier: Any, snapshot: Any, ref: Any, ip: str) -> Any:
    from dataclasses import replace

    from kproxy.model.objects import Endpoint
    from kproxy.model.view import service_views

    svc = snapshot.services[ref]
    sl = snapshot.slices_for(ref)[0]
    eps = list(sl.endpoints)
    eps[-1] = Endpoint(ip, node_name="elsewhere")
    views = service_views(
        svc, [replace(sl, endpoints=tuple(eps))], family=4, node_name="bench-node"
    )
    return proxier.renderer.render_service(views)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": statistics.median(values),
        "p99": pct(values, 0.99),
        "max": max(values),
        "n": len(values),
    }


def in_netns(args: list[str]) -> dict[str, Any]:
    name = f"kpnb{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        res = netns_exec(
            name,
            [sys.executable, __file__, "--inner", *args],
            capture_output=True,
            env=env,
        )
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-4000:])
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ms(v: float) -> str:
    return f"{v * 1000:.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--json")
    ap.add_argument("--inner", action="store_true")
    ap.add_argument(
        "--raw-repeats",
        type=int,
        default=20,
        help="nft -f comparisons (each reads nft's cache: slow with many endpoint maps)",
    )
    ap.add_argument("--skip-first-packet", action="store_true")
    ap.add_argument("--first-packet", choices=("nftables", "iptables"))
    ap.add_argument("--connects", type=int, default=2000)
    ap.add_argument("--skip-sync", action="store_true", help="only the first-packet part")
    ap.add_argument(
        "--full-only",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only the full sync, ROUNDS times (raw nft -f and kproxy alternating)",
    )
    args = ap.parse_args()
    if args.inner and args.first_packet:
        r = first_packet(args.first_packet, args.services, args.endpoints, args.connects)
        print(json.dumps(r))
        return
    if args.inner:
        r = inner(args.services, args.endpoints, args.repeats, args.raw_repeats, args.full_only)
        print(json.dumps(r))
        return
    size = ["--services", str(args.services), "--endpoints", str(args.endpoints)]
    fp = {}
    for mode in () if args.skip_first_packet else ("iptables", "nftables"):
        fp[mode] = in_netns([*size, "--first-packet", mode, "--connects", str(args.connects)])
        c = fp[mode]["connect"]
        print(
            f"first packet ({mode}, ClusterIP of the last of {args.services} services): "
            f"connect p50 {c['p50'] * 1e6:.0f} us, p99 {c['p99'] * 1e6:.0f} us"
        )
    if args.skip_sync:
        return
    r = in_netns(
        [
            "--services",
            str(args.services),
            "--endpoints",
            str(args.endpoints),
            "--repeats",
            str(args.repeats),
            "--raw-repeats",
            str(args.raw_repeats),
            "--full-only",
            str(args.full_only),
        ]
    )
    print(f"{r['services']} services x {r['endpoints']} endpoints, {r['chains']} chains")
    if r["netlink_full_failures"]:
        print(f"full syncs retried through nft -f: {r['netlink_full_failures']}")
    if args.full_only:
        for k, raw in zip(r["kproxy_fulls"], r["raw_fulls"], strict=True):
            print(f"full sync: kproxy {ms(k)}, raw nft -f {ms(raw)}, ratio {k / raw:.2f}x")
        km, rm = statistics.median(r["kproxy_fulls"]), statistics.median(r["raw_fulls"])
        print(f"medians: kproxy {ms(km)}, raw nft -f {ms(rm)}, ratio {km / rm:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
        return
    print(
        f"full sync from empty: kproxy {ms(r['kproxy_full'])}, raw nft -f {ms(r['raw_full'])}, "
        f"ratio {r['kproxy_full'] / r['raw_full']:.2f}x"
    )
    for key, label in (
        ("endpoint_change", "one endpoint change"),
        ("endpoint_change_kernel", "  of which the netlink commit"),
        ("endpoint_change_raw_nft", "  same delta via nft -f"),
        ("service_add", "one service added"),
        ("service_add_kernel", "  of which the netlink commit"),
        ("service_add_raw_nft", "  same delta via nft -f"),
        ("service_remove", "one service removed"),
        ("nodeport_add", "one NodePort service added (chain layout)"),
        ("nodeport_add_kernel", "  of which the netlink commit"),
    ):
        s = r[key]
        print(f"{label}: p50 {ms(s['p50'])}, p99 {ms(s['p99'])}, max {ms(s['max'])} (n={s['n']})")
    print(
        f"idle: drift check {r['drift_check_cpu'] * 1e6:.0f} us CPU each, "
        f"writes while idle: {r['idle_writes']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({**r, "first_packet": fp}, indent=2))


if __name__ == "__main__":
    main()
