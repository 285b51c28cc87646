"""A packet tracer for iptables rulesets: where does the first packet of a new connection go?

Pure and standard-library only. `parse_ruleset` reads iptables-save (or iptables-restore) text;
`trace` follows one packet through it the way the kernel's netfilter hooks would:

    PREROUTING-origin (from a pod or the network):  nat PREROUTING -> routing ->
        filter INPUT (destination is local) | filter FORWARD -> nat POSTROUTING
    OUTPUT-origin (from a process on the node):     nat OUTPUT -> filter OUTPUT -> nat POSTROUTING

and returns every possible outcome with its probability: DNAT to an endpoint, REJECT, DROP, or
ACCEPT (nothing translated it), whether it was masqueraded, and the rules that decided it.
A built-in chain's DROP policy applies when the packet falls off its end.
`statistic --mode random` rules split a trace into weighted branches, so a service with three
endpoints yields three outcomes of 1/3 each.

The tracer understands the vocabulary kproxy and kube-proxy write (-s/-d/-p with negation,
--dport/--dports/--sport, addrtype, comment, mark, statistic, recent, conntrack; targets DNAT,
MARK, MASQUERADE, SNAT, RETURN, ACCEPT, DROP, REJECT, jumps and gotos). A rule using anything
else (an interface match, another module) is treated as not matching and reported in the
outcome's notes, so foreign rules never silently change an answer. Chains are parsed lazily, so
tracing through a 10k-service ruleset only parses the chains the packet visits.

State the tracer cannot know is an input: the node's local addresses (for addrtype LOCAL; the
loopback ranges are always local) and which `recent` lists already hold the client (session
affinity; none by default, i.e. a first connection). When the text has no built-in chains (a
`kproxy render` output), kproxy's standard hook jumps are assumed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

from kproxy.render import chains as C

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PREROUTING = "PREROUTING"
OUTPUT = "OUTPUT"

DNAT = "DNAT"
ACCEPT = "ACCEPT"
DROP = "DROP"
REJECT = "REJECT"

_MAX_DEPTH = 64
_PROTO_NUMBERS = {"6": "tcp", "17": "udp", "132": "sctp", "1": "icmp", "58": "ipv6-icmp"}


class TraceError(ValueError):
    """The ruleset text cannot be parsed, or a trace loops."""


# -- parsing -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AddrMatch:
    negated: bool
    network: IPNetwork

    def matches(self, ip: IPAddress) -> bool:
        inside = ip.version == self.network.version and ip in self.network
        return inside != self.negated


@dataclass(frozen=True, slots=True)
class Rule:
    """One parsed rule. `text` is the line as written ("-A CHAIN ..."); `unsupported` lists the
    options the tracer cannot evaluate (the rule then never matches)."""

    chain: str
    index: int
    text: str
    source: AddrMatch | None = None
    destination: AddrMatch | None = None
    protocol: tuple[bool, str] | None = None
    dports: tuple[bool, tuple[tuple[int, int], ...]] | None = None
    sports: tuple[bool, tuple[tuple[int, int], ...]] | None = None
    src_type: tuple[bool, frozenset[str]] | None = None
    dst_type: tuple[bool, frozenset[str]] | None = None
    comment: str | None = None
    mark: tuple[bool, int, int] | None = None
    ctstate: tuple[bool, frozenset[str]] | None = None
    probability: float | None = None
    recent: tuple[bool, str, str] | None = None  # (negated, mode, list name)
    target: str | None = None
    goto: bool = False
    to_destination: str | None = None
    mark_op: tuple[str, int, int] | None = None  # ("or"|"xor"|"and"|"set", value, mask)
    unsupported: tuple[str, ...] = ()


_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


def _tokens(line: str) -> list[str]:
    return [q if q or b is None else b for q, b in _TOKEN.findall(line)]


@lru_cache(maxsize=4096)
def _network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=False)


def _ports(text: str) -> tuple[tuple[int, int], ...]:
    """ "80", "80:90", ":90", "80:" and comma lists of those -> inclusive ranges."""
    out = []
    for part in text.split(","):
        lo, sep, hi = part.partition(":")
        if not sep:
            out.append((int(lo), int(lo)))
        else:
            out.append((int(lo or 0), int(hi or 65535)))
    return tuple(out)


def _mark_value(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF


def parse_rule(chain: str, index: int, text: str) -> Rule:
    """Parse one "-A CHAIN ..." line (everything after the chain name is interpreted)."""
    toks = _tokens(text)
    fields: dict[str, object] = {}
    unsupported: list[str] = []
    negate = False
    i = 2  # skip "-A CHAIN"
    n = len(toks)

    def value() -> str:
        nonlocal i
        i += 1
        if i >= n:
            raise TraceError(f"option without a value in: {text}")
        return toks[i]

    while i < n:
        tok = toks[i]
        neg, negate = negate, False
        if tok == "!":
            negate = True
        elif tok in ("-s", "--source", "--src"):
            fields["source"] = AddrMatch(neg, _network(value()))
        elif tok in ("-d", "--destination", "--dst"):
            fields["destination"] = AddrMatch(neg, _network(value()))
        elif tok in ("-p", "--protocol"):
            proto = value().lower()
            fields["protocol"] = (neg, _PROTO_NUMBERS.get(proto, proto))
        elif tok in ("-m", "--match"):
            value()  # the module's options are recognised by name below
        elif tok in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            fields["dports"] = (neg, _ports(value()))
        elif tok in ("--sport", "--source-port", "--sports", "--source-ports"):
            fields["sports"] = (neg, _ports(value()))
        elif tok == "--comment":
            fields["comment"] = value()
        elif tok == "--src-type":
            fields["src_type"] = (neg, frozenset(value().split(",")))
        elif tok == "--dst-type":
            fields["dst_type"] = (neg, frozenset(value().split(",")))
        elif tok == "--mark":
            fields["mark"] = (neg, *_mark_value(value()))
        elif tok in ("--ctstate", "--state"):
            fields["ctstate"] = (neg, frozenset(value().split(",")))
        elif tok == "--mode":
            if value() != "random":
                unsupported.append("statistic mode other than random")
        elif tok == "--probability":
            fields["probability"] = float(value())
        elif tok in ("--rcheck", "--update", "--set", "--remove"):
            mode = tok[2:]
            old = fields.get("recent")
            name = old[2] if isinstance(old, tuple) else "DEFAULT"
            fields["recent"] = (neg, mode, name)
        elif tok == "--name":
            name = value()
            old = fields.get("recent")
            if isinstance(old, tuple):
                fields["recent"] = (old[0], old[1], name)
            else:
                fields["recent"] = (False, "", name)
        elif tok in ("--seconds", "--hitcount", "--mask"):
            value()  # affinity age/mask: the caller says which lists hold the client
        elif tok in ("--reap", "--rsource", "--rdest", "--rttl", "--random-fully", "--random"):
            pass
        elif tok in ("-j", "--jump", "-g", "--goto"):
            fields["target"] = value()
            fields["goto"] = tok in ("-g", "--goto")
        elif tok == "--to-destination":
            fields["to_destination"] = value()
        elif tok in ("--or-mark", "--xor-mark", "--and-mark"):
            fields["mark_op"] = (tok[2:-5], int(value(), 0), 0)
        elif tok in ("--set-xmark", "--set-mark"):
            v, m = _mark_value(value())
            fields["mark_op"] = ("xset" if tok == "--set-xmark" else "set", v, m)
        elif tok in ("--reject-with", "--to-source", "--to-ports", "--to", "--log-prefix"):
            value()
        elif tok == "-c":
            i += 2
        elif tok.startswith("[") and tok.endswith("]"):
            pass  # counters
        else:
            unsupported.append(tok)
            # skip the option's argument, if it has one
            if i + 1 < n and not toks[i + 1].startswith("-") and toks[i + 1] != "!":
                i += 1
        i += 1
    recent = fields.get("recent")
    if isinstance(recent, tuple) and recent[1] == "":
        unsupported.append("--name without a recent mode")
    return Rule(chain=chain, index=index, text=text, unsupported=tuple(unsupported), **fields)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Chain:
    builtin: bool
    lines: list[str] = field(default_factory=list)
    parsed: list[Rule] | None = None
    policy: str = "-"


class Ruleset:
    """The tables and chains of an iptables-save/restore text. Rules are parsed on first use."""

    def __init__(self, tables: Mapping[str, Mapping[str, _Chain]]) -> None:
        self._tables = {t: dict(chains) for t, chains in tables.items()}

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(self._tables)

    def chains(self, table: str) -> tuple[str, ...]:
        return tuple(self._tables.get(table, {}))

    def has_chain(self, table: str, chain: str) -> bool:
        return chain in self._tables.get(table, {})

    def policy(self, table: str, chain: str) -> str:
        """A built-in chain's policy (ACCEPT when the text does not say), "-" for others."""
        c = self._tables.get(table, {}).get(chain)
        if c is None:
            return "ACCEPT" if chain in C.BUILTIN.get(table, ()) else "-"
        return c.policy if c.builtin else "-"

    def rules(self, table: str, chain: str) -> list[Rule]:
        """The rules of `chain` (empty when it does not exist). A built-in chain missing from the
        text gets kproxy's standard hook jumps, so rendered rulesets trace like live ones."""
        c = self._tables.get(table, {}).get(chain)
        if c is None:
            if chain in C.BUILTIN.get(table, ()):
                hooks = C.hooks_for(table, chain)
                c = _Chain(builtin=True, lines=[h.line for h in hooks])
                self._tables.setdefault(table, {})[chain] = c
            else:
                return []
        if c.parsed is None:
            c.parsed = [parse_rule(chain, i + 1, line) for i, line in enumerate(c.lines)]
        return c.parsed


