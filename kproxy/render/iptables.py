"""Service views -> iptables-restore text, in kube-proxy's iptables-mode structure.

Pure and standard-library only. The output is built for partial syncs: each service renders into
a `ServiceRules` block (the nat chains it owns, KUBE-SVC/SVL/EXT/FW/SEP, plus the lines it adds
to the shared chains), and the shared chains (nat KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING,
KUBE-MARK-MASQ; filter KUBE-SERVICES, KUBE-EXTERNAL-SERVICES, KUBE-FORWARD, KUBE-NODEPORTS,
KUBE-PROXY-FIREWALL) are rendered from the blocks. A backend can therefore rewrite only the blocks
that changed, and a shared chain only when its text changed, with an `iptables-restore --noflush`
input built by `assemble`; `render_ruleset` gives the complete text for display and tests.

Rules follow kube-proxy's proxier.go (`syncProxyRules`, `writeServiceToEndpointRules`) rule for
rule, including its comments and its probability formatting ("%0.10f" of 1/(n-i)). Where kproxy
differs on purpose:

- NodePorts are never accepted on loopback addresses (kube-proxy's
  `--iptables-localhost-nodeports=false`): that needs `route_localnet=1`, a known security hole
  (https://issues.k8s.io/90259). So kproxy writes no KUBE-FIREWALL anti-martian rule either
  (that chain is kubelet's).
- Session affinity's `recent` matches spell out `--mask` and `--rsource` (the defaults): the
  rendered text is then what `iptables-save` prints back, which makes read-back checks exact.
- Several cluster CIDRs in one family are supported for the off-cluster masquerade test (one
  `! -s` cannot say "outside all of them"): such services jump to KUBE-MARK-MASQ-OFFCLUSTER,
  which RETURNs for each cluster CIDR and marks everything else.
- Comments are always written (kube-proxy drops some above 1000 endpoints): they are what makes
  `iptables-save` and `kproxy explain` readable, and cost little next to the restore itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kproxy.model.decisions import Verdict, node_in_source_ranges
from kproxy.model.endpoints import EndpointInfo
from kproxy.model.objects import IPV6, Ref
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView
from kproxy.render import chains as C

NAT = "nat"
FILTER = "filter"
MANGLE = "mangle"

_V4_MASK = "255.255.255.255"
_V6_MASK = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

_probabilities: list[str] = ["<bad value>"]


def probability(n: int) -> str:
    """kube-proxy's computeProbability: 1/n formatted with "%0.10f" (cached)."""
    while len(_probabilities) <= n:
        _probabilities.append(f"{1.0 / len(_probabilities):0.10f}")
    return _probabilities[n]


class Shared(NamedTuple):
    """The lines one service adds to each shared chain (each a block of "\\n"-ended lines)."""

    nat_services: str = ""
    nat_nodeports: str = ""
    filter_services: str = ""
    filter_external: str = ""
    filter_nodeports: str = ""
    filter_firewall: str = ""


EMPTY_SHARED = Shared()

# (table, chain) of each Shared field, in field order
SHARED_SLOTS: tuple[tuple[str, str], ...] = (
    (NAT, C.SERVICES),
    (NAT, C.NODEPORTS),
    (FILTER, C.SERVICES),
    (FILTER, C.EXTERNAL_SERVICES),
    (FILTER, C.NODEPORTS),
    (FILTER, C.PROXY_FIREWALL),
)


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """Everything one service (all its ports, one IP family) contributes to the ruleset.

    `chains` are the nat chains the service owns, each with its "-A" lines; `shared` the lines
    it adds to the shared chains. Two equal blocks program identical rules, which is how a
    partial sync tells a changed service from an untouched one.
    """

    chains: tuple[tuple[str, str], ...] = ()
    shared: Shared = EMPTY_SHARED

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.chains)

    @property
    def nat_rule_count(self) -> int:
        return sum(text.count("\n") for _, text in self.chains)

    @property
    def empty(self) -> bool:
        return not self.chains and self.shared == EMPTY_SHARED


EMPTY_SERVICE = ServiceRules()


