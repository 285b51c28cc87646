"""Which UDP conntrack flows are stale after a sync: a pure plan from (previous, current) views.

UDP has no connection teardown, so a conntrack entry that DNATs a client's flow to an endpoint
outlives the endpoint: a DNS client with a fixed source port keeps talking to a dead pod until
the entry expires, however often it retries. kube-proxy (pkg/proxy/conntrack/cleanup.go,
CleanStaleEntries) deletes, for every UDP service port that has serving endpoints, the flows

- whose original destination is a service IP (ClusterIP, LoadBalancer IPs, externalIPs) and the
  service port, or whose original destination port is the service's nodePort (any address), and
- whose reply source (the endpoint the flow was DNAT'ed to) is not a serving endpoint.

A flow that was never DNAT'ed (sent while the service had no endpoints, or before it existed) has
the service IP itself (or the node address) as reply source, so the same test clears those
"black-holed" entries once endpoints appear.

What kproxy does differently, on purpose:

- It plans from the change, not from the whole table: only frontends whose serving endpoints lost
  a member, that had none before, or that are new get a rule. An empty plan means no conntrack
  dump at all, so endpoint additions and TCP-only changes cost nothing. A start-up sync passes an
  empty `previous`, which makes every UDP frontend new: a full reconcile, as kube-proxy does.
- Frontends of UDP service ports that disappeared (service deleted, port or IP changed, protocol
  changed) lose all their flows; kube-proxy's reconciler no longer sees those services at all.
- A flow is kept only if its reply source *address and port* is a current endpoint, so a changed
  targetPort on the same pod IP also moves the flow (kube-proxy compares addresses only).
- Like kube-proxy, a frontend with no serving endpoint is left alone (new packets are rejected by
  the rules anyway); its flows are judged when endpoints come back.

Kept endpoints are the serving ones (ready or terminating-but-serving), whatever the traffic
policies: a policy or topology change must not cut flows that still have a live endpoint, which
keeps UDP consistent with TCP. Everything the renderers may still send traffic to
(`decision.all_reachable`) is kept too.

A nodePort rule matches every destination address unless `nodeport_ips` narrows it (pass
`ProxyOptions.nodeport_ips`); deleting a flow that was never DNAT'ed only costs the kernel one
new entry on the next packet, so matching too widely is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kproxy.model.objects import UDP, Ref, ip_family
from kproxy.model.view import ServicePortView

HostPort = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Flow:
    """What the cleanup reads of one conntrack entry."""

    family: int
    protocol: str  # "UDP", "TCP", ... (model spelling)
    orig_dst: str
    orig_dport: int
    reply_src: str
    reply_sport: int


@dataclass(frozen=True, slots=True)
class FrontendRule:
    """UDP flows sent to `ip`:`port` are stale unless their reply source is in `keep`.

    keep=None: the frontend is gone, every flow to it is stale.
    """

    ip: str
    port: int
    keep: frozenset[HostPort] | None
    services: tuple[str, ...] = ()

    @property
    def family(self) -> int:
        return ip_family(self.ip)


@dataclass(frozen=True, slots=True)
class NodePortRule:
    """UDP flows sent to `port` on a node address are stale unless their reply source is in `keep`.

    destinations=None: any destination address (kube-proxy's behaviour without
    --nodeport-addresses). keep=None: the nodePort is gone, every flow to it is stale.
    """

    family: int
    port: int
    keep: frozenset[HostPort] | None
    destinations: frozenset[str] | None = None
    services: tuple[str, ...] = ()


Rule = FrontendRule | NodePortRule


@dataclass(frozen=True, slots=True)
class StaleFlowPlan:
    """The rules of one cleanup; `match` tells whether a flow must be deleted (and why)."""

    frontends: tuple[FrontendRule, ...] = ()
    node_ports: tuple[NodePortRule, ...] = ()
    _by_frontend: dict[HostPort, FrontendRule] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _by_node_port: dict[tuple[int, int], NodePortRule] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_frontend", {(r.ip, r.port): r for r in self.frontends})
        object.__setattr__(self, "_by_node_port", {(r.family, r.port): r for r in self.node_ports})

    @property
    def empty(self) -> bool:
        return not self.frontends and not self.node_ports

    @property
    def families(self) -> tuple[int, ...]:
        """The IP families whose conntrack tables the plan touches, sorted."""
        fams = {r.family for r in self.frontends} | {r.family for r in self.node_ports}
        return tuple(sorted(fams))

    def rules(self, family: int | None = None) -> tuple[Rule, ...]:
        every: Sequence[Rule] = (*self.frontends, *self.node_ports)
        return tuple(r for r in every if family is None or r.family == family)

    def match(self, flow: Flow) -> Rule | None:
        """The rule that makes `flow` stale, or None when it must be kept."""
        if flow.protocol != UDP:
            return None
        reply = (flow.reply_src, flow.reply_sport)
        rule = self._by_frontend.get((flow.orig_dst, flow.orig_dport))
        if rule is not None and (rule.keep is None or reply not in rule.keep):
            return rule
        np_rule = self._by_node_port.get((flow.family, flow.orig_dport))
        if (
            np_rule is not None
            and (np_rule.destinations is None or flow.orig_dst in np_rule.destinations)
            and (np_rule.keep is None or reply not in np_rule.keep)
        ):
            return np_rule
        return None

    def merged(self, other: StaleFlowPlan) -> StaleFlowPlan:
        """One plan holding both (e.g. the IPv4 and the IPv6 plan of one sync)."""
        return StaleFlowPlan(
            frontends=self.frontends + other.frontends,
            node_ports=self.node_ports + other.node_ports,
        )


@dataclass
class _Target:
    """The serving endpoints behind one frontend or nodePort, summed over service ports."""

    keep: set[HostPort] = field(default_factory=set)
    services: set[str] = field(default_factory=set)


def _kept_endpoints(view: ServicePortView) -> set[HostPort]:
    kept = {(e.ip, e.port) for e in view.endpoints if e.serving or e.ready}
    kept.update((e.ip, e.port) for e in view.decision.all_reachable)
    return kept


def _targets(
    views: Mapping[Ref, Sequence[ServicePortView]],
) -> tuple[dict[HostPort, _Target], dict[tuple[int, int], _Target]]:
    frontends: dict[HostPort, _Target] = {}
    node_ports: dict[tuple[int, int], _Target] = {}
    for port_views in views.values():
        for view in port_views:
            if view.protocol != UDP:
                continue
            kept = _kept_endpoints(view)
            ips = dict.fromkeys((view.cluster_ip, *view.load_balancer_ips, *view.external_ips))
            for ip in ips:
                target = frontends.setdefault((ip, view.port.port), _Target())
                target.keep |= kept
                target.services.add(view.name)
            if view.node_port:
                target = node_ports.setdefault((view.family, view.node_port), _Target())
                target.keep |= kept
                target.services.add(view.name)
    return frontends, node_ports


def _needs_cleanup(before: _Target | None, after: _Target) -> bool:
    """Whether flows to a frontend that exists now may be stale."""
    if not after.keep:
        return False  # no serving endpoint: nothing to move flows to (as kube-proxy)
    if before is None or not before.keep:
        return True  # new frontend, or flows sent while nothing served them
    return not before.keep <= after.keep  # an endpoint left


def plan_stale_flows(
    previous: Mapping[Ref, Sequence[ServicePortView]],
    current: Mapping[Ref, Sequence[ServicePortView]],
    *,
    nodeport_ips: Iterable[str] | None = None,
) -> StaleFlowPlan:
    """The flows to delete after moving the dataplane from `previous` to `current`.

    Both maps are what `build_views` returns (any mix of families), for the same refs: the whole
    cluster, or just the services a partial sync changed. A ref missing from a map, or mapped to
    `()`, has no service ports there. Pass `previous={}` on the first sync (a full reconcile).
    """
    destinations = None if nodeport_ips is None else frozenset(nodeport_ips)
    old_fronts, old_nps = _targets(previous)
    new_fronts, new_nps = _targets(current)

    frontends: list[FrontendRule] = []
    for key, after in new_fronts.items():
        if _needs_cleanup(old_fronts.get(key), after):
            frontends.append(
                FrontendRule(key[0], key[1], frozenset(after.keep), tuple(sorted(after.services)))
            )
    for key, before in old_fronts.items():
        if key not in new_fronts:
            frontends.append(FrontendRule(key[0], key[1], None, tuple(sorted(before.services))))

    node_ports: list[NodePortRule] = []
    for (family, port), after in new_nps.items():
        if _needs_cleanup(old_nps.get((family, port)), after):
            node_ports.append(
                NodePortRule(
                    family,
                    port,
                    frozenset(after.keep),
                    _of_family(destinations, family),
                    tuple(sorted(after.services)),
                )
            )
    for (family, port), before in old_nps.items():
        if (family, port) not in new_nps:
            node_ports.append(
                NodePortRule(
                    family,
                    port,
                    None,
                    _of_family(destinations, family),
                    tuple(sorted(before.services)),
                )
            )

    frontends.sort(key=lambda r: (r.family, r.ip, r.port))
    node_ports.sort(key=lambda r: (r.family, r.port))
    return StaleFlowPlan(frontends=tuple(frontends), node_ports=tuple(node_ports))


def _of_family(addresses: frozenset[str] | None, family: int) -> frozenset[str] | None:
    if addresses is None:
        return None
    return frozenset(a for a in addresses if ip_family(a) == family)
