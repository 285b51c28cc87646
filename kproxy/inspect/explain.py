"""`kproxy explain IP:PORT[/PROTO] [--from SRC]`: how the first packet of a connection travels
through kproxy's live rules, told for people (text) or scripts (json).

The rules are read back from the kernel (`iptables-save -c` of the flavour in use, ip6tables for
IPv6), never from kproxy's own idea of them, so the explanation shows what the kernel will do,
including damage done by hand. The packet enters at nat PREROUTING when SRC is not an address of
this node (another host, a pod) and at nat OUTPUT when it is (or when no SRC is given: then the
source is the one the kernel would choose). In IPVS mode the companion iptables rules are traced
the same way and the virtual server and its real servers come from `ipvsadm -Ln`.

`explain_packet` (pure) builds an `Explanation` from a parsed ruleset; `render_text` and
`to_json` present it; `explain_command` does the reads.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kproxy.config import Settings
from kproxy.errors import InputError
from kproxy.inspect import iptrace as T
from kproxy.inspect.ipvsadm import SCHEDULER_TEXT, VirtualService, find, parse_listing
from kproxy.render import chains as C

if TYPE_CHECKING:
    from kproxy.inspect.wanted import Wanted

PROTOCOLS = ("tcp", "udp", "sctp")
_NAME_SUFFIXES = (
    " cluster IP",
    " external IP",
    " loadbalancer IP",
    " has no endpoints",
    " has no local endpoints",
    " health check node port",
)


class TargetError(InputError):
    """The IP:PORT[/PROTO] argument cannot be read."""


def parse_target(text: str) -> tuple[str, int, str]:
    """'10.96.0.10:53/udp', '[fd00::10]:443', '10.96.0.1:443' -> (ip, port, protocol)."""
    spec, _, proto = text.strip().partition("/")
    proto = (proto or "tcp").lower()
    if proto not in PROTOCOLS:
        raise TargetError(f"unknown protocol {proto!r} (use tcp, udp or sctp)")
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = spec.rpartition(":")
        if ":" in host:  # fd00::1:80 is ambiguous
            raise TargetError(f"{text!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    if not host or not port_text:
        raise TargetError(f"{text!r} is not IP:PORT[/PROTO] (IPv6: [ADDR]:PORT)")
    try:
        ip = str(ipaddress.ip_address(host))
        port = int(port_text)
    except ValueError as err:
        raise TargetError(f"{text!r}: {err}") from None
    if not 0 < port < 65536:
        raise TargetError(f"port {port} is out of range")
    return ip, port, proto


# -- the explanation ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IPVSView:
    """The IPVS side of a packet in IPVS mode."""

    service: VirtualService | None
    listing_read: bool
    # real server hostport -> masqueraded on the way out (nat POSTROUTING with the packet's mark)
    masquerade: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Explanation:
    packet: T.Packet
    hook: str
    hook_reason: str
    rules_from: str
    mode: str
    outcomes: tuple[T.Outcome, ...]
    result: str  # dnat, ipvs, rejected, dropped, not-a-service, untranslated, mixed
    service: str
    hints: tuple[str, ...] = ()
    affinity: dict[str, int] = field(default_factory=dict)  # recent list -> seconds
    ipvs: IPVSView | None = None
    empty_chains: frozenset[str] = frozenset()  # user chains without rules (jumps come back)
    # what the wanted state says about the destination (None: no wanted state was read)
    wanted: dict[str, Any] | None = None


def service_name(comment: str) -> str:
    """kube-proxy's "ns/svc:port" out of a rule comment ("" when the comment has none)."""
    for suffix in _NAME_SUFFIXES:
        if comment.endswith(suffix):
            return comment[: -len(suffix)]
    if " traffic not accepted by " in comment:
        return comment.split(" traffic not accepted by ", 1)[0]
    if comment.startswith("masquerade traffic for ") and comment.endswith(" destinations"):
        return comment[len("masquerade traffic for ") :].split(" external", 1)[0]
    if "/" in comment and " " not in comment:
        return comment
    return ""


