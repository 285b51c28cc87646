"""What the running agent left out because iptables-restore or nftables refused it
(`kproxy status`).

The agent lists such services in its state document ("rejected", see
kproxy.runtime.inspectsock); `status` shows them in a section of their own and exits 1. When
status reads its wanted state from flags, it still asks the agent on this node, if there is
one, since only the agent knows what the kernel refused.
"""

from __future__ import annotations

from typing import Any

from kproxy.inspect.socketpath import default_socket_path
from kproxy.inspect.wanted import NoAgent, Wanted, fetch


def agent_rejections(wanted: Wanted, *, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The services the running agent left out: {service, family, error} each."""
    doc = wanted.agent
    if doc is None:
        try:
            doc = fetch(default_socket_path(), "/v1/settings", timeout=timeout)
        except (NoAgent, ValueError):
            return []
    items = doc.get("rejected")
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def render_rejections(items: list[dict[str, Any]], *, by: str = "iptables-restore") -> str:
    if not items:
        return ""
    lines = [f"\nRefused by {by} (left out by the running agent; see its log):\n"]
    for item in items:
        lines.append(f"  {item.get('service')} (IPv{item.get('family')}): {item.get('error')}\n")
    return "".join(lines)