def parse_ruleset(text: str) -> Ruleset:
    """Parse iptables-save output or iptables-restore input (several tables)."""
    tables: dict[str, dict[str, _Chain]] = {}
    current: dict[str, _Chain] | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and "] " in line:  # iptables-save -c counters
            line = line.split("] ", 1)[1]
        if line.startswith("*"):
            current = tables.setdefault(line[1:], {})
            continue
        if current is None:
            raise TraceError(f"line {lineno}: rule outside a table: {line}")
        if line == "COMMIT":
            current = None
        elif line.startswith(":"):
            name, _, rest = line[1:].partition(" ")
            policy = rest.split(" ", 1)[0] if rest else "-"
            chain = current.get(name)
            if chain is None:
                current[name] = _Chain(builtin=policy != "-", policy=policy)
            else:
                chain.lines.clear()  # a restore declaration flushes the chain
        elif line.startswith("-A "):
            name = line[3:].split(" ", 1)[0]
            current.setdefault(name, _Chain(builtin=False)).lines.append(line)
        elif line.startswith("-I "):
            parts = line.split(" ", 3)
            name = parts[1]
            if len(parts) > 2 and parts[2].isdigit():
                pos, spec = int(parts[2]) - 1, parts[3] if len(parts) > 3 else ""
            else:
                pos, spec = 0, line.split(" ", 2)[2] if len(parts) > 2 else ""
            current.setdefault(name, _Chain(builtin=False)).lines.insert(pos, f"-A {name} {spec}")
        elif line.startswith("-X "):
            current.pop(line[3:].strip(), None)
        elif line.startswith(("-D ", "-F ", "-N ")):
            name = line[3:].split(" ", 1)[0]
            if line.startswith("-N "):
                current.setdefault(name, _Chain(builtin=False))
            elif line.startswith("-F "):
                current.setdefault(name, _Chain(builtin=False)).lines.clear()
            else:
                spec = line[3 + len(name) + 1 :]
                chain = current.get(name)
                if chain is not None and f"-A {name} {spec}" in chain.lines:
                    chain.lines.remove(f"-A {name} {spec}")
        else:
            raise TraceError(f"line {lineno}: cannot parse: {line}")
    if current is not None:
        raise TraceError("missing COMMIT at the end of the input")
    return Ruleset(tables)