def _service_of(outcomes: Sequence[T.Outcome]) -> str:
    for o in outcomes:
        for step in o.steps:
            r = step.rule
            if r is None or not step.taken:
                continue
            if C.is_service_chain(r.target) or r.target in ("REJECT", "DROP"):
                name = service_name(r.comment)
                if name:
                    return name
    return ""


def _touches_services(o: T.Outcome) -> bool:
    return any(C.is_service_chain(s.chain) for s in o.steps)


def classify(o: T.Outcome, *, ipvs: bool = False) -> str:
    if o.verdict == "reject":
        return "rejected"
    if o.verdict == "drop":
        return "dropped"
    if o.dnat:
        return "dnat"
    if ipvs and o.local_delivery:
        return "ipvs"
    if _touches_services(o):
        return "untranslated"
    return "not-a-service"


def _hints(rs: T.Ruleset, packet: T.Packet, *, local: bool) -> tuple[str, ...]:
    """What the address is used for, when the port/protocol did not match any service."""
    out: list[str] = []
    ip = ipaddress.ip_address(packet.dst)
    for rule in rs.rules("nat", C.SERVICES):
        dst = next((c for c in rule.conditions if c.kind == "dst" and not c.negate), None)
        if dst is None or dst.net is None or ip not in dst.net or dst.net.prefixlen == 0:
            continue
        port = next((c.args[0] for c in rule.conditions if c.kind == "dport"), "?")
        proto = next((c.args[0] for c in rule.conditions if c.kind == "proto"), "?")
        what = rule.comment.rsplit(" ", 2)
        kind = " ".join(what[-2:]) if len(what) >= 3 else "address"
        out.append(f"{packet.dst} is the {kind} of {service_name(rule.comment)} on {port}/{proto}")
    if local:
        ports = [
            f"{next((c.args[0] for c in r.conditions if c.kind == 'dport'), '?')}/"
            f"{next((c.args[0] for c in r.conditions if c.kind == 'proto'), '?')} "
            f"({service_name(r.comment) or r.comment})"
            for r in rs.rules("nat", C.NODEPORTS)
        ]
        if ports:
            out.append(f"{packet.dst} is this node: its NodePorts are " + ", ".join(ports))
    return tuple(out)


def explain_packet(
    rs: T.Ruleset,
    packet: T.Packet,
    *,
    hook: str,
    env: T.Environment,
    hook_reason: str = "",
    rules_from: str = "",
    mode: str = "iptables",
    ipvs_listing: str | None = None,
) -> Explanation:
    """Trace `packet` through `rs` and say what happened (pure)."""
    outcomes = T.trace_packet(rs, packet, hook=hook, env=env)
    is_ipvs = mode == "ipvs"
    kinds = {classify(o, ipvs=is_ipvs) for o in outcomes}
    result = kinds.pop() if len(kinds) == 1 else "mixed"
    affinity = {}
    for o in outcomes:
        for name in o.recent_set:
            secs = rs.recent_seconds(name)
            if secs:
                affinity[name] = secs
    hints: tuple[str, ...] = ()
    if result in ("not-a-service", "ipvs") or (result == "untranslated" and not is_ipvs):
        hints = _hints(rs, packet, local=env.is_local(packet.dst))
    view = None
    if is_ipvs:
        listing = parse_listing(ipvs_listing) if ipvs_listing is not None else []
        vs = find(listing, protocol=packet.proto, address=packet.dst, port=packet.dport)
        masq: dict[str, bool] = {}
        if vs is not None:
            accepted = [o for o in outcomes if o.verdict == "accept"]
            for real in vs.reals:
                to_real = T.Packet(packet.src, real.address, real.port, packet.proto)
                walks = [
                    w
                    for o in accepted
                    for w in T.walk(rs, "nat", "POSTROUTING", to_real, env=env, mark=o.mark)
                ]
                masq[real.hostport] = any(w.verdict in ("MASQUERADE", "SNAT") for w in walks)
        view = IPVSView(vs, ipvs_listing is not None, masq)
        if vs is None and result == "ipvs":
            result = "not-a-service"
    return Explanation(
        packet=packet,
        hook=hook,
        hook_reason=hook_reason,
        rules_from=rules_from,
        mode=mode,
        outcomes=outcomes,
        result=result,
        service=_service_of(outcomes),
        hints=hints,
        affinity=affinity,
        ipvs=view,
        empty_chains=frozenset(
            name for t in ("nat", "filter") for name, ch in rs.chains(t).items() if not ch.lines
        ),
    )


