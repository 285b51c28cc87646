"""The agent's inspection socket at scale: what one `GET /v1/state` costs the agent and the command.

    python3 benchmarks/inspect_bench.py [--services 10000] [--endpoints 10] [--repeat 5]

Builds a snapshot of N ClusterIP+NodePort services with E ready endpoints each (one slice per
service), serves it with the real `InspectServer` on a unix socket in a temporary directory, and
measures, median of --repeat: building the document (encode_snapshot + json.dumps, the agent's
CPU per request), the whole request as `kproxy status` makes it (connect, transfer, json.loads,
decode_snapshot), and the document's size. Nothing runs per sync, so the sync path is unaffected.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import MappingProxyType

from kproxy.config import Settings
from kproxy.inspect.wanted import fetch
from kproxy.model.codec import decode_snapshot, encode_snapshot, paused_gc
from kproxy.model.objects import Endpoint, EndpointPort, EndpointSlice, Service, ServicePort
from kproxy.model.store import Snapshot
from kproxy.runtime.inspectsock import InspectServer, state_route


def snapshot(services: int, endpoints: int) -> Snapshot:
    svcs = {}
    slices = {}
    for i in range(services):
        svc = Service(
            namespace=f"ns{i % 50}",
            name=f"svc{i}",
            type="NodePort",
            cluster_ips=(f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",),
            ports=(ServicePort("http", "TCP", 80, 8080, node_port=30000 + i % 2767),),
        )
        eps = tuple(
            Endpoint(
                f"10.244.{(i * endpoints + j) // 256 % 256}.{(i * endpoints + j) % 256}",
                node_name=f"node{j % 3}",
            )
            for j in range(endpoints)
        )
        svcs[svc.ref] = svc
        slices[svc.ref] = (
            EndpointSlice(
                svc.namespace,
                f"svc{i}-abcde",
                svc.name,
                endpoints=eps,
                ports=(EndpointPort("http", "TCP", 8080),),
            ),
        )
    return Snapshot(services=MappingProxyType(svcs), slices=MappingProxyType(slices))


def calibrate() -> float:
    t = time.perf_counter()
    sum(range(10**7))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    snap = snapshot(args.services, args.endpoints)
    build, request, decoding = [], [], []
    size = 0
    for _ in range(args.repeat):
        t = time.perf_counter()
        with paused_gc():  # as the agent's socket handler does
            size = len(json.dumps(encode_snapshot(snap), separators=(",", ":")))
        build.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        server = InspectServer(
            Path(tmp) / "run" / "kproxy.sock",
            state_route(
                settings=Settings(),
                node_name="node1",
                planes=list,
                wanted=lambda: (snap, 0.0),
                unbound=dict,
            ),
        )
        server.start()
        try:
            for _ in range(args.repeat):
                t = time.perf_counter()
                doc = fetch(server.path)
                t1 = time.perf_counter()
                with paused_gc():  # as kproxy.inspect.wanted.from_agent does
                    back = decode_snapshot(doc["snapshot"])
                request.append(time.perf_counter() - t)
                decoding.append(time.perf_counter() - t1)
                assert len(back.services) == args.services
        finally:
            server.stop()
    print(
        f"{args.services} services x {args.endpoints} endpoints: document {size / 1e6:.1f} MB; "
        f"agent builds it in {statistics.median(build) * 1000:.0f} ms; "
        f"whole request {statistics.median(request) * 1000:.0f} ms, of which decoding the "
        f"objects {statistics.median(decoding) * 1000:.0f} ms (median of {args.repeat}); "
        f"for scale, this machine runs sum(range(10**7)) in {calibrate() * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
