"""`kproxy status`: this node's service ports and the backends the kernel really has for them,
checked against what kproxy should have programmed.

iptables mode: the live nat/filter tables (`iptables-save -c`) are read back into per-port
states — addresses from the KUBE-SERVICES/KUBE-NODEPORTS jumps, backends by tracing the port's
KUBE-SVC/KUBE-SVL and KUBE-EXT chains (so an endpoint counts only when a packet can really reach
its DNAT, and each gets its real share), REJECT/DROP verdicts from the filter table, and the DNAT
rules' packet counters (new connections). The desired state goes through the very same reader:
kproxy's renderer turns the wanted Services/EndpointSlices (by default the snapshot the
running agent last synced, read from its socket; or the API/manifests the flags name:
kproxy.inspect.wanted) into a ruleset,
which is parsed and read like the kernel's. Mismatches: a port not programmed or not wanted, a
missing or extra address or endpoint, a different verdict, traffic that falls through without
DNAT, an uneven split, service chains nobody wants.

IPVS mode: virtual servers from `ipvsadm -Ln` against the desired IPVS state, with the
connection counters.

Exit status: 0 when everything matches, 1 on any mismatch, 2 when the state cannot be read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kproxy.inspect import iptrace as T
from kproxy.inspect.explain import service_name
from kproxy.inspect.lbstatus import fetch_lb_report, render_lb
from kproxy.render import chains as C

if TYPE_CHECKING:
    from kproxy.inspect.wanted import Wanted

# what `status -o json` shows of the agent it read the wanted state from
AGENT_FIELDS = ("pid", "kproxy", "node_name", "mode", "synced_at", "unbound")

EVEN_TOLERANCE = 0.01  # how far a backend's share may be from 1/n before it is called uneven
LEAK_TOLERANCE = 1e-9

_ADDRESS_KINDS = (
    (" cluster IP", "cluster"),
    (" external IP", "external"),
    (" loadbalancer IP", "lb"),
)


@dataclass(slots=True)
class PortState:
    """One service port as a ruleset programs it."""

    name: str
    protocol: str = ""
    addresses: list[str] = field(default_factory=list)
    internal_chain: str = ""
    external_chain: str = ""
    internal: dict[str, float] = field(default_factory=dict)  # endpoint -> share
    external: dict[str, float] | None = None
    verdicts: set[str] = field(default_factory=set)  # "REJECT (no endpoints)", ...
    leak: float = 0.0  # share of new connections that reach no DNAT
    chains: set[str] = field(default_factory=set)
    empty_chains: set[str] = field(default_factory=set)
    dnat_rules: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)

    @property
    def packets(self) -> int:
        """New connections the port's DNAT rules have translated (nat sees only first packets)."""
        return sum(pk for _, pk in self.dnat_rules.values())

    @property
    def endpoint_packets(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for endpoint, pk in self.dnat_rules.values():
            out[endpoint] = out.get(endpoint, 0) + pk
        return out

    def add_address(self, text: str) -> None:
        if text not in self.addresses:
            self.addresses.append(text)


def _cond(rule: T.Rule, kind: str) -> str:
    for c in rule.conditions:
        if c.kind == kind and not c.negate:
            if c.kind in ("src", "dst") and c.net is not None:
                a = c.net
                return str(a.network_address) if a.prefixlen == a.max_prefixlen else str(a)
            return c.args[0]
    return ""


def _hostport(ip: str, port: str) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _walk_backends(
    rs: T.Ruleset, state: PortState, chain: str, packet: T.Packet
) -> tuple[dict[str, float], float]:
    shares: dict[str, float] = {}
    leak = 0.0
    for w in T.walk(rs, "nat", chain, packet):
        for step in w.steps:
            if C.is_service_chain(step.chain):
                state.chains.add(step.chain)
            r = step.rule
            if r is not None and step.taken and r.target.startswith(C.SEP_PREFIX):
                target = rs.chain("nat", r.target)
                if target is not None and not any(x.target == "DNAT" for x in target.rules):
                    state.empty_chains.add(r.target)
        if w.dnat:
            shares[w.dnat] = shares.get(w.dnat, 0.0) + w.probability
            rule = w.verdict_rule
            if rule is not None:
                state.dnat_rules[(rule.chain, rule.index)] = (w.dnat, rule.pkts or 0)
        elif w.verdict not in ("DROP", "REJECT"):
            leak += w.probability
    return shares, leak


def read_ports(rs: T.Ruleset) -> dict[str, PortState]:
    """Every service port a ruleset programs, keyed by kube-proxy's port name ("ns/svc:port")."""
    ports: dict[str, PortState] = {}

    def get(name: str) -> PortState:
        st = ports.get(name)
        if st is None:
            st = ports[name] = PortState(name)
        return st

    cluster_dst: dict[str, tuple[str, int]] = {}
    for rule in rs.rules("nat", C.SERVICES):
        for suffix, kind in _ADDRESS_KINDS:
            if rule.comment.endswith(suffix):
                st = get(rule.comment[: -len(suffix)])
                st.protocol = _cond(rule, "proto").upper()
                addr = _hostport(_cond(rule, "dst"), _cond(rule, "dport"))
                st.add_address(addr if kind == "cluster" else f"{addr} ({kind})")
                if kind == "cluster":
                    st.internal_chain = rule.target
                    cluster_dst[st.name] = (_cond(rule, "dst"), int(_cond(rule, "dport") or 0))
                elif not st.external_chain:
                    st.external_chain = rule.target.replace(C.FW_PREFIX, C.EXT_PREFIX, 1)
    for rule in rs.rules("nat", C.NODEPORTS):
        name = service_name(rule.comment)
        if not name:
            continue
        st = get(name)
        st.protocol = st.protocol or _cond(rule, "proto").upper()
        st.add_address(f"nodePort {_cond(rule, 'dport')}")
        st.external_chain = st.external_chain or rule.target
    for chain in (C.SERVICES, C.EXTERNAL_SERVICES, C.PROXY_FIREWALL):
        for rule in rs.rules("filter", chain):
            if rule.target not in ("REJECT", "DROP"):
                continue
            name = service_name(rule.comment)
            if not name:
                continue
            st = get(name)
            st.protocol = st.protocol or _cond(rule, "proto").upper()
            if rule.comment.endswith(" has no endpoints"):
                st.verdicts.add(f"{rule.target} (no endpoints)")
            elif rule.comment.endswith(" has no local endpoints"):
                st.verdicts.add(f"{rule.target} (no local endpoints)")
            else:
                continue  # the source-range firewall: part of normal operation
            dst = _cond(rule, "dst")
            dport = _cond(rule, "dport")
            if dst and chain == C.SERVICES:
                st.add_address(_hostport(dst, dport))
            elif not dst:
                st.add_address(f"nodePort {dport}")

    for st in ports.values():
        vip, port = cluster_dst.get(st.name, ("0.0.0.0", 0))
        unspecified = "::" if ":" in vip else "0.0.0.0"
        packet = T.Packet(unspecified, vip, port, st.protocol.lower() or "tcp")
        if st.internal_chain:
            st.internal, leak = _walk_backends(rs, st, st.internal_chain, packet)
            st.leak = max(st.leak, leak)
        if st.external_chain:
            ext, leak = _walk_backends(rs, st, st.external_chain, packet)
            st.external = ext
            st.leak = max(st.leak, leak)
    return ports


def service_chains(rs: T.Ruleset) -> set[str]:
    return {name for name in rs.chains("nat") if C.is_service_chain(name)}


# -- comparing ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Row:
    name: str
    protocol: str
    addresses: list[str]
    backends: dict[str, float]
    external: dict[str, float] | None
    expected: list[str]
    verdicts: list[str]
    packets: int
    endpoint_packets: dict[str, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _diff(label: str, want: Iterable[str], have: Iterable[str]) -> list[str]:
    want_s, have_s = set(want), set(have)
    out = [f"{label} {x} is not programmed" for x in sorted(want_s - have_s)]
    out += [f"{label} {x} is programmed but not wanted" for x in sorted(have_s - want_s)]
    return out


def _uneven(shares: Mapping[str, float]) -> list[str]:
    if not shares:
        return []
    even = 1.0 / len(shares)
    return [
        f"endpoint {ep} gets {share * 100:.1f}% of new connections, not {even * 100:.1f}%"
        for ep, share in sorted(shares.items())
        if abs(share - even) > EVEN_TOLERANCE
    ]


def compare(
    desired: Mapping[str, PortState],
    observed: Mapping[str, PortState],
) -> list[Row]:
    """One row per service port (wanted or programmed) with its problems."""
    rows: list[Row] = []
    for name in sorted(set(desired) | set(observed)):
        want = desired.get(name)
        have = observed.get(name)
        base = have or want
        assert base is not None
        row = Row(
            name=name,
            protocol=base.protocol,
            addresses=list(have.addresses) if have else [],
            backends=dict(have.internal) if have else {},
            external=dict(have.external) if have and have.external is not None else None,
            expected=sorted(want.internal) if want else [],
            verdicts=sorted(have.verdicts) if have else [],
            packets=have.packets if have else 0,
            endpoint_packets=dict(have.endpoint_packets) if have else {},
        )
        if want is None:
            row.problems.append("programmed, but no such service port is wanted (stale)")
        elif have is None:
            row.problems.append("wanted, but not programmed at all")
        else:
            p = row.problems
            p += _diff("address", want.addresses, have.addresses)
            p += _diff("endpoint", want.internal, have.internal)
            if want.external is not None or have.external is not None:
                p += _diff("external-traffic endpoint", want.external or {}, have.external or {})
            p += _diff("verdict", want.verdicts, have.verdicts)
            p += [
                f"chain {c} has no DNAT rule (flushed by hand?)" for c in sorted(have.empty_chains)
            ]
            if have.leak > LEAK_TOLERANCE:
                p.append(f"{have.leak * 100:.1f}% of new connections reach no DNAT rule")
            if set(want.internal) == set(have.internal):
                p += _uneven(have.internal)
        rows.append(row)
    return rows


# -- IPVS --------------------------------------------------------------------------------------
def ipvs_rows(desired: Mapping[Any, Any], listing: str) -> list[Row]:
    """Rows for IPVS mode: desired virtual servers (kproxy.render.ipvs.VirtualServer by key)
    against `ipvsadm -Ln`."""
    from kproxy.inspect.ipvsadm import parse_listing

    observed = {(v.address, v.protocol, v.port): v for v in parse_listing(listing)}
    wanted = {(k.address, k.protocol, k.port): vs for k, vs in desired.items()}
    rows: list[Row] = []
    for key in sorted(set(wanted) | set(observed)):
        vs = wanted.get(key)
        have = observed.get(key)
        address = f"[{key[0]}]:{key[2]}" if ":" in key[0] else f"{key[0]}:{key[2]}"
        want_dests = sorted(d.hostport for d in vs.dests) if vs is not None else []
        have_dests = {r.hostport: r for r in have.reals} if have else {}
        total_w = sum(r.weight for r in have_dests.values()) or 1
        row = Row(
            name=(vs.service if vs is not None else "") or "(unknown)",
            protocol=key[1],
            addresses=[address],
            backends={hp: r.weight / total_w for hp, r in have_dests.items()},
            external=None,
            expected=want_dests,
            verdicts=[],
            packets=sum(r.active + r.inactive for r in have_dests.values()),
            endpoint_packets={hp: r.active + r.inactive for hp, r in have_dests.items()},
        )
        if vs is None:
            row.problems.append("virtual server programmed but not wanted (stale)")
        elif have is None:
            row.problems.append("virtual server wanted but not programmed")
        else:
            # a real server kproxy no longer wants stays at weight 0 until its connections are
            # gone (graceful termination): shown as draining, not a mismatch
            draining = {
                hp: r for hp, r in have_dests.items() if hp not in want_dests and r.weight == 0
            }
            row.verdicts += [
                f"draining {hp} (weight 0, {r.active} active / {r.inactive} inactive)"
                for hp, r in sorted(draining.items())
            ]
            row.problems += _diff(
                "real server", want_dests, [hp for hp in have_dests if hp not in draining]
            )
            if have.scheduler != vs.scheduler:
                row.problems.append(f"scheduler {have.scheduler}, wanted {vs.scheduler}")
            want_persist = vs.timeout if vs.persistent else None
            if have.persistent != want_persist:
                row.problems.append(f"persistence {have.persistent}, wanted {want_persist}")
        rows.append(row)
    return rows


# -- output ------------------------------------------------------------------------------------
def render_table(
    rows: list[Row], *, stale_chains: Iterable[str] = (), counter: str = "PKTS"
) -> str:
    header = ("SERVICE", "PROTO", "ADDRESSES", "BACKENDS", counter, "STATE")
    lines: list[tuple[str, ...]] = [header]
    for r in rows:
        if r.backends:
            backends = " ".join(sorted(r.backends))
            if r.verdicts:
                backends += " (" + ", ".join(r.verdicts) + ")"
        elif r.verdicts:
            backends = "(none: " + ", ".join(r.verdicts) + ")"
        else:
            backends = "(none)"
        if r.external is not None and set(r.external) != set(r.backends):
            backends += " | external: " + (" ".join(sorted(r.external)) or "(none)")
        lines.append(
            (
                r.name,
                r.protocol,
                " ".join(r.addresses) or "-",
                backends,
                str(r.packets),
                "ok" if r.ok else "MISMATCH",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    problems = [(r.name, p) for r in rows for p in r.problems]
    stale = sorted(stale_chains)
    if problems or stale:
        out.append("")
    out.extend(f"MISMATCH {name}: {p}" for name, p in problems)
    out.extend(f"MISMATCH stale chain {c}: no wanted service uses it" for c in stale)
    bad = sum(1 for r in rows if not r.ok) + len(stale)
    out.append("")
    if bad:
        out.append(f"{bad} mismatch{'es' if bad != 1 else ''} in {len(rows)} service ports")
    else:
        out.append(f"all {len(rows)} service ports programmed as wanted")
    return "\n".join(out) + "\n"


def to_json(
    rows: list[Row], *, mode: str, rules_from: str, stale_chains: Iterable[str] = ()
) -> dict[str, Any]:
    stale = sorted(stale_chains)
    return {
        "mode": mode,
        "rules_from": rules_from,
        "ok": all(r.ok for r in rows) and not stale,
        "services": [
            {
                "service": r.name,
                "protocol": r.protocol,
                "addresses": r.addresses,
                "backends": [
                    {"endpoint": ep, "share": share, "packets": r.endpoint_packets.get(ep, 0)}
                    for ep, share in sorted(r.backends.items())
                ],
                "external_backends": sorted(r.external) if r.external is not None else None,
                "expected_backends": r.expected,
                "verdicts": r.verdicts,
                "packets": r.packets,
                "state": "ok" if r.ok else "mismatch",
                "problems": r.problems,
            }
            for r in rows
        ],
        "stale_chains": stale,
    }


# -- the command -------------------------------------------------------------------------------
def _families(snapshot: Any) -> list[int]:
    fams = {4}
    for svc in snapshot.services.values():
        fams.update(6 if ":" in ip else 4 for ip in svc.cluster_ips)
    return sorted(fams)


def status_command(wanted: Wanted, *, output: str = "table") -> int:
    from kproxy.backends.netinfo import with_node_addresses
    from kproxy.config import base_options, node_name
    from kproxy.errors import KubeConfigError
    from kproxy.inspect import live
    from kproxy.inspect.wanted import snapshot_of
    from kproxy.model.view import build_views

    settings = wanted.settings
    if settings.proxy_mode == "userspace":
        from kproxy.inspect import userspace

        return userspace.status_command(wanted, output=output)
    try:
        snapshot = snapshot_of(wanted)
    except KubeConfigError as err:
        print(f"kproxy status: cannot read the wanted state: {err}", file=sys.stderr)
        return 2
    node = node_name(settings)
    if settings.proxy_mode == "nftables":
        from kproxy.inspect.nftstatus import nft_status

        per_family = {}
        for family in _families(snapshot):
            opts = with_node_addresses(base_options(settings, family=family, node_name=node))
            per_family[family] = (build_views(snapshot, family=family, node_name=node), opts)
        from kproxy.inspect.rejections import agent_rejections

        return nft_status(per_family, output=output, rejected=agent_rejections(wanted))
    ipvs = settings.proxy_mode == "ipvs" or live.ipvs_present()
    rows: list[Row] = []
    stale: set[str] = set()
    sources: list[str] = []
    wanted_servers: dict[Any, Any] = {}
    for family in _families(snapshot):
        options = with_node_addresses(base_options(settings, family=family, node_name=node))
        views = build_views(snapshot, family=family, node_name=node)
        if ipvs:
            from kproxy.backends.ipvs import node_options
            from kproxy.backends.ipvs_device import address_map
            from kproxy.render.ipvs import render_desired

            # the node's addresses as the proxier sees them (not the VIPs on kube-ipvs0)
            _bound, options = node_options(options, address_map(family))
            desired = render_desired(views, options, scheduler=settings.ipvs_scheduler)
            wanted_servers.update(desired.servers)
            continue
        from kproxy.render.iptables import render_ruleset

        try:
            live_rules = live.read_rules(family)
        except live.ReadError as err:
            print(f"kproxy status: cannot read the rules: {err}", file=sys.stderr)
            return 2
        desired_rs = T.parse_save(render_ruleset(views, options))
        observed = read_ports(live_rules.ruleset)
        rows += compare(read_ports(desired_rs), observed)
        stale |= service_chains(live_rules.ruleset) - service_chains(desired_rs)
        sources.append(f"{live_rules.binary} -c")
    if ipvs:
        listing = live.ipvsadm_list()
        if listing is None:
            print("kproxy status: cannot run ipvsadm -Ln (no ipvsadm, or no IPVS)", file=sys.stderr)
            return 2
        rows = ipvs_rows(wanted_servers, listing)
        sources.append("ipvsadm -Ln")
    mode = "ipvs" if ipvs else "iptables"
    unbound = (wanted.agent or {}).get("unbound") or {}
    from kproxy.inspect.rejections import agent_rejections, render_rejections

    rejected = agent_rejections(wanted)
    lb = fetch_lb_report(settings)
    if output == "json":
        doc = to_json(rows, mode=mode, rules_from=", ".join(sources), stale_chains=stale)
        doc["rejected"] = rejected
        doc["wanted_from"] = wanted.origin
        if wanted.agent is not None:
            doc["agent"] = {k: wanted.agent.get(k) for k in AGENT_FIELDS}
        doc["loadBalancers"] = lb
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(
            render_table(rows, stale_chains=stale, counter="CONNS" if ipvs else "PKTS")
        )
        sys.stdout.write(f"wanted state from {wanted.origin}\n")
        for name, why in sorted(unbound.items()):
            sys.stdout.write(f"note: the agent does not listen on {name} yet: {why}\n")
        sys.stdout.write(render_rejections(rejected))
        if lb is not None:
            sys.stdout.write(render_lb(lb))
    return 0 if all(r.ok for r in rows) and not stale and not rejected else 1