# -- why ---------------------------------------------------------------------------------------
def masquerade_reason(o: T.Outcome) -> str:
    """Why the packet is (or is not) masqueraded, in a sentence."""
    if not o.masquerade:
        if o.local_delivery:
            return "no: the packet is delivered to this node, no source NAT happens"
        if any(s.chain.startswith(C.SVL_PREFIX) for s in o.steps):
            return (
                f"no: the endpoint sees the real client address {o.after.src} "
                "(traffic policy Local sends only to endpoints on this node, so no SNAT is needed)"
            )
        return f"no: the endpoint sees the real client address {o.after.src}"
    by = o.mark_by
    rule = by.rule if by is not None else None
    if rule is None:
        masq = o.masquerade_rule
        how = f" ({masq.chain} #{masq.index})" if masq is not None else ""
        return f"yes{how}"
    where = f"({rule.chain} #{rule.index} -> {rule.target})"
    chain = rule.chain
    negated_src = any(c.kind == "src" and c.negate for c in rule.conditions)
    src_local = any(c.kind == "addrtype" and c.args[0] == "src" for c in rule.conditions)
    if chain.startswith(C.SEP_PREFIX):
        why = (
            "hairpin: the packet comes from the very endpoint it is sent to; without SNAT the "
            "pod would answer itself directly and the reply would not match the connection"
        )
    elif chain.startswith(C.EXT_PREFIX) and src_local:
        why = "traffic from this node to an external address of the service"
    elif chain.startswith(C.EXT_PREFIX):
        why = (
            "external traffic (NodePort, load balancer or external IP) with "
            "externalTrafficPolicy Cluster: the endpoint may be on another node, so the reply "
            "must come back through this node to be un-NATed"
        )
    elif (chain.startswith((C.SVC_PREFIX, C.SVL_PREFIX)) and negated_src) or (
        rule.target == C.MASQ_OFF_CLUSTER
    ):
        why = (
            "the source is outside the cluster CIDR (the node itself or an off-cluster host), "
            "so the reply must come back through this node"
        )
    elif chain.startswith((C.SVC_PREFIX, C.SVL_PREFIX)):
        why = "masqueradeAll is on: every service packet is masqueraded"
    else:
        why = f"marked by {rule.comment or 'a rule'}"
    return f"yes, {why} {where}"


# -- text --------------------------------------------------------------------------------------
def _pct(p: float) -> str:
    text = f"{p * 100:.1f}"
    return f"{text.rstrip('0').rstrip('.') if text.endswith('.0') else text}%"


def _stages(o: T.Outcome) -> list[tuple[str, tuple[T.Step, ...]]]:
    """The outcome's steps cut into (stage title, steps) in the order the packet met them."""
    first_nat = f"nat {o.hook}"
    where = {
        "INPUT": " (the destination is this node: delivered locally)",
        "FORWARD": " (the destination is not this node: forwarded)",
        "OUTPUT": "",
    }[o.filter_chain]
    titles = {0: first_nat, 1: f"filter {o.filter_chain}{where}", 2: "nat POSTROUTING"}
    out: list[list[T.Step]] = [[], [], []]
    stage = 0
    for s in o.steps:
        if s.table == "filter":
            stage = 1
        elif stage == 1 or (stage == 0 and s.chain == "POSTROUTING" and o.hook != "POSTROUTING"):
            stage = 2
        out[stage].append(s)
    return [(titles[i], tuple(steps)) for i, steps in enumerate(out) if steps]


def _step_key(s: T.Step) -> tuple[str, str, int, bool, str]:
    return (s.table, s.chain, s.index, s.taken, s.policy)


