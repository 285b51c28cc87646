"""Which node answers ARP/NDP for a LoadBalancer address: every agent computes the same answer
from the same inputs, so they agree without talking to each other.

The choice (MetalLB's layer-2 election): among the candidate nodes, the one whose
sha256(node name + "#" + address) sorts first. Candidates are the nodes that can serve:
- the Node is usable: not being deleted, not labelled
  `node.kubernetes.io/exclude-from-external-load-balancers`, and its Ready condition (when it has
  one) is True;
- its kproxy agent is alive: its agent Lease was renewed within the lease duration (the role
  MetalLB's memberlist plays: a killed agent drops out in seconds, long before the Node turns
  NotReady);
- with `externalTrafficPolicy: Local`, only nodes with a ready local endpoint of the service.

Why a hash and not a Lease per address (Cilium): the hash needs no API writes per service and
moves only the addresses whose owner left (about 1/N of them when a node goes), and every agent's
view converges as soon as the node list and agent Leases do. Its cost is a brief overlap or gap
while views differ (one watch round trip); gratuitous ARP on takeover keeps the gap short.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"


@dataclass(frozen=True, slots=True)
class NodeState:
    """A Node as the election sees it."""

    name: str
    ready: bool = True
    deleting: bool = False
    excluded: bool = False

    @property
    def usable(self) -> bool:
        return self.ready and not self.deleting and not self.excluded


def rank(address: str, nodes: Iterable[str]) -> list[str]:
    """`nodes` in election order for `address` (first one announces)."""
    return sorted(set(nodes), key=lambda n: hashlib.sha256(f"{n}#{address}".encode()).digest())


def candidates(
    nodes: Mapping[str, NodeState],
    alive: Iterable[str],
    *,
    local_endpoint_nodes: Iterable[str] | None = None,
) -> set[str]:
    """Usable nodes with a live agent (and a ready local endpoint, when given: eTP Local)."""
    live = set(alive)
    out = {name for name, node in nodes.items() if node.usable and name in live}
    if local_endpoint_nodes is not None:
        out &= set(local_endpoint_nodes)
    return out


def announcer(address: str, eligible: Iterable[str]) -> str | None:
    """The node that answers for `address`, or None when no node may."""
    ranked = rank(address, eligible)
    return ranked[0] if ranked else None
