"""Service views -> kube-proxy-shaped nftables: one `kube-proxy` table per family.

Pure and standard-library only. Every service renders into a `ServiceBlock`: the chains it owns
(each a tuple of `Rule`s built from a few statement types) and the elements it adds to the
table's shared sets and maps. A backend keeps the blocks it applied and turns the difference
between an old and a new block into `Op`s (add/flush/delete chain, add rule, add/delete element),
which `ops_text` writes as `nft -f` input and `kproxy.backends.nft_netlink` encodes as one
netlink batch. `render_ruleset` gives the complete `nft -f` input of a full sync.

Names follow kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go): table `kube-proxy`,
base chains filter-prerouting/-input/-forward/-output/-output-post-dnat and
nat-prerouting/-output/-postrouting, the chains services, masquerading, mark-for-masquerade,
firewall-check, cluster-ips-check, service-endpoints-check, nodeport-endpoints-check,
reject-chain, the sets cluster-ips and nodeport-ips, the verdict maps service-ips,
service-nodeports, firewall-ips, no-endpoint-services, no-endpoint-nodeports, and per service
port `service-`, `local-`, `external-`, `firewall-` chains named
`<prefix><HASH8>-<ns>/<svc>/<proto>/<port name>`.

Where the layout differs from kube-proxy's on purpose (the kernel validates every chain reachable
from the hooks whenever a rule with a jump, goto or nat expression is committed, so the number of
chains decides the latency of every change):

- No per-endpoint chains: a service chain picks the endpoint with one
  `dnat ip to numgen random mod N map { 0 : ip . port, ... }` rule. One chain per service port
  (two for eTP/iTP Local, one more for source ranges) instead of one per endpoint.
- Hairpin masquerade (a pod reaching itself through a service) is one rule in `masquerading`
  matching the set `hairpin-endpoints` of (endpoint ip . endpoint ip) pairs, instead of a rule
  in every endpoint chain; an endpoint change is then an element change there.
- Masquerading ClusterIP traffic from outside the cluster CIDR is one rule in `services` over
  `@cluster-ips`, instead of one per service chain.
- ClientIP affinity needs per-endpoint state: only services with affinity get kube-proxy's
  `endpoint-` chains and `affinity-` sets.
- The chainless fast path: a service port with endpoints for internal traffic, no ClientIP
  affinity and no external exposure (no nodePort, externalIPs or LoadBalancer ingress IPs),
  the common ClusterIP case, gets no chain and no `service-ips` element at all. Its endpoints
  are elements of the shared map `cluster-endpoints-N` for its endpoint count N, keyed
  `ip . l4proto . port . index`; the chain `cluster-endpoints` (entered from `services` for
  ClusterIP traffic that no `service-ips` element took) holds one rule per N in use:
  `dnat ip to ip daddr . meta l4proto . th dport . numgen random mod N map @cluster-endpoints-N`.
  Adding such a service or changing its endpoints changes elements only (the kernel validates
  nothing), and the commits that do validate walk only the chains of the other services. A
  map and rule for an N no longer in use stay until the next full sync.
- No "drop traffic to unallocated ClusterIPs" rule: kproxy is not told the service CIDR.
- Health-check node ports need no accept rule: this table drops nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kproxy.model.decisions import Verdict, node_in_source_ranges
from kproxy.model.endpoints import EndpointInfo
from kproxy.model.objects import IPV6, Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView

TABLE = "kube-proxy"

# fixed chains
SERVICES = "services"
MASQUERADING = "masquerading"
MARK_FOR_MASQUERADE = "mark-for-masquerade"
FIREWALL_CHECK = "firewall-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
REJECT_CHAIN = "reject-chain"

# sets and maps
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
FIREWALL_IPS = "firewall-ips"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
HAIRPIN = "hairpin-endpoints"

# per-service prefixes (kube-proxy's)
SERVICE_PREFIX = "service-"
LOCAL_PREFIX = "local-"
EXTERNAL_PREFIX = "external-"
FIREWALL_PREFIX = "firewall-"
ENDPOINT_PREFIX = "endpoint-"
AFFINITY_PREFIX = "affinity-"
# kproxy's own: one interval map per service port (and policy) from slot ranges to endpoints
ENDPOINTS_PREFIX = "endpoints-"
LOCAL_ENDPOINTS_PREFIX = "local-endpoints-"
# kproxy's own: the chainless fast path (see the module docstring)
CLUSTER_ENDPOINTS = "cluster-endpoints"  # the chain
COUNT_MAP_PREFIX = "cluster-endpoints-"  # + N: the map of the services with N endpoints
SLOTS = 65536  # numgen's range; endpoint i of n gets slots [i*SLOTS//n, (i+1)*SLOTS//n)
SERVICE_CHAIN_PREFIXES = (
    SERVICE_PREFIX,
    LOCAL_PREFIX,
    EXTERNAL_PREFIX,
    FIREWALL_PREFIX,
    ENDPOINT_PREFIX,
)

# (chain, hook, priority) of the base chains, kube-proxy's
BASE_CHAINS: tuple[tuple[str, str, str, int], ...] = (
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
FIXED_CHAINS = (
    SERVICES,
    MASQUERADING,
    MARK_FOR_MASQUERADE,
    FIREWALL_CHECK,
    CLUSTER_IPS_CHECK,
    SERVICE_ENDPOINTS_CHECK,
    NODEPORT_ENDPOINTS_CHECK,
    REJECT_CHAIN,
    CLUSTER_ENDPOINTS,
)


def family_word(family: int) -> str:
    """nft's family keyword and payload protocol: ip or ip6."""
    return "ip6" if family == IPV6 else "ip"


def addr_type(family: int) -> str:
    return "ipv6_addr" if family == IPV6 else "ipv4_addr"


# -- names -------------------------------------------------------------------------------------
_hashes: dict[str, str] = {}