def _step_line(s: T.Step, nxt: T.Step | None, empty: frozenset[str] = frozenset()) -> str:
    if s.rule is None:
        return f"{s.chain}: end of chain, policy {s.policy}"
    r = s.rule
    head = f"{s.chain} #{r.index}"
    if not s.taken:
        assert s.probability is not None
        return f"{head} random {_pct(s.probability)}: not chosen ({_pct(1 - s.probability)} go on)"
    desc = T.describe_rule(r)
    chance = f" random {_pct(s.probability)}" if s.probability is not None else ""
    line = f"{head} {desc}{chance} {T.describe_target(r)}".replace("  ", " ")
    if r.target and r.target not in T.TERMINAL and r.target not in ("RETURN", "MARK"):
        entered = nxt is not None and nxt.chain == r.target and nxt.table == s.table
        if r.target in empty and C.is_service_chain(r.target):
            line += " (an empty chain: the packet comes back and goes on)"
        elif not entered and not r.goto:
            line += " (nothing there matched)"
    if r.target == "DNAT" and r.pkts is not None:
        line += f"  [new connections so far: {r.pkts}]"
    return line


def _print_stage(
    out: list[str],
    title: str,
    paths: list[tuple[float, tuple[T.Step, ...]]],
    empty: frozenset[str],
) -> None:
    out.append(title)
    keys = [[_step_key(s) for s in steps] for _, steps in paths]
    n = 0
    while all(len(k) > n for k in keys) and len({tuple(k[n]) for k in keys}) == 1:
        n += 1
    first = paths[0][1]
    for i in range(n):
        nxt = first[i + 1] if i + 1 < len(first) else None
        out.append("  " + _step_line(first[i], nxt, empty))
    tails: dict[tuple[Any, ...], tuple[float, tuple[T.Step, ...]]] = {}
    for prob, steps in paths:
        key = tuple(_step_key(s) for s in steps[n:])
        old = tails.get(key)
        tails[key] = (prob + (old[0] if old else 0.0), steps)
    if len(tails) == 1 and not next(iter(tails)):
        return
    if len(tails) > 1:
        out.append(f"  then one of {len(tails)} ways:")
    for k, (prob, steps) in enumerate(tails.values(), start=1):
        indent = "      " if len(tails) > 1 else "  "
        if len(tails) > 1:
            out.append(f"  [{k}] {_pct(prob)}")
        for i in range(n, len(steps)):
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            out.append(indent + _step_line(steps[i], nxt, empty))


def _describe_real(vs: VirtualService, view: IPVSView) -> list[str]:
    out = []
    sched = SCHEDULER_TEXT.get(vs.scheduler, vs.scheduler)
    flags = f" ({','.join(vs.flags)})" if vs.flags else ""
    out.append(f"  virtual server {vs.protocol} {vs.hostport}, scheduler {vs.scheduler}{flags}")
    out.append(f"    {sched}")
    if vs.persistent:
        out.append(
            f"    persistent {vs.persistent}s: a client keeps its real server while it keeps "
            f"connecting within {vs.persistent}s"
        )
    shares = vs.shares()
    if not vs.reals:
        out.append("    no real servers: new connections are refused")
    for r in vs.reals:
        share = f"{_pct(shares[r.hostport])} of new connections, " if shares else ""
        masq = view.masquerade.get(r.hostport)
        mq = "" if masq is None else ("masqueraded" if masq else "source kept")
        out.append(
            f"    -> {r.hostport}  {r.forward} weight {r.weight} ({share}{r.active} active, "
            f"{r.inactive} inactive connections) {mq}".rstrip()
        )
    return out


