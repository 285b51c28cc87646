#!/usr/bin/env python3
"""The shared view layer alone: `build_views` over a model of N services x M endpoints.

Every mode builds these views (merge each service port's EndpointSlices into `EndpointInfo`s,
categorise them, decide) for every service on a full sync, and the nftables full sync does it
before the end of nft's input, where every millisecond adds to the sync (docs/benchmarks.md).
The model is built like benchmarks/nftables_bench.py's (ClusterIP services, one port, one slice
of M ready endpoints on another node). Prints, best and median of --rounds, with the cyclic GC
paused as the full syncs do:

- all views in one `build_views` call, and one call per service in name order (the way the
  nftables full sync asks for them);
- the steps of it: `merge_endpoints`, `categorize` and `decide` over every service;
- the memory one full set of views holds (tracemalloc), and per service.

    python3 benchmarks/views_bench.py --services 10000 --endpoints 10
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NODE = "bench-node"


def make_snapshot(services: int, endpoints: int) -> Any:
    """The nftables benchmark's model (one TCP port, `endpoints` remote endpoints a service)."""
    from nftables_bench import make_store  # benchmarks/ is this script's folder

    return make_store(services, endpoints).take()[0]


def timed(rounds: int, run: Callable[[], object]) -> dict[str, float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
        del result
    return {"best": min(times), "median": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="write the figures to this file as JSON")
    args = parser.parse_args()

    from kproxy.model.decisions import decide
    from kproxy.model.endpoints import categorize, merge_endpoints
    from kproxy.model.view import build_views

    snapshot = make_snapshot(args.services, args.endpoints)
    refs = sorted(snapshot.services)
    items = [(snapshot.services[r], snapshot.slices_for(r)) for r in refs]
    gc.disable()
    out: dict[str, Any] = {"services": args.services, "endpoints": args.endpoints}
    out["build_views"] = timed(args.rounds, lambda: build_views(snapshot, family=4, node_name=NODE))
    out["build_views per service"] = timed(
        args.rounds,
        lambda: [build_views(snapshot, family=4, node_name=NODE, refs=(r,)) for r in refs],
    )
    out["merge_endpoints"] = timed(
        args.rounds,
        lambda: [merge_endpoints(svc.ports[0], sl, family=4, node_name=NODE) for svc, sl in items],
    )
    merged = [
        (svc, merge_endpoints(svc.ports[0], sl, family=4, node_name=NODE)) for svc, sl in items
    ]
    cats = [(svc, m, categorize(svc, m)) for svc, m in merged]

    def categorize_all() -> object:
        return [categorize(svc, m) for svc, m in merged]

    def decide_all() -> object:
        return [
            decide(
                svc, m, c, has_external=False, has_load_balancer_ips=False, has_source_ranges=False
            )
            for svc, m, c in cats
        ]

    out["categorize"] = timed(args.rounds, categorize_all)
    out["decide"] = timed(args.rounds, decide_all)
    merged.clear()
    cats.clear()
    gc.enable()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    views = build_views(snapshot, family=4, node_name=NODE)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(views) == args.services
    out["views_bytes"] = held

    print(f"views at {args.services} services x {args.endpoints} endpoints (GC paused):")
    steps = ("build_views", "build_views per service", "merge_endpoints", "categorize", "decide")
    for key in steps:
        t = out[key]
        print(f"  {key:26s} best {t['best'] * 1e3:7.1f} ms   median {t['median'] * 1e3:7.1f} ms")
    print(
        f"  one full set of views holds {held / 1e6:.1f} MB "
        f"({held / max(1, args.services):.0f} B per service)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