def hash8(text: str) -> str:
    """kube-proxy's hashAndTruncate for nftables names: 8 base32 characters of sha256."""
    got = _hashes.get(text)
    if got is None:
        got = base64.b32encode(hashlib.sha256(text.encode()).digest())[:8].decode("ascii")
        if len(_hashes) > 1_000_000:
            _hashes.clear()
        _hashes[text] = got
    return got


def chain_base(v: ServicePortView) -> str:
    """`HASH-ns/svc/proto/portname`, kube-proxy's servicePortChainNameBase."""
    proto = v.port.protocol.lower()
    svc = v.service
    return f"{hash8(v.name + proto)}-{svc.namespace}/{svc.name}/{proto}/{v.port.name}"


def endpoint_base(v: ServicePortView, ep: EndpointInfo) -> str:
    """kube-proxy's servicePortEndpointChainNameBase: `HASH-ns/svc/proto/port__ip/port`."""
    proto = v.port.protocol.lower()
    svc = v.service
    text = f"{v.name}{proto}{ep.hostport}"
    return f"{hash8(text)}-{svc.namespace}/{svc.name}/{proto}/{v.port.name}__{ep.ip}/{ep.port}"


_SERVICE_CHAIN = re.compile(r"^(service|local|external|firewall|endpoint)-[A-Z2-7]{8}-")
_AFFINITY_SET = re.compile(r"^(affinity|endpoints|local-endpoints)-[A-Z2-7]{8}-")


def is_service_chain(name: str) -> bool:
    """A per-service chain (kproxy's or kube-proxy's), never one of the fixed chains."""
    return _SERVICE_CHAIN.match(name) is not None


def is_service_set(name: str) -> bool:
    return _AFFINITY_SET.match(name) is not None


def is_endpoint_map(name: str) -> bool:
    return name.startswith((ENDPOINTS_PREFIX, LOCAL_ENDPOINTS_PREFIX))


_COUNT_MAP = re.compile(r"^cluster-endpoints-([1-9][0-9]*)$")


def count_map_name(n: int) -> str:
    """The shared fast-path map of the service ports with `n` endpoints."""
    return f"{COUNT_MAP_PREFIX}{n}"


_counts_of: dict[str, int] = {}


def count_of(name: str) -> int:
    """N of a fast-path map `cluster-endpoints-N`; 0 for any other name."""
    got = _counts_of.get(name)
    if got is None:
        m = _COUNT_MAP.match(name)
        got = int(m.group(1)) if m else 0
        if len(_counts_of) > 100_000:
            _counts_of.clear()
        _counts_of[name] = got
    return got


def is_count_map(name: str) -> bool:
    return count_of(name) > 0


# -- statements and rules ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SaddrIn:
    """`ip saddr CIDR` / `ip saddr != { CIDR, ... }`."""

    cidrs: tuple[str, ...]
    negate: bool = False


@dataclass(frozen=True, slots=True)
class FibSaddrLocal:
    """`fib saddr type local`: the packet comes from this node."""


@dataclass(frozen=True, slots=True)
class Jump:
    """`jump CHAIN`, `goto CHAIN`, `drop`, `accept`, `return`."""

    kind: str
    chain: str = ""


@dataclass(frozen=True, slots=True)
class DnatMap:
    """`meta l4proto P dnat ip to numgen random mod 65536 map @MAP`: MAP is the service port's
    own interval map from slot ranges to `ip . port` (see `slot_ranges`)."""

    protocol: str
    map: str


@dataclass(frozen=True, slots=True)
class DnatShared:
    """`dnat ip to ip daddr . meta l4proto . th dport . numgen random mod N map
    @cluster-endpoints-N`: the fast path's one rule per endpoint count N. No `meta l4proto`
    match: the key holds the protocol, and the map's value type (`th dport`, not `tcp dport`)
    keeps nft from adding an implicit `meta l4proto tcp`, so one rule serves tcp, udp and
    sctp."""

    n: int


@dataclass(frozen=True, slots=True)
class Dnat:
    """`meta l4proto P dnat ip to ip:port` (endpoint chains of affinity services)."""

    protocol: str
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class NumgenVmap:
    """`numgen random mod N vmap { i : goto CHAIN }` (affinity services)."""

    chains: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SaddrInSet:
    """`ip saddr @SET`."""

    set: str


@dataclass(frozen=True, slots=True)
class UpdateSaddr:
    """`update @SET { ip saddr }`."""

    set: str


# -- the fixed chains' statements (kproxy.backends.nft_netlink encodes them for full syncs) --
@dataclass(frozen=True, slots=True)
class CtState:
    """`ct state new` (`status`: `ct status dnat`)."""

    status: bool = False


@dataclass(frozen=True, slots=True)
class DaddrIn:
    """`ip daddr != CIDR` (a single prefix; `ip daddr != 127.0.0.0/8`)."""

    cidr: str
    negate: bool = False


@dataclass(frozen=True, slots=True)
class FibDaddrLocal:
    """`fib daddr type local`: the packet is addressed to this node."""


@dataclass(frozen=True, slots=True)
class DaddrInSet:
    """`ip daddr @SET`."""

    set: str


@dataclass(frozen=True, slots=True)
class PairInSet:
    """`ip saddr . ip daddr @SET`."""

    set: str


@dataclass(frozen=True, slots=True)
class PortVmap:
    """`ip daddr . meta l4proto . th dport vmap @SET` (`daddr` False: `meta l4proto . th dport
    vmap @SET`)."""

    set: str
    daddr: bool = True


@dataclass(frozen=True, slots=True)
class MarkZero:
    """`meta mark & MASK == 0`."""

    mask: int


@dataclass(frozen=True, slots=True)
class MarkSet:
    """`meta mark set meta mark | MASK` (`op` "|") or `... ^ MASK` (`op` "^")."""

    op: str
    mask: int


@dataclass(frozen=True, slots=True)
class Masquerade:
    """`masquerade fully-random`."""


@dataclass(frozen=True, slots=True)
class Reject:
    """`reject` (ICMP port unreachable)."""


@dataclass(frozen=True, slots=True)
class Comment:
    """`comment "TEXT"` (the rule's userdata; last in a rule)."""

    text: str