def render_text(ex: Explanation) -> str:
    p = ex.packet
    out: list[str] = []
    host = f"[{p.dst}]" if ":" in p.dst else p.dst
    out.append(
        f"Packet:  {p.proto} {p.src} -> {host}:{p.dport}, the first packet of a new connection"
    )
    out.append(
        f"Enters:  nat {ex.hook}: {ex.hook_reason}" if ex.hook_reason else f"Enters: {ex.hook}"
    )
    if ex.rules_from:
        out.append(f"Rules:   {ex.rules_from} ({ex.mode} mode)")
    if ex.service:
        out.append(f"Service: {ex.service}")
    if ex.wanted is not None:
        w = ex.wanted
        if w["service"] is None:
            out.append(f"Wanted:  no service port owns this address ({w['from']})")
        else:
            eps = ", ".join(w["endpoints"]) or "no endpoints"
            out.append(f"Wanted:  {w['service']} ({w['kind']}) -> {eps} ({w['from']})")
    out.append("")
    if not ex.outcomes:
        out.append("(nothing to trace: the ruleset is empty)")
        return "\n".join(out) + "\n"

    # the stages, each with the paths through it
    staged = [_stages(o) for o in ex.outcomes]
    titles: list[str] = []
    for stages in staged:
        for title, _ in stages:
            if title not in titles:
                titles.append(title)
    for title in titles:
        paths = [
            (o.probability, steps)
            for o, stages in zip(ex.outcomes, staged, strict=True)
            for t, steps in stages
            if t == title
        ]
        _print_stage(out, title, paths, ex.empty_chains)
    out.append("")

    out.append("Result:")
    result_lines = {
        "not-a-service": "not a service address: kproxy does not touch this packet",
        "untranslated": "no DNAT: the packet went through service chains but no endpoint "
        "rule translated it (rules damaged or out of date?)",
    }
    if ex.result in result_lines:
        out.append(f"  {result_lines[ex.result]}")
    for hint in ex.hints:
        out.append(f"  note: {hint}")
    grouped: dict[tuple[str, str, str, bool], float] = {}
    for o in ex.outcomes:
        rule = o.verdict_rule
        why = rule.comment if rule is not None and o.verdict != "accept" else ""
        key = (o.verdict, o.dnat, why, o.masquerade)
        grouped[key] = grouped.get(key, 0.0) + o.probability
    for (verdict, dnat, why, _), prob in grouped.items():
        share = f"{_pct(prob):>6}  " if len(grouped) > 1 or prob < 0.999999 else ""
        if verdict == "reject":
            out.append(f"  {share}rejected: {why or 'REJECT'} (the client gets a port-unreachable)")
        elif verdict == "drop":
            out.append(f"  {share}dropped: {why or 'DROP'} (the client times out)")
        elif dnat:
            out.append(f"  {share}DNAT to {dnat}")
        elif ex.result == "ipvs":
            out.append(f"  {share}accepted for IPVS (it translates in INPUT)")
        elif ex.result not in result_lines:
            out.append(f"  {share}passed untranslated")
    reasons = dict.fromkeys(
        masquerade_reason(o)
        for o in ex.outcomes
        if o.verdict == "accept" and (o.dnat or o.masquerade)
    )
    for reason in reasons:
        out.append(f"  masquerade: {reason}")
    for name, secs in ex.affinity.items():
        out.append(
            f"  affinity: sticky for {secs}s once chosen (recent list {name} remembers "
            f"{p.src}; its next connections within {secs}s go to the same endpoint)"
        )
    pinned = {n for o in ex.outcomes for n in o.pinned}
    if pinned:
        out.append(f"  affinity: {p.src} is already remembered ({', '.join(sorted(pinned))})")
    if ex.ipvs is not None:
        out.append("")
        out.append("IPVS:")
        if not ex.ipvs.listing_read:
            out.append("  ipvsadm -Ln could not be read (ipvsadm missing or no IPVS here)")
        elif ex.ipvs.service is None:
            out.append(f"  no virtual server for {p.proto.upper()} {host}:{p.dport}")
        else:
            out.extend(_describe_real(ex.ipvs.service, ex.ipvs))
    if any(o.dnat for o in ex.outcomes):
        out.append(
            f"  replies: conntrack reverses the translation; {p.src} sees {host}:{p.dport} answer"
        )
    notes = dict.fromkeys(n for o in ex.outcomes for n in o.notes)
    for note in notes:
        out.append(f"  caveat: {note}")
    return "\n".join(out) + "\n"