# -- tracing -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a new connection. `hook` is where it enters netfilter: PREROUTING
    (from a pod or the network) or OUTPUT (from a process on the node); None infers it from the
    source (a local source means OUTPUT)."""

    src: str
    dst: str
    dport: int
    protocol: str = "tcp"
    sport: int | None = None
    hook: str | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One rule that matched on the way."""

    table: str
    chain: str
    index: int
    rule: str
    probability: float = 1.0  # < 1 for a statistic rule that was taken


@dataclass(frozen=True, slots=True)
class Outcome:
    """One way the packet can go, with its probability.

    verdict: DNAT (translated to `destination`), ACCEPT (delivered untranslated), DROP or REJECT.
    """

    verdict: str
    destination: str | None
    probability: float
    masqueraded: bool
    path: tuple[Step, ...]
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """kube-proxy's packet-flow wording: "ip:port", "DROP", "REJECT", or "" (untouched)."""
        if self.verdict == DNAT:
            return self.destination or ""
        return "" if self.verdict == ACCEPT else self.verdict


@dataclass(frozen=True, slots=True)
class TraceResult:
    packet: Packet
    outcomes: tuple[Outcome, ...]

    @property
    def destinations(self) -> dict[str, float]:
        """DNAT destination -> total probability."""
        out: dict[str, float] = {}
        for o in self.outcomes:
            if o.verdict == DNAT and o.destination:
                out[o.destination] = out.get(o.destination, 0.0) + o.probability
        return out

    @property
    def verdicts(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self.outcomes:
            out[o.verdict] = out.get(o.verdict, 0.0) + o.probability
        return out

    @property
    def summary(self) -> str:
        """The distinct labels in order of first appearance, comma separated (kube-proxy's
        packet-flow test output): "10.0.0.1:80, 10.0.0.2:80", "REJECT", "DROP" or ""."""
        labels = list(dict.fromkeys(o.label for o in self.outcomes))
        return ", ".join(label for label in labels if label) if any(labels) else ""

    @property
    def masqueraded(self) -> bool | None:
        """True/False when every outcome agrees, None when it depends on the branch."""
        values = {o.masqueraded for o in self.outcomes}
        return values.pop() if len(values) == 1 else None


@dataclass(frozen=True, slots=True)
class _State:
    prob: float
    src: IPAddress
    dst: IPAddress
    dport: int
    mark: int
    ctstate: frozenset[str]
    path: tuple[Step, ...]
    verdict: str | None = None  # DROP or REJECT
    destination: str | None = None  # "ip:port" after a DNAT
    masqueraded: bool = False
    notes: tuple[str, ...] = ()


@dataclass(slots=True)
class _Tracer:
    ruleset: Ruleset
    packet: Packet
    local: frozenset[IPAddress]
    recent: frozenset[str]

    def is_local(self, ip: IPAddress) -> bool:
        return ip.is_loopback or ip in self.local

    def _addrtype(self, ip: IPAddress, types: frozenset[str]) -> bool | None:
        got = set()
        if self.is_local(ip):
            got.add("LOCAL")
        if ip.is_multicast:
            got.add("MULTICAST")
        elif str(ip) == "255.255.255.255":
            got.add("BROADCAST")
        else:
            got.add("UNICAST")
        if not types <= {"LOCAL", "UNICAST", "MULTICAST", "BROADCAST"}:
            return None
        return bool(got & types)

    def match(self, r: Rule, st: _State) -> tuple[float, str | None]:
        """(probability that `r` matches, note); 0 for no match."""
        if r.unsupported:
            return 0.0, f"{r.chain} rule {r.index} not evaluated ({' '.join(r.unsupported)})"
        if r.source is not None and not r.source.matches(st.src):
            return 0.0, None
        if r.destination is not None and not r.destination.matches(st.dst):
            return 0.0, None
        proto = self.packet.protocol.lower()
        if r.protocol is not None:
            neg, want = r.protocol
            if (want in ("all", "0") or want == proto) == neg:
                return 0.0, None
        if r.dports is not None and not _in_ports(r.dports, st.dport):
            return 0.0, None
        if r.sports is not None:
            if self.packet.sport is None:
                return 0.0, f"{r.text!r} needs a source port"
            if not _in_ports(r.sports, self.packet.sport):
                return 0.0, None
        for sel, ip in ((r.src_type, st.src), (r.dst_type, st.dst)):
            if sel is not None:
                ok = self._addrtype(ip, sel[1])
                if ok is None:
                    return 0.0, f"{r.text!r}: address type not evaluated"
                if ok == sel[0]:
                    return 0.0, None
        if r.mark is not None:
            neg, value, mask = r.mark
            if ((st.mark & mask) == value) == neg:
                return 0.0, None
        if r.ctstate is not None:
            neg, states = r.ctstate
            if bool(states & st.ctstate) == neg:
                return 0.0, None
        if r.recent is not None:
            neg, mode, name = r.recent
            if mode in ("rcheck", "update", "remove") and (name in self.recent) == neg:
                return 0.0, None
        if r.probability is not None:
            return min(max(r.probability, 0.0), 1.0), None
        return 1.0, None

    def walk(
        self, table: str, chain: str, st: _State, start: int = 0, depth: int = 0
    ) -> Iterator[tuple[_State, bool]]:
        """Run `st` through `chain` from rule `start`; yields (state, decided): decided means a
        verdict (or NAT) ended the traversal, otherwise the chain returned. Branches come out
        in rule order: a statistic rule's taken branch before the one that goes on."""
        if depth > _MAX_DEPTH:
            raise TraceError(f"jumps nest deeper than {_MAX_DEPTH} (a loop?) at {table}/{chain}")
        deferred: list[tuple[_State, int]] = []
        yield from self._run(table, chain, st, start, depth, deferred)
        for missed, pos in deferred:
            yield from self.walk(table, chain, missed, pos, depth)

    def _run(
        self,
        table: str,
        chain: str,
        st: _State,
        start: int,
        depth: int,
        deferred: list[tuple[_State, int]],
    ) -> Iterator[tuple[_State, bool]]:
        rules = self.ruleset.rules(table, chain)
        for pos in range(start, len(rules)):
            r = rules[pos]
            p, note = self.match(r, st)
            if note is not None:
                st = replace(st, notes=(*st.notes, note))
            if p <= 0.0:
                continue
            if p < 1.0:
                deferred.append((replace(st, prob=st.prob * (1.0 - p)), pos + 1))
                st = replace(st, prob=st.prob * p)
            st = replace(st, path=(*st.path, Step(table, chain, r.index, r.text, p)))
            if r.recent is not None and r.recent[1] == "set":
                st = replace(st, notes=(*st.notes, f"client added to recent list {r.recent[2]}"))
            target = r.target
            if target is None:
                continue
            if target == "MARK" and r.mark_op is not None:
                st = replace(st, mark=_apply_mark(st.mark, r.mark_op))
                continue
            if target == "RETURN":
                yield st, False
                return
            if target == ACCEPT:
                yield st, True
                return
            if target in (DROP, REJECT):
                yield replace(st, verdict=target), True
                return
            if target == "DNAT":
                yield self._dnat(st, r), True
                return
            if target in ("MASQUERADE", "SNAT"):
                yield replace(st, masqueraded=True), True
                return
            if target in ("LOG", "NFLOG", "TRACE", "CONNMARK", "CT", "NOTRACK"):
                st = replace(st, notes=(*st.notes, f"{target} ignored"))
                continue
            if not self.ruleset.has_chain(table, target) and target not in C.BUILTIN.get(table, ()):
                st = replace(st, notes=(*st.notes, f"unknown target {target} ignored"))
                continue
            for sub, decided in self.walk(table, target, st, 0, depth + 1):
                if decided or r.goto:
                    yield sub, decided
                else:
                    yield from self.walk(table, chain, sub, pos + 1, depth)
            return
        if self.ruleset.policy(table, chain) in (DROP, REJECT):
            note = f"{table} {chain} policy {self.ruleset.policy(table, chain)}"
            yield replace(st, verdict=DROP, notes=(*st.notes, note)), True
            return
        yield st, False

    def _dnat(self, st: _State, r: Rule) -> _State:
        to = r.to_destination or ""
        host, port = _split_hostport(to, st.dport)
        ip = ipaddress.ip_address(host)
        return replace(
            st,
            dst=ip,
            dport=port,
            destination=f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}",
            ctstate=st.ctstate | {"DNAT"},
        )

    def hook(self, table: str, chain: str, st: _State) -> Iterator[_State]:
        """The states leaving built-in `chain`: verdict DROP/REJECT, or None to go on."""
        for out, _ in self.walk(table, chain, st):
            yield out

    def run(self) -> list[Outcome]:
        pkt = self.packet
        src = ipaddress.ip_address(pkt.src)
        start = _State(
            prob=1.0,
            src=src,
            dst=ipaddress.ip_address(pkt.dst),
            dport=pkt.dport,
            mark=0,
            ctstate=frozenset({"NEW"}),
            path=(),
        )
        hook = pkt.hook or (OUTPUT if self.is_local(src) else PREROUTING)
        outcomes: list[Outcome] = []
        for st in self.hook("nat", hook, start):
            translated = st.destination is not None
            if st.verdict is not None:
                outcomes.append(_outcome(st, st.verdict))
                continue
            if hook == OUTPUT:
                filter_chain = "OUTPUT"
            else:
                filter_chain = "INPUT" if self.is_local(st.dst) else "FORWARD"
            for ft in self.hook("filter", filter_chain, st):
                if ft.verdict in (DROP, REJECT):
                    outcomes.append(_outcome(ft, ft.verdict))
                    continue
                if filter_chain == "INPUT":
                    finals: Iterable[_State] = (ft,)
                else:
                    finals = self.hook("nat", "POSTROUTING", ft)
                for final in finals:
                    outcomes.append(_outcome(final, DNAT if translated else ACCEPT))
        return outcomes