@dataclass(frozen=True, slots=True)
class TableWrite:
    """What one restore writes into one table.

    chains: (name, "-A" lines) pairs; each chain is declared (with --noflush that flushes it)
            and refilled with exactly these lines.
    edits:  raw "-D"/"-I" lines that change chains in place without flushing them.
    delete: chains flushed and deleted after everything else.
    """

    table: str
    chains: Sequence[tuple[str, str]] = ()
    edits: str = ""
    delete: Sequence[str] = ()

    @property
    def empty(self) -> bool:
        return not (self.chains or self.edits or self.delete)


def assemble(writes: Iterable[TableWrite], *, sort: bool = True) -> str:
    """One iptables-restore input (for `--noflush`) from per-table writes.

    Untouched tables are left out (a COMMIT is not free: legacy rewrites the whole table).
    Within a table all declarations come first, so every jump target exists when the rule that
    names it is parsed; in-place edits follow the rewritten chains, deletions come last.

    With `sort` the chains are written in descending name order: iptables-nft-restore
    (v1.8.9) keeps the chains a --noflush input names in a sorted list, so declaring them in
    hash order costs O(chains^2) string compares (measured: 15 s instead of 2 s for 11k chains),
    while sorted declarations are appended cheaply. Without it they keep the given order, which
    reads better (`kproxy render`).
    """
    out: list[str] = []
    for w in writes:
        if w.empty:
            continue
        chains = sorted(w.chains, key=_first, reverse=True) if sort else list(w.chains)
        out.append(f"*{w.table}\n")
        out.extend(f":{name} - [0:0]\n" for name, _ in chains)
        out.extend(f":{name} - [0:0]\n" for name in w.delete)
        out.extend(text for _, text in chains)
        out.append(w.edits)
        out.extend(f"-X {name}\n" for name in w.delete)
        out.append("COMMIT\n")
    return "".join(out)


def _first(pair: tuple[str, str]) -> str:
    return pair[0]


def _net(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr.strip(), strict=False))


