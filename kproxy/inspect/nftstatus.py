"""`kproxy status` in nftables mode: for every ClusterIP/externalIP/LB frontend kproxy wants,
the endpoints the live `kube-proxy` table sends it to (its `service-ips` element, the chain it
points at and that chain's endpoint map; for the chainless fast path, its elements in the
shared `cluster-endpoints-N` maps), checked against the wanted ones."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kproxy.inspect.nfttrace import Table, list_live_table, parse_table
from kproxy.inspect.rejections import render_rejections
from kproxy.model.objects import Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView
from kproxy.render.nftables import (
    ENDPOINTS_PREFIX,
    LOCAL_ENDPOINTS_PREFIX,
    LOCAL_PREFIX,
    SERVICE_IPS,
    SERVICE_PREFIX,
    Renderer,
    ServiceBlock,
    count_of,
)

Row = dict[str, Any]


def _map_of(chain: str) -> str:
    if chain.startswith(SERVICE_PREFIX):
        return ENDPOINTS_PREFIX + chain[len(SERVICE_PREFIX) :]
    if chain.startswith(LOCAL_PREFIX):
        return LOCAL_ENDPOINTS_PREFIX + chain[len(LOCAL_PREFIX) :]
    return ""


def _endpoints(elements: Sequence[Any]) -> set[str]:
    out = set()
    for e in elements:
        if isinstance(e, list) and isinstance(e[1], dict) and "concat" in e[1]:
            ip, port = e[1]["concat"]
            out.add(f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}")
        elif isinstance(e, list) and isinstance(e[1], str):  # nft -f text form (wanted)
            ip, _, port = e[1].partition(" . ")
            out.add(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return out


def _frontends(table: Table) -> dict[tuple[str, ...], str]:
    """(ip, proto, port) -> the chain its service-ips element jumps to."""
    out: dict[tuple[str, ...], str] = {}
    for e in table.sets.get(SERVICE_IPS, []):
        key, verdict = e
        val = key["elem"]["val"] if isinstance(key, dict) and "elem" in key else key
        ip, proto, port = val["concat"]
        target = next(iter(verdict.values()))["target"]
        out[(str(ip), str(proto), str(port))] = target
    return out


def _hostport(ip: str, port: str) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _fast_frontends(table: Table) -> dict[tuple[str, ...], tuple[int, set[str]]]:
    """(ip, proto, port) -> (N of the fast-path map holding it, its endpoints). A frontend
    with elements in two maps, or an element missing, shows as a mismatch."""
    out: dict[tuple[str, ...], tuple[int, set[str]]] = {}
    for name, elems in table.sets.items():
        n = count_of(name)
        if not n:
            continue
        for key, value in elems:
            k = key["elem"]["val"] if isinstance(key, dict) and "elem" in key else key
            ip, proto, port, _index = (str(x) for x in k["concat"])
            vip, vport = value["concat"]
            front = (ip, proto, port)
            have_n, have = out.get(front, (n, set()))
            have.add(_hostport(str(vip), str(vport)))
            out[front] = (n if have_n == n else -1, have)
    return out


def rows_for(
    blocks: Mapping[Ref, ServiceBlock],
    table: Table,
    names: Mapping[tuple[str, str, str], str] | None = None,
) -> list[Row]:
    """One row per frontend kproxy programs with an endpoint map; `names` gives the service
    port name of a fast-path frontend (ip, proto, port) (its elements carry no comment)."""
    live = _frontends(table)
    fast_live = _fast_frontends(table)
    rows = []
    for block in blocks.values():
        fast: dict[tuple[str, str, str], tuple[int, set[str]]] = {}
        for e in block.elements:
            n = count_of(e.set)
            if n:
                ip, _, port = e.value.partition(" . ")
                fast.setdefault((e.key[0], e.key[1], e.key[2]), (n, set()))[1].add(
                    _hostport(ip, port)
                )
        for vip_key, (n, want) in fast.items():
            have_n, have = fast_live.get(vip_key, (0, set()))
            rows.append(
                {
                    "frontend": f"{vip_key[0]}:{vip_key[2]}/{vip_key[1]}",
                    "service": (names or {}).get(vip_key, ""),
                    "wanted": sorted(want),
                    "programmed": sorted(have),
                    # len(have) == n: every index 0..N-1 holds a distinct endpoint
                    "ok": have_n == n and want == have and len(have) == n and vip_key not in live,
                }
            )
        wanted_maps: dict[str, set[str]] = {}
        for e in block.elements:
            if e.set.startswith((ENDPOINTS_PREFIX, LOCAL_ENDPOINTS_PREFIX)):
                wanted_maps.setdefault(e.set, set()).update(_endpoints([[e.key, e.value]]))
        for e in block.elements:
            if e.set != SERVICE_IPS:
                continue
            chain = e.value.split(" ", 1)[1]
            m = _map_of(chain)
            if m not in wanted_maps:
                continue  # external- and affinity chains: see `kproxy explain`
            want = wanted_maps.get(m, set())
            front = live.get(e.key)
            have = _endpoints(table.sets.get(_map_of(front), [])) if front else set()
            rows.append(
                {
                    "frontend": f"{e.key[0]}:{e.key[2]}/{e.key[1]}",
                    "service": e.comment,
                    "wanted": sorted(want),
                    "programmed": sorted(have),
                    "ok": front == chain and want == have,
                }
            )
    return rows


def nft_status(
    views_by_family: Mapping[int, tuple[Mapping[Ref, Sequence[ServicePortView]], ProxyOptions]],
    *,
    output: str = "table",
    rejected: Sequence[Mapping[str, Any]] = (),
) -> int:
    """Wanted against programmed, per service port; `rejected` are the services the running
    agent left out because nftables refused them (shown in a section of their own)."""
    rows: list[Row] = []
    for family, (views, options) in sorted(views_by_family.items()):
        res = list_live_table(family)
        table = parse_table(res.stdout) if res.returncode == 0 else Table()
        renderer = Renderer(options)
        blocks = {ref: renderer.render_service(v) for ref, v in views.items()}
        names = {
            (v.cluster_ip, v.port.protocol.lower(), str(v.port.port)): v.name
            for vs in views.values()
            for v in vs
        }
        rows += rows_for(blocks, table, names)
    if output == "json":
        doc = {"mode": "nftables", "ports": rows, "rejected": list(rejected)}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in rows:
            flag = "ok" if r["ok"] else "MISMATCH"
            sys.stdout.write(
                f"{r['frontend']:<28} {r['service']:<40} {flag:<8} "
                f"{' '.join(r['programmed']) or '(none)'}\n"
            )
            if not r["ok"]:
                sys.stdout.write(f"{'':<28} {'wanted:':<40} {'':<8} {' '.join(r['wanted'])}\n")
        sys.stdout.write(render_rejections([dict(r) for r in rejected], by="nftables"))
    return 0 if all(r["ok"] for r in rows) and not rejected else 1