def _outcome(st: _State, verdict: str) -> Outcome:
    return Outcome(
        verdict=verdict,
        destination=st.destination if verdict == DNAT else None,
        probability=st.prob,
        masqueraded=st.masqueraded,
        path=st.path,
        notes=tuple(dict.fromkeys(st.notes)),
    )


def _in_ports(sel: tuple[bool, tuple[tuple[int, int], ...]], port: int) -> bool:
    neg, ranges = sel
    return any(lo <= port <= hi for lo, hi in ranges) != neg


def _apply_mark(mark: int, op: tuple[str, int, int]) -> int:
    kind, value, mask = op
    if kind == "or":
        return mark | value
    if kind == "xor":
        return mark ^ value
    if kind == "and":
        return mark & value
    if kind == "xset":  # --set-xmark value/mask: zero the mask bits, then xor value
        return (mark & ~mask) ^ value
    return (mark & ~mask) | value if mask != 0xFFFFFFFF else value


def _split_hostport(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port.split("-")[0])
    return text, default_port


def trace(
    ruleset: Ruleset | str,
    packet: Packet,
    *,
    local_addresses: Iterable[str] = (),
    recent: Iterable[str] = (),
) -> TraceResult:
    """Every outcome for `packet` through `ruleset` (text or parsed).

    local_addresses: this node's addresses (addrtype LOCAL; loopback is always local).
    recent: names of `recent` lists that already contain the client (session affinity).
    """
    rs = parse_ruleset(ruleset) if isinstance(ruleset, str) else ruleset
    tracer = _Tracer(
        ruleset=rs,
        packet=packet,
        local=frozenset(ipaddress.ip_address(a) for a in local_addresses),
        recent=frozenset(recent),
    )
    return TraceResult(packet=packet, outcomes=tuple(tracer.run()))
