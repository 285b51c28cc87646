"""The LoadBalancer address allocator: every service's wanted state in, one decision per service
out. Pure and stateless: the same input always gives the same answer, so the answer after a
restart is the one before it (assignments are read back from each service's status).

Rules (MetalLB's, where it has one):
- A service is ours when it is `type: LoadBalancer` and its `spec.loadBalancerClass` is empty or
  `kproxy.io/lb`. Another class's status addresses inside our pools count as used, never moved.
- Addresses asked for (`spec.loadBalancerIP`, annotation `kproxy.io/lb-ips`, comma-separated)
  must lie in a pool; the service stays pending otherwise, or when another service holds them.
- One address per IP family the service has (`spec.ipFamilies`; `SingleStack` takes the first,
  `PreferDualStack` takes what the pools offer, `RequireDualStack` needs both).
- An address serves two services only when both carry the same `kproxy.io/allow-shared-ip` key,
  their (protocol, port) pairs do not overlap, and they pick the same backends (both
  `externalTrafficPolicy: Cluster`, or both `Local` with the same selector) - otherwise the one
  node that answers ARP for the address could not serve both.
- Order of precedence: addresses already in status (kept while still valid), then explicit
  requests, then new assignments (lowest free address first); within each, oldest service first.
  A service keeps its address when its request still includes it.
- A service that is no longer `type: LoadBalancer` but still shows one of our addresses in status
  gets it cleared; a deleted service simply stops holding its addresses. A LoadBalancer of
  another class is never written to (its addresses in our pools only count as used).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kproxy.lb.pools import Pools
from kproxy.model.objects import Ref

LB_CLASS = "kproxy.io/lb"
ANNOTATION_IPS = "kproxy.io/lb-ips"
ANNOTATION_SHARE = "kproxy.io/allow-shared-ip"


@dataclass(frozen=True, slots=True)
class LBService:
    """What the allocator and the announcer need of one Service (from its raw JSON)."""

    namespace: str
    name: str
    type: str = "LoadBalancer"
    lb_class: str = ""
    created: str = ""  # metadata.creationTimestamp (RFC 3339 sorts as text)
    requested: tuple[str, ...] = ()
    sharing_key: str = ""
    ports: tuple[tuple[str, int], ...] = ()  # (protocol, port)
    families: tuple[int, ...] = (4,)
    family_policy: str = "SingleStack"
    external_local: bool = False
    selector: tuple[tuple[str, str], ...] = ()
    ingress: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip as observed
    resource_version: str = ""

    @property
    def ref(self) -> Ref:
        return Ref(self.namespace, self.name)

    @property
    def ours(self) -> bool:
        return self.type == "LoadBalancer" and self.lb_class in ("", LB_CLASS)

    @property
    def backend_key(self) -> tuple[tuple[str, str], ...] | None:
        """None for eTP Cluster; the selector for eTP Local (sharing needs equal keys)."""
        return self.selector if self.external_local else None


@dataclass(frozen=True, slots=True)
class Decision:
    """`ips` to write into status (empty: clear it); `pending` says why none could be given."""

    ips: tuple[str, ...] = ()
    pending: str = ""

    @property
    def assigned(self) -> bool:
        return bool(self.ips) and not self.pending


@dataclass(slots=True)
class _Holders:
    by_ip: dict[str, list[LBService]] = field(default_factory=dict)
    foreign: set[str] = field(default_factory=set)

    def used(self) -> set[str]:
        return set(self.by_ip) | self.foreign

    def can_share(self, ip: str, svc: LBService) -> str:
        """'' when `svc` may take `ip` too; else why not."""
        if ip in self.foreign:
            return f"{ip} is used by a service of another loadBalancerClass"
        holders = [h for h in self.by_ip.get(ip, ()) if h.ref != svc.ref]
        for other in holders:
            if not svc.sharing_key or svc.sharing_key != other.sharing_key:
                return f"{ip} is already assigned to {other.ref}"
            if set(svc.ports) & set(other.ports):
                return f"{ip} is shared with {other.ref}, whose ports overlap"
            if svc.backend_key != other.backend_key:
                return f"{ip} is shared with {other.ref}, which selects other backends"
        return ""

    def take(self, ip: str, svc: LBService) -> None:
        self.by_ip.setdefault(ip, []).append(svc)


def _canonical(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


def _wanted_families(svc: LBService, pools: Pools) -> tuple[int, ...]:
    """The families to assign an address of (each one required)."""
    fams = svc.families or (4,)
    if svc.family_policy == "SingleStack" or len(fams) == 1:
        return fams[:1]
    if svc.family_policy == "RequireDualStack":
        return fams
    return tuple(f for f in fams if f in pools.families()) or fams[:1]  # PreferDualStack


def _order(services: Iterable[LBService]) -> list[LBService]:
    return sorted(services, key=lambda s: (s.created, s.namespace, s.name))


def allocate(pools: Pools, services: Iterable[LBService]) -> dict[Ref, Decision]:
    """A decision for every service that is ours or shows one of our addresses in status.

    Other services are left out (never touched).
    """
    everyone = _order(services)
    holders = _Holders()
    for svc in everyone:
        if svc.type == "LoadBalancer" and not svc.ours:
            holders.foreign.update(ip for ip in svc.ingress if pools.contains(ip))
    ours = [s for s in everyone if s.ours]
    decisions: dict[Ref, Decision] = {}
    for svc in everyone:
        if svc.type != "LoadBalancer" and any(pools.contains(ip) for ip in svc.ingress):
            decisions[svc.ref] = Decision(ips=())  # no longer a LoadBalancer: clear our address

    requests: dict[Ref, tuple[str, ...] | str] = {}
    for svc in ours:
        asked = [_canonical(r) for r in svc.requested]
        if any(a is None for a in asked):
            requests[svc.ref] = "the requested address is not an IP address"
        else:
            requests[svc.ref] = tuple(dict.fromkeys(a for a in asked if a))

    chosen: dict[Ref, dict[int, str]] = {s.ref: {} for s in ours}
    # 1. keep what status already shows, while it is valid (in a pool, still requested if any)
    for svc in ours:
        req = requests[svc.ref]
        for ip in svc.ingress:
            fam = _family(ip)
            if not pools.contains(ip) or fam in chosen[svc.ref]:
                continue
            if isinstance(req, tuple) and req and ip not in req:
                continue
            if holders.can_share(ip, svc):
                continue
            holders.take(ip, svc)
            chosen[svc.ref][fam] = ip
    # 2. explicit requests, 3. new addresses
    asking = [s for s in ours if requests[s.ref]]
    for svc in asking + [s for s in ours if not requests[s.ref]]:
        req = requests[svc.ref]
        if isinstance(req, str):
            decisions[svc.ref] = Decision(pending=req)
            continue
        fams = _wanted_families(svc, pools)
        have = chosen[svc.ref]
        problem = ""
        if req:
            for ip in req:
                if _family(ip) in have:
                    continue
                if not pools.contains(ip):
                    problem = f"requested address {ip} is in no address pool"
                    break
                why = holders.can_share(ip, svc)
                if why:
                    problem = why
                    break
                holders.take(ip, svc)
                have[_family(ip)] = ip
        else:
            for fam in fams:
                if fam in have:
                    continue
                free = _shared_candidate(holders, svc, fam) or pools.first_free(fam, holders.used())
                if free is None:
                    problem = (
                        f"no free IPv{fam} address left in the pools"
                        if pools.families() & {fam}
                        else f"no IPv{fam} address pool configured"
                    )
                    break
                holders.take(free, svc)
                have[fam] = free
        if problem:
            for ip in have.values():  # give back what this service took in this round
                holders.by_ip[ip] = [h for h in holders.by_ip[ip] if h.ref != svc.ref]
                if not holders.by_ip[ip]:
                    del holders.by_ip[ip]
            decisions[svc.ref] = Decision(pending=problem)
        else:
            decisions[svc.ref] = Decision(ips=tuple(have[f] for f in sorted(have)))
    return decisions


def _shared_candidate(holders: _Holders, svc: LBService, family: int) -> str | None:
    """An address already held under `svc`'s sharing key that it may join (MetalLB prefers
    those, so services with one key end up on one address)."""
    if not svc.sharing_key:
        return None
    for ip, owners in sorted(holders.by_ip.items()):
        if _family(ip) != family or not owners:
            continue
        if owners[0].sharing_key == svc.sharing_key and not holders.can_share(ip, svc):
            return ip
    return None


def pool_usage(pools: Pools, decisions: Mapping[Ref, Decision]) -> dict[str, tuple[int, int]]:
    """{range text: (size, addresses in use)} for the metrics."""
    used = {ip for d in decisions.values() for ip in d.ips}
    out: dict[str, tuple[int, int]] = {}
    for r in pools.ranges:
        out[r.text] = (r.size, sum(1 for ip in used if ipaddress.ip_address(ip) in r))
    return out