Stmt = (
    SaddrIn
    | FibSaddrLocal
    | Jump
    | DnatMap
    | DnatShared
    | Dnat
    | NumgenVmap
    | SaddrInSet
    | UpdateSaddr
    | CtState
    | DaddrIn
    | FibDaddrLocal
    | DaddrInSet
    | PairInSet
    | PortVmap
    | MarkZero
    | MarkSet
    | Masquerade
    | Reject
    | Comment
)
Rule = tuple[Stmt, ...]


def _cidr(text: str) -> str:
    net = ipaddress.ip_network(text.strip(), strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _hostport(family: int, ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if family == IPV6 else f"{ip}:{port}"


def stmt_text(s: Stmt, family: int) -> str:
    fw = family_word(family)
    if isinstance(s, Jump):
        return f"{s.kind} {s.chain}" if s.chain else s.kind
    if isinstance(s, SaddrIn):
        op = "!= " if s.negate else ""
        if len(s.cidrs) == 1:
            return f"{fw} saddr {op}{s.cidrs[0]}"
        return f"{fw} saddr {op}{{ {', '.join(s.cidrs)} }}"
    if isinstance(s, FibSaddrLocal):
        return "fib saddr type local"
    if isinstance(s, DnatMap):
        return f"meta l4proto {s.protocol} dnat {fw} to numgen random mod {SLOTS} map @{s.map}"
    if isinstance(s, DnatShared):
        return (
            f"dnat {fw} to {fw} daddr . meta l4proto . th dport . numgen random mod {s.n} "
            f"map @{count_map_name(s.n)}"
        )
    if isinstance(s, Dnat):
        return f"meta l4proto {s.protocol} dnat {fw} to {_hostport(family, s.ip, s.port)}"
    if isinstance(s, NumgenVmap):
        items = ", ".join(f"{i} : goto {c}" for i, c in enumerate(s.chains))
        return f"numgen random mod {len(s.chains)} vmap {{ {items} }}"
    if isinstance(s, SaddrInSet):
        return f"{fw} saddr @{s.set}"
    if isinstance(s, UpdateSaddr):
        return f"update @{s.set} {{ {fw} saddr }}"
    if isinstance(s, CtState):
        return "ct status dnat" if s.status else "ct state new"
    if isinstance(s, DaddrIn):
        return f"{fw} daddr {'!= ' if s.negate else ''}{s.cidr}"
    if isinstance(s, FibDaddrLocal):
        return "fib daddr type local"
    if isinstance(s, DaddrInSet):
        return f"{fw} daddr @{s.set}"
    if isinstance(s, PairInSet):
        return f"{fw} saddr . {fw} daddr @{s.set}"
    if isinstance(s, PortVmap):
        head = f"{fw} daddr . " if s.daddr else ""
        return f"{head}meta l4proto . th dport vmap @{s.set}"
    if isinstance(s, MarkZero):
        return f"meta mark & {s.mask:#x} == 0"
    if isinstance(s, MarkSet):
        return f"meta mark set meta mark {s.op} {s.mask:#x}"
    if isinstance(s, Masquerade):
        return "masquerade fully-random"
    if isinstance(s, Reject):
        return "reject"
    return f'comment "{s.text}"'


def slot_ranges(n: int) -> list[tuple[int, int]]:
    """The numgen slot range [lo, hi] of each of `n` endpoints: equal shares of SLOTS (within
    one slot in 65536), so changing the endpoints changes map elements, never the rule."""
    return [(i * SLOTS // n, (i + 1) * SLOTS // n - 1) for i in range(n)]


def _no_ep(verdict: Verdict) -> str:
    """The no-endpoint maps' verdict: kube-proxy's `goto reject-chain` or `drop`."""
    return "drop" if verdict is Verdict.DROP else f"goto {REJECT_CHAIN}"


def rule_text(rule: Rule, family: int) -> str:
    return " ".join(stmt_text(s, family) for s in rule)


# -- elements ----------------------------------------------------------------------------------
class Element(NamedTuple):
    """One element of a shared set or map: key parts as nft prints them, the verdict of a
    map ("goto CHAIN", "drop"; "" for a set) and a comment (the service port name). A named
    tuple, not a dataclass: a full sync at 10k services makes and hashes ~200,000 of them."""

    set: str
    key: tuple[str, ...]
    value: str = ""
    comment: str = ""

    def text(self) -> str:
        key = " . ".join(self.key)
        comment = f' comment "{self.comment}"' if self.comment else ""
        value = f" : {self.value}" if self.value else ""
        return f"{key}{comment}{value}"


@dataclass(frozen=True, slots=True)
class SetDef:
    """A set or map of the table: name, key types, value type ("" for a set), flags, timeout."""

    name: str
    key: tuple[str, ...]
    value: str = ""
    flags: tuple[str, ...] = ()
    timeout: int = 0
    typeof: str = ""  # declared with `typeof` instead of `type` (the endpoint maps)

    def text(self) -> str:
        kind = "map" if self.value else "set"
        if self.typeof:
            flags = f" flags {','.join(self.flags)} ;" if self.flags else ""
            return f"{kind} {self.name} {{ typeof {self.typeof} ;{flags} }}"
        typ = " . ".join(self.key) + (f" : {self.value}" if self.value else "")
        extra = ""
        if self.flags:
            extra += f" flags {','.join(self.flags)} ;"
        if self.timeout:
            extra += f" timeout {self.timeout}s ;"
        return f"{kind} {self.name} {{ type {typ} ;{extra} }}"


def shared_sets(family: int) -> tuple[SetDef, ...]:
    a = addr_type(family)
    return (
        SetDef(CLUSTER_IPS, (a,)),
        SetDef(NODEPORT_IPS, (a,)),
        SetDef(SERVICE_IPS, (a, "inet_proto", "inet_service"), "verdict"),
        SetDef(SERVICE_NODEPORTS, ("inet_proto", "inet_service"), "verdict"),
        SetDef(FIREWALL_IPS, (a, "inet_proto", "inet_service"), "verdict"),
        SetDef(NO_ENDPOINT_SERVICES, (a, "inet_proto", "inet_service"), "verdict"),
        SetDef(NO_ENDPOINT_NODEPORTS, ("inet_proto", "inet_service"), "verdict"),
        SetDef(HAIRPIN, (a, a)),
    )


def count_map(n: int, family: int) -> SetDef:
    """The fast path's shared map for `n` endpoints: a plain hash map (a concatenated interval
    map would be a pipapo set, which clones its lookup tables on every commit)."""
    fw = family_word(family)
    return SetDef(
        count_map_name(n),
        (addr_type(family), "inet_proto", "inet_service", "integer"),
        "endpoint",
        typeof=(
            f"{fw} daddr . meta l4proto . th dport . numgen random mod {n} : {fw} daddr . th dport"
        ),
    )


def count_rule(n: int) -> Rule:
    """The rule of the `cluster-endpoints` chain for the map of `n` endpoints."""
    return (DnatShared(n),)


def count_maps_of(names: Iterable[str]) -> set[int]:
    """The endpoint counts N of the fast-path maps among the set `names`."""
    return {n for n in {count_of(name) for name in names} if n}


def takes_fast_path(v: ServicePortView) -> bool:
    """A port on the chainless fast path: endpoints for internal traffic, no ClientIP
    affinity, no external exposure (no nodePort, externalIPs or LoadBalancer ingress IPs)."""
    d = v.decision
    return d.internal_verdict is Verdict.FORWARD and not d.affinity_timeout and not v.has_external


# -- one service -------------------------------------------------------------------------------
Chains = tuple[tuple[str, tuple[Rule, ...]], ...]


@dataclass(frozen=True, slots=True)
class ServiceBlock:
    """What one service (all its ports, one family) adds to the table. Equal blocks program
    identical state, which is how a partial sync tells a changed service from an untouched one.

    `sets` are the service's own sets (affinity), created with the block and deleted with it."""

    chains: Chains = ()
    elements: tuple[Element, ...] = ()
    sets: tuple[SetDef, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.chains and not self.elements and not self.sets

    @property
    def rule_count(self) -> int:
        return sum(len(rules) for _, rules in self.chains)


EMPTY_BLOCK = ServiceBlock()


class FastTexts(NamedTuple):
    """A fast-path service in a full sync's input: its elements as (set, key text, element
    text) (see `Renderer.fast_texts`)."""

    elements: tuple[tuple[str, str, str], ...]


@dataclass(slots=True)
class Renderer:
    """Renders service blocks and the fixed part of the table for one family and options."""

    options: ProxyOptions
    _cidrs: tuple[str, ...] = field(init=False, default=())
    _node_nets: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = field(
        init=False, default=()
    )

    def __post_init__(self) -> None:
        fam = self.options.family
        self._cidrs = tuple(
            _cidr(c)
            for c in self.options.cluster_cidrs
            if ipaddress.ip_network(c.strip(), strict=False).version == fam
        )
        self._node_nets = tuple(
            ip
            for ip in (ipaddress.ip_address(a) for a in self.options.node_ips)
            if ip.version == fam
        )

    @property
    def family(self) -> int:
        return self.options.family

    def render_service(self, views: Sequence[ServicePortView]) -> ServiceBlock:
        if not views:
            return EMPTY_BLOCK
        chains: dict[str, list[Rule]] = {}
        elements: list[Element] = []
        sets: list[SetDef] = []
        for v in views:
            self._render_port(v, chains, elements, sets)
        return ServiceBlock(
            chains=tuple((name, tuple(rules)) for name, rules in chains.items()),
            elements=tuple(dict.fromkeys(elements)),  # first of each, in order
            sets=tuple(sets),
        )

    def fast_texts(self, views: Sequence[ServicePortView]) -> FastTexts | None:
        """The elements of a service whose ports all take the chainless fast path, as
        (set, key text, element text) in the order `render_service` makes them: what a full
        sync writes for it, without building its `ServiceBlock` (which the backend builds after
        the input is written, while nft evaluates it). None for any other service (and for
        no views). Must stay the text of `_render_port`'s fast path (tested)."""
        out: list[tuple[str, str, str]] = []
        add = out.append
        for v in views:
            if not takes_fast_path(v):
                return None
            d = v.decision
            cip = v.cluster_ip
            add((CLUSTER_IPS, cip, cip))
            count = f"{COUNT_MAP_PREFIX}{len(d.internal)}"
            head = f"{cip} . {v.port.protocol.lower()} . {v.port.port} . "
            for i, ep in enumerate(d.internal):
                key = f"{head}{i}"
                add((count, key, f"{key} : {ep.ip} . {ep.port}"))
            for ep in d.all_reachable:
                key = f"{ep.ip} . {ep.ip}"
                add((HAIRPIN, key, key))
        return FastTexts(tuple(out)) if out else None

    def _render_port(
        self,
        v: ServicePortView,
        chains: dict[str, list[Rule]],
        elements: list[Element],
        sets: list[SetDef],
    ) -> None:
        proto = v.port.protocol.lower()
        port = str(v.port.port)
        cip = v.cluster_ip
        d = v.decision
        if takes_fast_path(v):
            # the chainless fast path: elements of the shared map for its endpoint count
            add = elements.append
            add(Element(CLUSTER_IPS, (cip,)))
            count = count_map_name(len(d.internal))
            for i, ep in enumerate(d.internal):
                add(Element(count, (cip, proto, port, str(i)), f"{ep.ip} . {ep.port}"))
            for ep in d.all_reachable:
                add(Element(HAIRPIN, (ep.ip, ep.ip)))
            return
        name = v.name
        base = chain_base(v)
        svc, svl = SERVICE_PREFIX + base, LOCAL_PREFIX + base
        ext, fw = EXTERNAL_PREFIX + base, FIREWALL_PREFIX + base
        cluster_eps = d.cluster or ()
        local_eps = d.local or ()
        has_any = d.has_endpoints
        internal_ok = d.internal_verdict is Verdict.FORWARD
        external_ok = d.external_verdict is Verdict.FORWARD
        internal_chain = svl if d.internal_local else svc
        external_policy_chain = svl if d.external_local else svc
        lb_ips = v.load_balancer_ips
        uses_ext = d.uses_external_chain
        uses_fw = has_any and d.firewall

        ext_no_ep = _no_ep(d.external_verdict)
        add = elements.append
        add(Element(CLUSTER_IPS, (cip,)))
        if internal_ok:
            add(Element(SERVICE_IPS, (cip, proto, port), f"goto {internal_chain}", name))
        else:
            add(Element(NO_ENDPOINT_SERVICES, (cip, proto, port), _no_ep(d.internal_verdict), name))
        for ip in (*v.external_ips, *lb_ips):
            if has_any:
                add(Element(SERVICE_IPS, (ip, proto, port), f"goto {ext}", name))
            if not external_ok:
                add(Element(NO_ENDPOINT_SERVICES, (ip, proto, port), ext_no_ep, name))
        if uses_fw:
            for ip in lb_ips:
                add(Element(FIREWALL_IPS, (ip, proto, port), f"goto {fw}", name))
        node_port = v.port.node_port
        if node_port:
            if has_any:
                add(Element(SERVICE_NODEPORTS, (proto, str(node_port)), f"goto {ext}", name))
            if not external_ok:
                add(Element(NO_ENDPOINT_NODEPORTS, (proto, str(node_port)), ext_no_ep, name))
        for ep in d.all_reachable:
            add(Element(HAIRPIN, (ep.ip, ep.ip)))

        if cluster_eps:
            chains[svc] = self._balance(v, cluster_eps, chains, sets, elements, local=False)
        if local_eps:
            chains[svl] = self._balance(v, local_eps, chains, sets, elements, local=True)

        if uses_ext:
            rules: list[Rule] = []
            if d.masquerade_external:
                rules.append((Jump("jump", MARK_FOR_MASQUERADE),))
            elif d.short_circuit:
                # pod and node traffic to an external address short-circuits to the cluster
                # chain (as if it had gone out to the load balancer and come back)
                rules.extend((SaddrIn((c,)), Jump("goto", svc)) for c in self._cidrs)
                rules.append((FibSaddrLocal(), Jump("jump", MARK_FOR_MASQUERADE)))
                rules.append((FibSaddrLocal(), Jump("goto", svc)))
            if external_ok:
                rules.append((Jump("goto", external_policy_chain),))
            chains[ext] = rules

        if uses_fw:
            allowed = [_cidr(c) for c in v.source_ranges]
            if node_in_source_ranges(v.source_ranges, self._node_nets):
                # a node reaching a VIP-style LB IP often arrives with the LB IP as source
                allowed.extend(lb_ips)
            chains[fw] = [(SaddrIn(tuple(dict.fromkeys(allowed)), negate=True), Jump("drop"))]

    def _balance(
        self,
        v: ServicePortView,
        endpoints: Sequence[EndpointInfo],
        chains: dict[str, list[Rule]],
        sets: list[SetDef],
        elements: list[Element],
        *,
        local: bool,
    ) -> list[Rule]:
        proto = v.port.protocol.lower()
        timeout = v.decision.affinity_timeout
        if not timeout:
            base = chain_base(v)
            name = (LOCAL_ENDPOINTS_PREFIX if local else ENDPOINTS_PREFIX) + base
            fw = family_word(self.family)
            sets.append(
                SetDef(
                    name,
                    ("integer",),
                    "endpoint",
                    flags=("interval",),
                    typeof=f"numgen random mod {SLOTS} : {fw} daddr . {proto} dport",
                )
            )
            for (lo, hi), e in zip(slot_ranges(len(endpoints)), endpoints, strict=True):
                elements.append(Element(name, (f"{lo}-{hi}",), f"{e.ip} . {e.port}"))
            return [(DnatMap(proto, name),)]
        # ClientIP affinity: kube-proxy's per-endpoint chains and affinity sets
        rules: list[Rule] = []
        targets = []
        for ep in endpoints:
            base = endpoint_base(v, ep)
            chain, aff = ENDPOINT_PREFIX + base, AFFINITY_PREFIX + base
            targets.append(chain)
            if chain not in chains:
                aset = SetDef(
                    aff, (addr_type(self.family),), flags=("dynamic", "timeout"), timeout=timeout
                )
                if aset not in sets:
                    sets.append(aset)
                chains[chain] = [(UpdateSaddr(aff), Dnat(proto, ep.ip, ep.port))]
            rules.append((SaddrInSet(aff), Jump("goto", chain)))
        rules.append((NumgenVmap(tuple(targets)),))
        return rules

    # -- the fixed part ------------------------------------------------------------------------
    def fixed_chains(self) -> dict[str, tuple[Rule, ...]]:
        """Rules of the base chains and the fixed regular chains (`rule_text` prints them; the
        netlink codec encodes them)."""
        mark = 1 << self.options.masquerade_bit
        new = CtState()
        loopback = "::1" if self.family == IPV6 else "127.0.0.0/8"
        np_match: Rule
        if self.options.nodeport_ips is None:
            np_match = (FibDaddrLocal(), DaddrIn(loopback, negate=True))
        else:
            np_match = (DaddrInSet(NODEPORT_IPS),)
        cluster_ips = DaddrInSet(CLUSTER_IPS)
        services: list[Rule] = []
        if self.options.masquerade_all:
            services.append((cluster_ips, Jump("jump", MARK_FOR_MASQUERADE)))
        elif self._cidrs:
            services.append(
                (cluster_ips, SaddrIn(self._cidrs, negate=True), Jump("jump", MARK_FOR_MASQUERADE))
            )
        services.append((PortVmap(SERVICE_IPS),))
        services.append((cluster_ips, Jump("jump", CLUSTER_ENDPOINTS)))
        services.append((*np_match, PortVmap(SERVICE_NODEPORTS, daddr=False)))

        def jump(chain: str) -> Rule:
            return (new, Jump("jump", chain))

        return {
            "filter-prerouting": (jump(FIREWALL_CHECK),),
            "filter-input": (jump(NODEPORT_ENDPOINTS_CHECK), jump(SERVICE_ENDPOINTS_CHECK)),
            "filter-forward": (jump(SERVICE_ENDPOINTS_CHECK), jump(CLUSTER_IPS_CHECK)),
            "filter-output": (jump(SERVICE_ENDPOINTS_CHECK), jump(FIREWALL_CHECK)),
            "filter-output-post-dnat": (jump(CLUSTER_IPS_CHECK),),
            "nat-prerouting": ((Jump("jump", SERVICES),),),
            "nat-output": ((Jump("jump", SERVICES),),),
            "nat-postrouting": ((Jump("jump", MASQUERADING),),),
            SERVICES: tuple(services),
            MASQUERADING: (
                (CtState(status=True), PairInSet(HAIRPIN), Masquerade()),
                (MarkZero(mark), Jump("return")),
                (MarkSet("^", mark),),
                (Masquerade(),),
            ),
            MARK_FOR_MASQUERADE: ((MarkSet("|", mark),),),
            FIREWALL_CHECK: ((PortVmap(FIREWALL_IPS),),),
            CLUSTER_IPS_CHECK: (
                (
                    cluster_ips,
                    Reject(),
                    Comment("Reject traffic to invalid ports of ClusterIPs"),
                ),
            ),
            SERVICE_ENDPOINTS_CHECK: ((PortVmap(NO_ENDPOINT_SERVICES),),),
            NODEPORT_ENDPOINTS_CHECK: ((*np_match, PortVmap(NO_ENDPOINT_NODEPORTS, daddr=False)),),
            REJECT_CHAIN: ((Reject(),),),
        }

    def nodeport_elements(self) -> tuple[Element, ...]:
        ips = self.options.nodeport_ips or ()
        out = []
        for text in ips:
            ip = ipaddress.ip_address(text)
            if ip.version == self.family and not ip.is_loopback:
                out.append(Element(NODEPORT_IPS, (str(ip),)))
        return tuple(out)


# -- transactions ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Op:
    """One command of a transaction.

    kind: add-chain, flush-chain, delete-chain (name), add-rule (chain, rule), add-element,
    delete-element (element), add-set, delete-set (setdef / name), flush-set (name)."""

    kind: str
    name: str = ""
    rule: Rule = ()
    element: Element | None = None
    setdef: SetDef | None = None


def _prefix(family: int) -> str:
    return f"{family_word(family)} {TABLE}"


def op_text(op: Op, family: int) -> str:
    t = _prefix(family)
    k = op.kind
    if k == "add-rule":
        return f"add rule {t} {op.name} {rule_text(op.rule, family)}\n"
    if k in ("add-element", "delete-element"):
        assert op.element is not None
        verb = "add" if k == "add-element" else "delete"
        e = op.element
        text = e.text() if verb == "add" else " . ".join(e.key)
        return f"{verb} element {t} {e.set} {{ {text} }}\n"
    if k == "add-set":
        assert op.setdef is not None
        return f"add {op.setdef.text().replace(' ', f' {t} ', 1)}\n"
    if k == "delete-set":
        return f"delete set {t} {op.name}\n"
    if k == "flush-set":
        return f"flush set {t} {op.name}\n"
    verb, _, _ = k.partition("-")
    return f"{verb} chain {t} {op.name}\n"


def ops_text(ops: Iterable[Op], family: int) -> str:
    return "".join(op_text(op, family) for op in ops)


ElementKey = tuple[str, tuple[str, ...]]  # (set, key): one element in the kernel
# the services owning one key: (ref, element, ref, element, ...) in ref order, flat (one
# tuple per key: a full sync at 10k services records ~200,000 of them); the first owner's
# element is the one in the kernel, as a full sync (services in name order) writes it
Owners = tuple[Any, ...]


def _without(owners: Owners, ref: Ref) -> Owners:
    for i in range(0, len(owners), 2):
        if owners[i] == ref:
            return owners[:i] + owners[i + 2 :]
    return owners


def _with(owners: Owners, ref: Ref, e: Element) -> Owners:
    """`owners` with `ref` owning `e` (unless it owns the key already: a service's first
    element of a key is the one a full sync writes)."""
    for i in range(0, len(owners), 2):
        if owners[i] == ref:
            return owners
        if ref < owners[i]:
            return (*owners[:i], ref, e, *owners[i:])
    return (*owners, ref, e)


def _by_key(b: ServiceBlock) -> dict[ElementKey, Element]:
    out: dict[ElementKey, Element] = {}
    for e in b.elements:
        out.setdefault((e.set, e.key), e)
    return out


def delta_ops(
    old: Mapping[Ref, ServiceBlock],
    new: Mapping[Ref, ServiceBlock],
    element_counts: Mapping[ElementKey, Owners],
    *,
    family: int = 4,
    count_maps: AbstractSet[int] = frozenset(),
) -> tuple[list[Op], dict[ElementKey, Owners]]:
    """The ops that turn the blocks `old[ref]` into `new[ref]` for every ref of `new`, and the
    element owners that change (see `element_counts`; fold them in with `apply_counts` once
    the ops are applied).

    Elements are shared between services, and two services may claim one key with different
    values (two Services with the same externalIP and port): the kernel holds the element of
    the key's first owner in service name order, as a full sync writes it. A second owner
    sends nothing; when the first goes (or drops or changes the key) its element is deleted
    and the next owner's added, in the same transaction.

    `count_maps`: the endpoint counts N whose fast-path map and rule exist (in `family`'s
    table); a new element of another N's map first creates that map and its rule in
    `cluster-endpoints` (`new_count_maps` tells which N a transaction created).

    Order matters inside one transaction: chains and sets are created before rules and
    elements name them; elements pointing at a chain are deleted before the chain.

    A set whose definition changed (the affinity timeout) is deleted and created again (kproxy
    does not rely on the kernel updating a set's timeout in place), and a set cannot be
    deleted while a rule names it, so the service's chains are emptied first and refilled
    after, in the same transaction (the clients' affinity entries start afresh)."""
    # only the owners of the keys this delta touches (copying all of them costs more than the
    # rest of a one-endpoint sync at 10k services)
    counts = _Overlay(element_counts)
    was_first: dict[ElementKey, Element | None] = {}  # touched keys: the kernel's element
    add_chains: list[Op] = []
    recreate: list[Op] = []
    rules: list[Op] = []
    add_sets: list[Op] = []
    add_elems: list[Op] = []
    del_elems: list[Op] = []
    flush_gone: list[Op] = []
    del_chains: list[Op] = []
    del_sets: list[Op] = []
    created: set[int] = set()
    for ref, after in new.items():
        before = old.get(ref, EMPTY_BLOCK)
        if before == after:
            continue
        was = dict(before.chains)
        now = dict(after.chains)
        old_sets = {s.name: s for s in before.sets}
        new_sets = {s.name: s for s in after.sets}
        redefined = [s.name for s in after.sets if old_sets.get(s.name, s) != s]
        if redefined:
            recreate.extend(Op("flush-chain", chain) for chain in was)
            recreate.extend(Op("delete-set", name) for name in redefined)
        for s in after.sets:
            if old_sets.get(s.name) != s:
                add_sets.append(Op("add-set", setdef=s))
        del_sets.extend(Op("delete-set", n) for n in old_sets if n not in new_sets)
        for chain, chain_rules in after.chains:
            prev = was.get(chain)
            if prev == chain_rules and not redefined:
                continue
            if prev is None:
                add_chains.append(Op("add-chain", chain))
            elif not redefined:  # (emptied above otherwise)
                rules.append(Op("flush-chain", chain))
            rules.extend(Op("add-rule", chain, rule=r) for r in chain_rules)
        for chain in was:
            if chain not in now:
                flush_gone.append(Op("flush-chain", chain))
                del_chains.append(Op("delete-chain", chain))
        had = _by_key(before)
        has = _by_key(after)
        # the keys whose element changes: the new ones in the block's order, then the gone
        touched: list[tuple[ElementKey, Element | None]]
        touched = [(k, e) for k, e in has.items() if had.get(k) != e]
        touched += [(k, None) for k in had if k not in has]
        for k, e in touched:
            owners = counts.get(k)
            if k not in was_first:
                was_first[k] = owners[1] if owners else None
            owners = _without(owners, ref)
            if e is None:
                counts[k] = owners
                continue
            counts[k] = _with(owners, ref, e)
            size = count_of(e.set)
            if size and size not in count_maps and size not in created:
                # a fast-path map first used here (where a full sync declares it; an owner
                # of a key of a map not in the table yet is its first: its element is added)
                created.add(size)
                add_sets.append(Op("add-set", setdef=count_map(size, family)))
                rules.append(Op("add-rule", CLUSTER_ENDPOINTS, rule=count_rule(size)))
    for k, first in was_first.items():
        owners = counts.get(k)
        now_first = owners[1] if owners else None
        if now_first == first:
            continue
        if first is not None:
            del_elems.append(Op("delete-element", element=first))
        if now_first is not None:
            add_elems.append(Op("add-element", element=now_first))
    ops = [*add_chains, *recreate, *add_sets, *rules, *del_elems, *add_elems, *flush_gone]
    ops += del_chains + del_sets
    return ops, counts.changed


def new_count_maps(ops: Iterable[Op]) -> set[int]:
    """The endpoint counts whose fast-path maps the ops of a `delta_ops` create."""
    return count_maps_of(op.setdef.name for op in ops if op.setdef is not None)


class _Overlay:
    """Owners read through to a base mapping, with writes kept apart (`changed`: key -> new
    owners, () for none)."""

    def __init__(self, base: Mapping[ElementKey, Owners]) -> None:
        self._base = base
        self.changed: dict[ElementKey, Owners] = {}

    def get(self, k: ElementKey) -> Owners:
        got = self.changed.get(k)
        return self._base.get(k, ()) if got is None else got

    def __setitem__(self, k: ElementKey, owners: Owners) -> None:
        self.changed[k] = owners


def apply_counts(counts: dict[ElementKey, Owners], changed: Mapping[ElementKey, Owners]) -> None:
    """Fold the `changed` owners a `delta_ops` returned into `counts`."""
    for k, owners in changed.items():
        if owners:
            counts[k] = owners
        else:
            counts.pop(k, None)


def element_counts(blocks: Iterable[tuple[Ref, ServiceBlock]]) -> dict[ElementKey, Owners]:
    """The owners of every key of the (ref, block) pairs (see `delta_ops`)."""
    out: dict[ElementKey, Owners] = {}
    for ref, b in blocks:
        for e in b.elements:
            k = (e.set, e.key)
            owners = out.get(k)
            out[k] = (ref, e) if owners is None else _with(owners, ref, e)
    return out


ELEMENT_BATCH = 1000  # elements per `add element` command of a full sync


def full_chunks(
    renderer: Renderer,
    blocks: Iterable[ServiceBlock | FastTexts],
    *,
    stale: Callable[[], tuple[Sequence[str], Sequence[str]]] = lambda: ((), ()),
    redefined: Callable[[SetDef], bool] = lambda s: False,
) -> Iterator[str]:
    """The `nft -f` input of a full sync, in pieces, lazily: one atomic transaction that
    (re)declares the table, its sets and chains, flushes what kproxy owns and refills it, and
    deletes the (chains, sets) `stale()` returns once every block has been consumed. Nothing is
    removed outside the transaction, so connections survive it.

    Each service's chains are declared, flushed and refilled together, so the input can be
    written while later services are still being rendered; the map
    elements follow the chains they point at, in `add element` commands of ELEMENT_BATCH
    elements as each fills, and the fast path's maps are declared where first used. A set
    `redefined` says exists with another definition (the affinity timeout) is deleted and
    created again once its service's chains are flushed (see `delta_ops`).

    A fast-path service may come as its `FastTexts` instead of its block: the same text."""
    fam = renderer.family
    t = _prefix(fam)
    head = [f'add table {t} {{ comment "rules for kube-proxy" ; }}\n']
    for name, typ, hook, prio in BASE_CHAINS:
        head.append(f"add chain {t} {name} {{ type {typ} hook {hook} priority {prio} ; }}\n")
    for name in FIXED_CHAINS:
        head.append(f"add chain {t} {name}\n")
    for s in shared_sets(fam):
        head.append(f"add {s.text().replace(' ', f' {t} ', 1)}\n")
    # flush everything kproxy owns, then refill: one transaction, so no window without rules
    for name, *_ in BASE_CHAINS:
        head.append(f"flush chain {t} {name}\n")
    for name in FIXED_CHAINS:
        head.append(f"flush chain {t} {name}\n")
    for s in shared_sets(fam):
        head.append(f"flush {'map' if s.value else 'set'} {t} {s.name}\n")
    for chain, rules in renderer.fixed_chains().items():
        head.extend(f"add rule {t} {chain} {rule_text(r, fam)}\n" for r in rules)
    yield "".join(head)

    by_set: dict[str, list[str]] = {}  # element texts not written yet, per set
    seen: dict[str, set[str]] = {}  # keys written or pending, per set

    def collect(elements: Iterable[tuple[str, str, str]]) -> list[str]:
        """Queue the elements' texts, given as (set, key text, element text); the names of
        the sets met for the first time."""
        first = []
        for name, key, text in elements:
            keys = seen.get(name)
            if keys is None:
                keys = seen[name] = set()
                by_set[name] = []
                first.append(name)
            if key not in keys:  # two services claiming one key: the first wins
                keys.add(key)
                by_set[name].append(text)
        return first

    def element_texts(elements: Iterable[Element]) -> Iterator[tuple[str, str, str]]:
        for e in elements:
            yield e.set, " . ".join(e.key), e.text()

    collect(element_texts(renderer.nodeport_elements()))
    counts: dict[int, None] = {}  # the fast-path maps declared so far, in order of first use
    for b in blocks:
        if isinstance(b, FastTexts):
            out = []
            first = collect(b.elements)
        else:
            out = [block_text(b, fam, redefined)]
            first = collect(element_texts(b.elements))
        for n in (count_of(name) for name in first):
            if not n:
                continue
            counts[n] = None  # first used here: declare
            # created afresh (add, delete, add: whether it existed or not): nft 1.0.6 cannot
            # add a rule using such a map it read back from the kernel ("conflicting
            # protocols specified: ip vs. th"), only one declared in the same input; the
            # rules using it were flushed above, and all its elements follow
            declare = f"add {count_map(n, fam).text().replace(' ', f' {t} ', 1)}\n"
            out += [declare, f"delete map {t} {count_map_name(n)}\n", declare]
        # full batches of elements go now, as the input streams (the chains their verdicts
        # name are all above)
        for name, texts in by_set.items():
            if len(texts) >= ELEMENT_BATCH:
                out.append(f"add element {t} {name} {{ {', '.join(texts)} }}\n")
                texts.clear()
        yield "".join(out)
    out = [f"add rule {t} {CLUSTER_ENDPOINTS} {rule_text(count_rule(n), fam)}\n" for n in counts]
    for name, texts in by_set.items():
        for i in range(0, len(texts), ELEMENT_BATCH):
            if texts[i : i + ELEMENT_BATCH]:
                batch = ", ".join(texts[i : i + ELEMENT_BATCH])
                out.append(f"add element {t} {name} {{ {batch} }}\n")
    stale_chains, stale_sets = stale()
    out.extend(f"flush chain {t} {name}\n" for name in stale_chains)
    out.extend(f"delete chain {t} {name}\n" for name in stale_chains)
    out.extend(f"delete set {t} {name}\n" for name in stale_sets)
    yield "".join(out)


def block_text(
    b: ServiceBlock, family: int, redefined: Callable[[SetDef], bool] = lambda s: False
) -> str:
    """A service's sets, chains and rules in a full sync's input (its elements are written
    with every other service's, per set)."""
    t = _prefix(family)
    redo = [s for s in b.sets if redefined(s)]
    out = [f"add {s.text().replace(' ', f' {t} ', 1)}\n" for s in b.sets if s not in redo]
    out.extend(f"flush map {t} {s.name}\n" for s in b.sets if s.typeof)
    out.extend(f"add chain {t} {name}\n" for name, _ in b.chains)
    out.extend(f"flush chain {t} {name}\n" for name, _ in b.chains)
    for s in redo:
        out.append(f"delete set {t} {s.name}\n")
        out.append(f"add {s.text().replace(' ', f' {t} ', 1)}\n")
    for chain, chain_rules in b.chains:
        out.extend(f"add rule {t} {chain} {rule_text(r, family)}\n" for r in chain_rules)
    return "".join(out)


def full_text(
    renderer: Renderer,
    blocks: Iterable[ServiceBlock | FastTexts],
    *,
    stale_chains: Sequence[str] = (),
    stale_sets: Sequence[str] = (),
) -> str:
    """`full_chunks` as one text."""
    return "".join(full_chunks(renderer, blocks, stale=lambda: (stale_chains, stale_sets)))


def render_ruleset(
    views: Mapping[Ref, Sequence[ServicePortView]],
    options: ProxyOptions,
) -> str:
    """The `nft -f` input of a full sync for `views` of one family, services in name order."""
    renderer = Renderer(options)
    return full_text(renderer, (service_input(renderer, views[ref]) for ref in sorted(views)))


def service_input(renderer: Renderer, views: Sequence[ServicePortView]) -> ServiceBlock | FastTexts:
    """What a full sync writes for one service: its `FastTexts` when it has them, else its
    block."""
    return renderer.fast_texts(views) or renderer.render_service(views)