# -- json --------------------------------------------------------------------------------------
def _step_json(s: T.Step) -> dict[str, Any]:
    r = s.rule
    return {
        "table": s.table,
        "chain": s.chain,
        "index": s.index,
        "rule": f"-A {s.chain} {r.text}" if r else None,
        "comment": r.comment if r else "",
        "target": r.target if r else s.policy,
        "taken": s.taken,
        "probability": s.probability,
        "packets": r.pkts if r else None,
    }


def to_json(ex: Explanation) -> dict[str, Any]:
    p = ex.packet
    targets: dict[str, float] = {}
    for o in ex.outcomes:
        if o.dnat:
            targets[o.dnat] = targets.get(o.dnat, 0.0) + o.probability
    ipvs: dict[str, Any] | None = None
    if ex.ipvs is not None:
        vs = ex.ipvs.service
        ipvs = {
            "listing_read": ex.ipvs.listing_read,
            "virtual_server": None
            if vs is None
            else {
                "protocol": vs.protocol,
                "address": vs.address,
                "port": vs.port,
                "scheduler": vs.scheduler,
                "flags": list(vs.flags),
                "persistent": vs.persistent,
                "shares": vs.shares(),
                "real_servers": [
                    {
                        "address": r.address,
                        "port": r.port,
                        "forward": r.forward,
                        "weight": r.weight,
                        "active": r.active,
                        "inactive": r.inactive,
                        "masquerade": ex.ipvs.masquerade.get(r.hostport),
                    }
                    for r in vs.reals
                ],
            },
        }
    return {
        "packet": {"src": p.src, "dst": p.dst, "dport": p.dport, "proto": p.proto},
        "hook": ex.hook,
        "hook_reason": ex.hook_reason,
        "rules_from": ex.rules_from,
        "mode": ex.mode,
        "service": ex.service or None,
        "result": ex.result,
        "targets": [{"endpoint": k, "probability": v} for k, v in targets.items()],
        "affinity": ex.affinity,
        "hints": list(ex.hints),
        "wanted": ex.wanted,
        "outcomes": [
            {
                "probability": o.probability,
                "verdict": o.verdict,
                "result": classify(o, ipvs=ex.mode == "ipvs"),
                "verdict_rule": _step_json(
                    T.Step(o.verdict_rule.table, o.verdict_rule.chain, o.verdict_rule)
                )
                if o.verdict_rule is not None
                else None,
                "dnat": o.dnat or None,
                "filter_chain": o.filter_chain,
                "local_delivery": o.local_delivery,
                "masquerade": o.masquerade,
                "masquerade_reason": masquerade_reason(o),
                "pinned": list(o.pinned),
                "remembered_in": list(o.recent_set),
                "steps": [_step_json(s) for s in o.steps],
                "notes": list(o.notes),
            }
            for o in ex.outcomes
        ],
        "ipvs": ipvs,
    }


# -- against the wanted state --------------------------------------------------------------------
def kernel_endpoints(ex: Explanation) -> set[str]:
    """The endpoints the kernel sends this packet to: DNAT targets, or in IPVS mode the real
    servers that take new connections."""
    if ex.ipvs is not None:
        vs = ex.ipvs.service
        return {r.hostport for r in vs.reals if r.weight > 0} if vs is not None else set()
    return {o.dnat for o in ex.outcomes if o.dnat}


def with_wanted(ex: Explanation, wanted: Wanted, *, local: frozenset[str]) -> Explanation:
    """`ex` with the wanted state's answer for its destination, and a caveat when the kernel
    sends the packet elsewhere."""
    from dataclasses import replace

    from kproxy.config import node_name
    from kproxy.inspect.wanted import snapshot_of, wanted_port

    p = ex.packet
    wp = wanted_port(
        snapshot_of(wanted),
        node_name=node_name(wanted.settings),
        ip=p.dst,
        port=p.dport,
        protocol=p.proto,
        node_addresses=local,
    )
    doc: dict[str, Any] = {
        "from": wanted.origin,
        "service": wp.service if wp else None,
        "kind": wp.kind if wp else None,
        "endpoints": list(wp.endpoints) if wp else [],
    }
    have = kernel_endpoints(ex)
    want = set(wp.endpoints) if wp else set()
    if (have != want and ex.result != "not-a-service") or (wp and ex.result == "not-a-service"):
        doc["differs"] = True
        missing = ", ".join(sorted(want - have)) or "none"
        extra = ", ".join(sorted(have - want)) or "none"
        note = (
            f"the kernel differs from the wanted state (missing: {missing}; not wanted: "
            f"{extra}): kproxy has not synced yet, or the rules were changed by hand; "
            "`kproxy status` lists every difference"
        )
        ex = replace(ex, hints=(*ex.hints, note))
    else:
        doc["differs"] = False
    return replace(ex, wanted=doc)