@dataclass(slots=True)
class Renderer:
    """Renders blocks and shared chains for one IP family and one set of options."""

    options: ProxyOptions
    random_fully: bool = True
    _mark: str = field(init=False, default="")
    _mask: str = field(init=False, default="")
    _cidrs: tuple[str, ...] = field(init=False, default=())
    _masq_internal: str = field(init=False, default="")
    _node_nets: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = field(
        init=False, default=()
    )

    def __post_init__(self) -> None:
        opts = self.options
        self._mark = f"{1 << opts.masquerade_bit:#x}"
        self._mask = _V6_MASK if opts.family == IPV6 else _V4_MASK
        self._cidrs = tuple(
            _net(c)
            for c in opts.cluster_cidrs
            if ipaddress.ip_network(c.strip(), strict=False).version == opts.family
        )
        if opts.masquerade_all:
            self._masq_internal = " -j " + C.MARK_MASQ
        elif len(self._cidrs) == 1:
            self._masq_internal = f" ! -s {self._cidrs[0]} -j {C.MARK_MASQ}"
        elif self._cidrs:
            self._masq_internal = " -j " + C.MASQ_OFF_CLUSTER
        self._node_nets = tuple(
            ip
            for ip in (ipaddress.ip_address(a) for a in opts.self_ips)
            if ip.version == opts.family
        )

    # -- one service ---------------------------------------------------------------------------
    def render_service(self, views: Sequence[ServicePortView]) -> ServiceRules:
        """The block of one service from its port views (all of one family)."""
        if not views:
            return EMPTY_SERVICE
        chains: dict[str, list[str]] = {}
        sh: list[list[str]] = [[], [], [], [], [], []]
        for view in views:
            self._render_port(view, chains, sh)
        return ServiceRules(
            chains=tuple((name, "".join(lines)) for name, lines in chains.items()),
            shared=Shared(*("".join(lines) for lines in sh)),
        )

    def _render_port(
        self,
        v: ServicePortView,
        chains: dict[str, list[str]],
        sh: list[list[str]],
    ) -> None:
        name = v.name
        proto = v.port.protocol.lower()
        h = C.port_hash(name, proto)
        svc, svl, ext, fw = C.SVC_PREFIX + h, C.SVL_PREFIX + h, C.EXT_PREFIX + h, C.FW_PREFIX + h
        pm = f"-m {proto} -p {proto}"
        port = v.port.port
        cip = v.cluster_ip
        d = v.decision
        cluster_eps = d.cluster or ()
        local_eps = d.local or ()
        external_local = d.external_local

        has_any = d.has_endpoints
        has_internal = d.internal_verdict is Verdict.FORWARD
        external_ok = d.external_verdict is Verdict.FORWARD
        internal_chain = svl if d.internal_local else svc
        external_policy_chain = svl if external_local else svc
        lb_ips = v.load_balancer_ips
        uses_ext = d.uses_external_chain
        uses_fw = has_any and d.firewall
        lb_chain = fw if uses_fw else ext
        uses_cluster_chain = bool(cluster_eps)
        uses_local_chain = bool(local_eps)

        if d.no_endpoints_verdict is Verdict.REJECT:
            target = "REJECT"
            comment = f'"{name} has no endpoints"'
        else:
            target = "DROP"
            comment = f'"{name} has no local endpoints"'

        nat_services, nat_nodeports = sh[0], sh[1]
        f_services, f_external, f_nodeports, f_firewall = sh[2], sh[3], sh[4], sh[5]

        # -- capture: lines in the shared chains -----------------------------------------
        cip_match = f'-m comment --comment "{name} cluster IP" {pm} -d {cip} --dport {port}'
        if has_internal:
            nat_services.append(f"-A KUBE-SERVICES {cip_match} -j {internal_chain}\n")
        else:
            f_services.append(
                f"-A KUBE-SERVICES -m comment --comment {comment} {pm} -d {cip} "
                f"--dport {port} -j {target}\n"
            )
        for eip in v.external_ips:
            if has_any:
                nat_services.append(
                    f'-A KUBE-SERVICES -m comment --comment "{name} external IP" {pm} '
                    f"-d {eip} --dport {port} -j {ext}\n"
                )
            if not external_ok:
                f_external.append(
                    f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {comment} {pm} "
                    f"-d {eip} --dport {port} -j {target}\n"
                )
        for lbip in lb_ips:
            if has_any:
                nat_services.append(
                    f'-A KUBE-SERVICES -m comment --comment "{name} loadbalancer IP" {pm} '
                    f"-d {lbip} --dport {port} -j {lb_chain}\n"
                )
            if uses_fw:
                f_firewall.append(
                    f'-A KUBE-PROXY-FIREWALL -m comment --comment "{name} traffic not accepted '
                    f'by {fw}" {pm} -d {lbip} --dport {port} -j DROP\n'
                )
        if not external_ok:
            for lbip in lb_ips:
                f_external.append(
                    f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {comment} {pm} "
                    f"-d {lbip} --dport {port} -j {target}\n"
                )
        node_port = v.port.node_port
        if node_port:
            if has_any:
                nat_nodeports.append(
                    f"-A KUBE-NODEPORTS -m comment --comment {name} {pm} --dport {node_port} "
                    f"-j {ext}\n"
                )
            if not external_ok:
                f_external.append(
                    f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {comment} "
                    f"-m addrtype --dst-type LOCAL {pm} --dport {node_port} -j {target}\n"
                )
        hc = d.health_check_node_port
        if hc:
            f_nodeports.append(
                f'-A KUBE-NODEPORTS -m comment --comment "{name} health check node port" '
                f"-m tcp -p tcp --dport {hc} -j ACCEPT\n"
            )

        # -- the service's own chains ----------------------------------------------------
        if uses_cluster_chain:
            chains[svc] = []
        if uses_local_chain:
            chains[svl] = []
        if has_internal and self._masq_internal:
            chains[internal_chain].append(f"-A {internal_chain} {cip_match}{self._masq_internal}\n")
        # endpoint -> (KUBE-SEP chain, "ip:port"), each hashed once; keyed by identity because
        # categorize() hands out the same objects in all three tuples (with a fallback if not)
        sep_chain = C.sep_chain
        seps: dict[int, tuple[str, str]] = {}
        sep_ips: list[tuple[str, str, str]] = []
        for ep in d.all_reachable:
            hostport = ep.hostport
            sep = sep_chain(name, proto, hostport)
            seps[id(ep)] = (sep, hostport)
            sep_ips.append((sep, hostport, ep.ip))

        def sep_of(ep: EndpointInfo) -> tuple[str, str]:
            got = seps.get(id(ep))
            return got if got is not None else (sep_chain(name, proto, ep.hostport), ep.hostport)

        if uses_cluster_chain:
            self._balance(chains[svc], v, svc, [sep_of(ep) for ep in cluster_eps])
        if uses_local_chain:
            self._balance(chains[svl], v, svl, [sep_of(ep) for ep in local_eps])

        if uses_ext:
            rules = chains[ext] = []
            if d.masquerade_external:
                rules.append(
                    f'-A {ext} -m comment --comment "masquerade traffic for {name} external '
                    f'destinations" -j KUBE-MARK-MASQ\n'
                )
            elif d.short_circuit:
                # Pod and node traffic to an external address short-circuits to the cluster
                # chain (as if it had gone out to the load balancer and come back).
                for cidr in self._cidrs:
                    rules.append(
                        f'-A {ext} -m comment --comment "pod traffic for {name} external '
                        f'destinations" -s {cidr} -j {svc}\n'
                    )
                rules.append(
                    f'-A {ext} -m comment --comment "masquerade LOCAL traffic for {name} '
                    f'external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ\n'
                )
                rules.append(
                    f'-A {ext} -m comment --comment "route LOCAL traffic for {name} external '
                    f'destinations" -m addrtype --src-type LOCAL -j {svc}\n'
                )
            if external_ok:
                rules.append(f"-A {ext} -j {external_policy_chain}\n")

        if uses_fw:
            rules = chains[fw] = []
            head = f'-A {fw} -m comment --comment "{name} loadbalancer IP"'
            for cidr in v.source_ranges:
                rules.append(f"{head} -s {_net(cidr)} -j {ext}\n")
            if node_in_source_ranges(v.source_ranges, self._node_nets):
                # a node reaching a VIP-style LB IP often arrives with the LB IP as source
                rules.extend(f"{head} -s {lbip} -j {ext}\n" for lbip in lb_ips)
            rules.append(
                f'-A {fw} -m comment --comment "other traffic to {name} will be dropped by '
                f'KUBE-PROXY-FIREWALL"\n'
            )

        recent = (
            f"-m recent --name {{}} --set --mask {self._mask} --rsource "
            if d.affinity_timeout
            else ""
        )
        for sep, hostport, ip in sep_ips:
            chains[sep] = [
                f"-A {sep} -m comment --comment {name} -s {ip} -j KUBE-MARK-MASQ\n",
                f"-A {sep} -m comment --comment {name} {recent.format(sep)}{pm} -j DNAT "
                f"--to-destination {hostport}\n",
            ]

    def _balance(
        self,
        rules: list[str],
        v: ServicePortView,
        chain: str,
        seps: Sequence[tuple[str, str]],
    ) -> None:
        """kube-proxy's writeServiceToEndpointRules: affinity checks, then random balancing
        over `seps`, the (KUBE-SEP chain, "ip:port") of each endpoint."""
        name = v.name
        timeout = v.decision.affinity_timeout
        if timeout:
            for sep, hostport in seps:
                rules.append(
                    f'-A {chain} -m comment --comment "{name} -> {hostport}" -m recent '
                    f"--name {sep} --rcheck --seconds {timeout} --reap --mask {self._mask} "
                    f"--rsource -j {sep}\n"
                )
        n = len(seps)
        last = n - 1
        for i, (sep, hostport) in enumerate(seps):
            if i < last:
                rules.append(
                    f'-A {chain} -m comment --comment "{name} -> {hostport}" -m statistic '
                    f"--mode random --probability {probability(n - i)} -j {sep}\n"
                )
            else:
                rules.append(f'-A {chain} -m comment --comment "{name} -> {hostport}" -j {sep}\n')

    # -- shared chains -------------------------------------------------------------------------
    def nodeports_jump(self) -> str:
        """The last rule of nat KUBE-SERVICES: local destinations go on to KUBE-NODEPORTS."""
        comment = '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain"'  # noqa: E501
        ips = self.options.nodeport_ips
        if ips is None:
            loopback = "::1/128" if self.options.family == IPV6 else "127.0.0.0/8"
            return (
                f"-A KUBE-SERVICES {comment} -m addrtype --dst-type LOCAL ! -d {loopback} "
                "-j KUBE-NODEPORTS\n"
            )
        lines = []
        for text in ips:
            ip = ipaddress.ip_address(text)
            if ip.version != self.options.family or ip.is_loopback:
                continue
            lines.append(f"-A KUBE-SERVICES {comment} -d {ip} -j KUBE-NODEPORTS\n")
        return "".join(lines)

    def fixed_nat(self) -> list[tuple[str, str]]:
        """nat chains whose content depends only on the options."""
        mark = self._mark
        masq = (
            f'-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring '
            f'SNAT" -j MASQUERADE{" --random-fully" if self.random_fully else ""}\n'
        )
        out = [
            (
                C.POSTROUTING,
                f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN\n"
                f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}\n" + masq,
            ),
            (C.MARK_MASQ, f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}\n"),
        ]
        if len(self._cidrs) > 1 and not self.options.masquerade_all:
            text = "".join(f"-A {C.MASQ_OFF_CLUSTER} -s {cidr} -j RETURN\n" for cidr in self._cidrs)
            out.append((C.MASQ_OFF_CLUSTER, text + f"-A {C.MASQ_OFF_CLUSTER} -j KUBE-MARK-MASQ\n"))
        return out

    def fixed_filter(self) -> list[tuple[str, str]]:
        mark = self._mark
        return [
            (
                C.FORWARD,
                "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"
                '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
                f"-m mark --mark {mark}/{mark} -j ACCEPT\n"
                '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
            )
        ]

    def shared_chains(self, shared: Iterable[Shared]) -> dict[tuple[str, str], str]:
        """The text of every shared chain from the services' contributions (in service order).

        Keys are (table, chain); the fixed chains (KUBE-POSTROUTING, ...) are included.
        """
        parts: list[list[str]] = [[], [], [], [], [], []]
        for s in shared:
            for i, text in enumerate(s):
                if text:
                    parts[i].append(text)
        out = {slot: "".join(p) for slot, p in zip(SHARED_SLOTS, parts, strict=True)}
        out[(NAT, C.SERVICES)] += self.nodeports_jump()
        for chain, text in self.fixed_nat():
            out[(NAT, chain)] = text
        for chain, text in self.fixed_filter():
            out[(FILTER, chain)] = text
        return out


