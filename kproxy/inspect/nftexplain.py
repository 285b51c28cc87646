"""`kproxy explain` in nftables mode: read the live `kube-proxy` table and trace the packet
through it (kproxy.inspect.nfttrace)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from kproxy.inspect.nfttrace import (
    Packet,
    Unknown,
    list_live_table,
    parse_table,
    render_paths,
    trace,
)


def nft_explain(
    *,
    family: int,
    proto: str,
    source: str,
    ip: str,
    port: int,
    local: frozenset[str] | set[str],
    from_node: bool,
    output: str = "text",
) -> int:
    fw = "ip6" if family == 6 else "ip"
    res = list_live_table(family)
    if res.returncode != 0:
        print(f"kproxy explain: no {fw} kube-proxy table: {res.stderr.strip()}", file=sys.stderr)
        return 2
    packet = Packet(proto=proto.lower(), src=source, dst=ip, dport=port, local=from_node)
    try:
        paths = trace(parse_table(res.stdout), packet, local=local)
    except Unknown as err:
        print(f"kproxy explain: the table holds a rule kproxy cannot trace: {err}", file=sys.stderr)
        return 2
    if output == "json":
        json.dump({"packet": asdict(packet), "paths": [asdict(p) for p in paths]}, sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(f"# nft -j list table {fw} kube-proxy\n" + render_paths(packet, paths))
    return 0
