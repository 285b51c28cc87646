"""The LoadBalancer section of `kproxy status`: pool usage, every assigned address with its
service and the node that answers ARP/NDP for it, pending services - as this node's running agent
reports them at /lb on its metrics address (the agent computes the same owner for every address
as all other agents do; see kproxy.lb.select). Empty when pools are not configured."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from kproxy.config import Settings


def fetch_lb_report(settings: Settings, *, timeout: float = 2.0) -> dict[str, Any] | None:
    """The agent's /lb document, or None (no pools, agent not running, metrics disabled)."""
    if not settings.lb_pools or not settings.metrics_bind_address:
        return None
    host, _, port = settings.metrics_bind_address.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/lb", timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def render_lb(doc: dict[str, Any]) -> str:
    node = doc.get("node", "")
    rows = [("LB ADDRESS", "SERVICE", "ANNOUNCED BY")]
    for a in doc.get("addresses") or ():
        owner = a.get("node") or "(nobody: no eligible node)"
        if owner == node:
            owner += " (this node)"
        rows.append((a.get("address", ""), a.get("service", ""), owner))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    out = [
        "",
        *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows),
    ]
    pools = ", ".join(f"{p['range']} {p['used']}/{p['size']} used" for p in doc.get("pools") or ())
    out.append(f"address pools: {pools}; allocator: {doc.get('leader') or '(none)'}")
    for svc, why in sorted((doc.get("pending") or {}).items()):
        out.append(f"pending {svc}: {why}")
    return "\n".join(out) + "\n"