# -- the command -------------------------------------------------------------------------------
def choose_hook(source: str, *, local: frozenset[str] | set[str]) -> tuple[str, str]:
    """PREROUTING for a source that is not an address of this node, else OUTPUT; with why."""
    canonical = str(ipaddress.ip_address(source))
    if canonical in local or ipaddress.ip_address(source).is_loopback:
        return T.OUTPUT, f"{source} is an address of this node, so a local process sends it"
    return T.PREROUTING, (
        f"{source} is not an address of this node, so the packet arrives from outside "
        "(another host or a pod)"
    )


def explain_command(
    settings: Settings,
    *,
    target: str,
    source: str = "",
    output: str = "text",
    wanted: Wanted | None = None,
) -> int:
    from kproxy.inspect import live

    try:
        ip, port, proto = parse_target(target)
        if source:
            source = str(ipaddress.ip_address(source))
    except (TargetError, ValueError) as err:
        print(f"kproxy explain: {err}", file=sys.stderr)
        return 2
    family = 6 if ":" in ip else 4
    if source and (6 if ":" in source else 4) != family:
        print("kproxy explain: --from and the target are of different IP families", file=sys.stderr)
        return 2
    try:
        rules = live.read_rules(family)
    except live.ReadError as err:
        print(f"kproxy explain: cannot read the rules: {err}", file=sys.stderr)
        return 2
    local = live.node_addresses(family)
    if source:
        hook, reason = choose_hook(source, local=local)
    else:
        picked = live.route_source(ip, port)
        source = picked or ("::1" if family == 6 else "127.0.0.1")
        hook = T.OUTPUT
        reason = f"no --from given: a process on this node sends it, from {source}" + (
            " (the address the kernel picks for this destination)"
            if picked
            else " (no route to the destination)"
        )
    if settings.proxy_mode == "userspace":
        from kproxy.inspect import userspace

        return userspace.explain_command(
            ip=ip, port=port, proto=proto, source=source, hook=hook, local=local, output=output
        )
    if settings.proxy_mode == "nftables":
        from kproxy.inspect.nftexplain import nft_explain

        return nft_explain(
            family=family,
            proto=proto,
            source=source,
            ip=ip,
            port=port,
            local=local,
            from_node=hook == T.OUTPUT,
            output=output,
        )
    mode = "ipvs" if settings.proxy_mode == "ipvs" or live.ipvs_present() else "iptables"
    sets = None
    listing = None
    if mode == "ipvs":
        saved = live.ipset_save()
        sets = T.parse_ipset_save(saved) if saved is not None else None
        listing = live.ipvsadm_list()
    env = T.Environment(local_addresses=local, sets=sets, recent=live.recent_lists())
    packet = T.Packet(source, ip, port, proto)
    ex = explain_packet(
        rules.ruleset,
        packet,
        hook=hook,
        env=env,
        hook_reason=reason,
        rules_from=f"{rules.binary} -c",
        mode=mode,
        ipvs_listing=listing,
    )
    if wanted is not None:
        ex = with_wanted(ex, wanted, local=local)
    if not rules.ruleset.chain("nat", C.SERVICES):
        print(
            f"kproxy explain: note: {rules.binary} shows no {C.SERVICES} chain: "
            "kproxy has not programmed this node (or runs in another network namespace)",
            file=sys.stderr,
        )
    if output == "json":
        json.dump(to_json(ex), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(ex))
    return 0