# order in which the shared chains are written in a full restore (kube-proxy's order)
NAT_ORDER = (C.SERVICES, C.NODEPORTS, C.POSTROUTING, C.MARK_MASQ, C.MASQ_OFF_CLUSTER)
FILTER_ORDER = (C.SERVICES, C.EXTERNAL_SERVICES, C.FORWARD, C.NODEPORTS, C.PROXY_FIREWALL)


def shared_pairs(shared: Mapping[tuple[str, str], str], table: str) -> list[tuple[str, str]]:
    """(chain, text) of the shared chains of one table, in full-restore order."""
    order = NAT_ORDER if table == NAT else FILTER_ORDER
    return [(c, shared[(table, c)]) for c in order if (table, c) in shared]


def full_writes(
    shared: Mapping[tuple[str, str], str],
    blocks: Iterable[ServiceRules],
    *,
    delete: Mapping[str, Sequence[str]] | None = None,
    canary: bool = False,
) -> list[TableWrite]:
    """The table writes of a full sync: every shared chain and every service block, plus the
    deletion of `delete` (table -> chains) and, with `canary`, the KUBE-PROXY-CANARY chains."""
    delete = delete or {}
    filter_chains = shared_pairs(shared, FILTER)
    nat_chains = shared_pairs(shared, NAT)
    for block in blocks:
        nat_chains.extend(block.chains)
    mangle_chains: list[tuple[str, str]] = []
    if canary:
        for pairs in (filter_chains, nat_chains, mangle_chains):
            pairs.append((C.CANARY, ""))
    return [
        TableWrite(FILTER, chains=filter_chains, delete=delete.get(FILTER, ())),
        TableWrite(NAT, chains=nat_chains, delete=delete.get(NAT, ())),
        TableWrite(MANGLE, chains=mangle_chains, delete=delete.get(MANGLE, ())),
    ]


def render_ruleset(
    views: Mapping[Ref, Sequence[ServicePortView]],
    options: ProxyOptions,
    *,
    random_fully: bool = True,
) -> str:
    """The complete restore text (filter, then nat) for `views` of one family, services in
    namespace/name order and chains in reading order. A full sync writes the same rules."""
    renderer = Renderer(options, random_fully=random_fully)
    blocks = [renderer.render_service(views[ref]) for ref in sorted(views)]
    shared = renderer.shared_chains(b.shared for b in blocks)
    return assemble(full_writes(shared, blocks), sort=False)
