"""Parse `iptables-save [-c]` output and trace a packet through it, the way the kernel would.

Pure and standard-library only: text in, outcomes out. This is the engine behind `kproxy explain`
and the read-back of `kproxy status`, and the packet-flow checker of the tests (kube-proxy's
proxier_test.go traces packets the same way).

What it understands is the vocabulary kproxy and kube-proxy write: `-s`/`-d` (with `!` and
prefixes), `-p`, `-i`/`-o`, `-m tcp|udp|sctp --dport/--sport`, `-m multiport`, `-m addrtype`,
`-m comment`, `-m mark`, `-m statistic`, `-m recent`, `-m conntrack`/`-m state`, `-m set`, and the
targets DNAT, SNAT, MASQUERADE, REDIRECT, MARK, RETURN, ACCEPT, DROP, REJECT, LOG and jumps or
gotos into user chains. A match it cannot evaluate makes its rule not match, with a note saying so.

The state a rule may depend on is passed in, never read: the addresses that are local to the
node (`addrtype LOCAL`), ipset contents (`-m set`), the sources each `recent` list remembers.
A packet is traced as the first packet of a new connection (later packets follow its conntrack
entry, not the rules). `statistic --mode random` rules split the trace: the matched branch gets
probability p, the unmatched one passes on with 1-p, and each outcome carries the product along
its path.

Besides iptables-save output, `parse_save` applies the edits of iptables-restore --noflush input
(-I, -D, -F, -N, -X, and a user chain declared again is flushed), so a partial sync's input can be
laid over the rules it changes; a line it cannot read, or a table without COMMIT, is an error.

Entry points: `parse_save` (a Ruleset), `walk` (one table from one chain), `trace_packet` (the
nat/filter/nat sequence a packet meets at one hook; `flow_output` sums its outcomes up the way
kube-proxy's packet-flow tests do), `parse_ipset_save`.
"""

from __future__ import annotations

import functools
import gc
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from kproxy.errors import InputError

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

PREROUTING = "PREROUTING"
OUTPUT = "OUTPUT"
HOOKS = (PREROUTING, OUTPUT)

NAT = "nat"
FILTER = "filter"

# targets that end the traversal of a table
TERMINAL = frozenset({"ACCEPT", "DROP", "REJECT", "DNAT", "SNAT", "MASQUERADE", "REDIRECT"})
# targets that do something (or nothing) and let the packet go on to the next rule
NON_TERMINAL = frozenset({"LOG", "NFLOG", "TRACE", "CONNMARK", "CT", "NOTRACK", "AUDIT", "TCPMSS"})

MAX_DEPTH = 64
EPSILON = 1e-12

_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
_COUNTERS = re.compile(r"^\[(\d+):(\d+)\]\s+")
_PORT_ENTRY = re.compile(r"^(tcp|udp|sctp|udplite|tcpudp):(\d+)(?:-(\d+))?$")
_BITMAP_PORT = re.compile(r"^(\d+)(?:-(\d+))?$")
# iptables-save prints a protocol number when it has no name for it (no /etc/protocols)
_PROTO_NAMES = {"1": "icmp", "6": "tcp", "17": "udp", "58": "ipv6-icmp", "132": "sctp"}


class ParseError(InputError):
    """The text is not iptables-save output this module can read."""


# -- rules -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Cond:
    """One match condition of a rule. `kind` says what is compared, `args` with what."""

    kind: str  # src dst proto dport sport addrtype mark ctstate set iface unknown
    args: tuple[str, ...]
    negate: bool = False

    @property
    def net(self) -> IPNet | None:
        """The network of a src/dst condition."""
        return _network(self.args[0]) if self.kind in ("src", "dst") else None


@dataclass(frozen=True, slots=True)
class Recent:
    """A `-m recent` match: session affinity in kube-proxy's rules."""

    name: str
    action: str  # set, rcheck, update, remove
    seconds: int | None = None
    rdest: bool = False
    negate: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """One `-A` line of a chain. `index` is its 1-based position, as `iptables -L --line-numbers`
    shows it; `text` is the line after "-A CHAIN "."""

    table: str
    chain: str
    index: int
    text: str
    conditions: tuple[Cond, ...] = ()
    comment: str = ""
    probability: float | None = None
    recent: Recent | None = None
    target: str = ""
    goto: bool = False
    target_options: tuple[tuple[str, str], ...] = ()
    pkts: int | None = None
    bytes: int | None = None

    def option(self, name: str) -> str:
        """The value of one target option (e.g. "--to-destination"), "" when absent."""
        for key, value in self.target_options:
            if key == name:
                return value
        return ""

    def has_option(self, name: str) -> bool:
        return any(key == name for key, _ in self.target_options)


@dataclass(slots=True)
class Chain:
    """A chain and its rules. Rules are parsed when first asked for: a trace visits a few
    chains of a ruleset that may hold a hundred thousand rules."""

    name: str
    policy: str = "-"  # ACCEPT/DROP for built-in chains, "-" for user chains
    table: str = ""
    lines: list[tuple[str, tuple[int, int] | None]] = field(default_factory=list)
    _rules: list[Rule] | None = None

    @property
    def builtin(self) -> bool:
        return self.policy != "-"

    @property
    def rules(self) -> list[Rule]:
        if self._rules is None:
            collecting = gc.isenabled()
            gc.disable()  # see parse_save
            try:
                self._rules = [
                    parse_rule(self.table, self.name, i, text, counters=counters)
                    for i, (text, counters) in enumerate(self.lines, start=1)
                ]
            finally:
                if collecting:
                    gc.enable()
        return self._rules

    def __len__(self) -> int:
        return len(self.lines)


@dataclass(slots=True)
class Ruleset:
    """Tables of chains, as one or more iptables-save outputs declared them."""

    tables: dict[str, dict[str, Chain]] = field(default_factory=dict)

    def chain(self, table: str, name: str) -> Chain | None:
        return self.tables.get(table, {}).get(name)

    def chains(self, table: str) -> dict[str, Chain]:
        return self.tables.get(table, {})

    def rules(self, table: str, name: str) -> list[Rule]:
        chain = self.chain(table, name)
        return chain.rules if chain is not None else []

    def has_table(self, table: str) -> bool:
        return table in self.tables

    def recent_seconds(self, name: str) -> int | None:
        """The --seconds of the rcheck/update rules of recent list `name` (affinity timeout)."""
        for chains in self.tables.values():
            for chain in chains.values():
                for i, (text, _) in enumerate(chain.lines):
                    if name not in text or "--seconds" not in text:
                        continue  # a cheap look first: parse only the likely lines
                    r = chain.rules[i].recent
                    if r and r.name == name and r.action in ("rcheck", "update") and r.seconds:
                        return r.seconds
        return None


def _tokens(line: str) -> list[str]:
    """Split a rule into words; "quoted text" (iptables-save quotes comments) is one word."""
    if '"' not in line:
        return line.split()
    if "\\" in line:  # escaped quotes inside a comment: the careful way
        return [
            plain if plain else re.sub(r"\\(.)", r"\1", quoted)
            for quoted, plain in _TOKEN.findall(line)
        ]
    out: list[str] = []
    for i, part in enumerate(line.split('"')):
        if i % 2:
            out.append(part)
        else:
            out.extend(part.split())
    return out


@functools.lru_cache(maxsize=65536)
def _address(text: str) -> IPAddr:
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=65536)
def _network(text: str) -> IPNet:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ParseError(f"bad address {text!r}") from None


_KNOWN_MODULES = frozenset(
    (
        "tcp",
        "udp",
        "sctp",
        "multiport",
        "addrtype",
        "comment",
        "mark",
        "statistic",
        "recent",
        "conntrack",
        "state",
        "set",
    )
)

# options that take one value inside a match module, by module (anything else: a flag)
_VALUE_OPTIONS = {
    "--comment",
    "--dport",
    "--sport",
    "--destination-port",
    "--source-port",
    "--dports",
    "--sports",
    "--ports",
    "--dst-type",
    "--src-type",
    "--mark",
    "--mode",
    "--probability",
    "--every",
    "--packet",
    "--name",
    "--seconds",
    "--hitcount",
    "--mask",
    "--ctstate",
    "--state",
    "--ctstatus",
    "--ctdir",
    "--tcp-flags",
}


def parse_rule(
    table: str, chain: str, index: int, text: str, *, counters: tuple[int, int] | None = None
) -> Rule:
    """One rule from its text after "-A CHAIN " (iptables-save's or iptables-restore's form)."""
    toks = _tokens(text)
    conds: list[Cond] = []
    comment = ""
    probability: float | None = None
    recent: Recent | None = None
    recent_fields: dict[str, str] = {}
    target = ""
    goto = False
    topts: list[tuple[str, str]] = []
    module = ""
    neg = False
    i = 0
    n = len(toks)

    def value() -> str:
        nonlocal i
        if i + 1 >= n:
            raise ParseError(f"{toks[i]} needs a value in {text!r}")
        i += 1
        return toks[i]

    while i < n:
        t = toks[i]
        if t == "!":
            neg = True
            i += 1
            continue
        if t in ("-j", "--jump", "-g", "--goto"):
            goto = t in ("-g", "--goto")
            target = value()
            i += 1
            while i < n:  # everything after the target belongs to it
                key = toks[i]
                if i + 1 < n and not toks[i + 1].startswith("--"):
                    topts.append((key, toks[i + 1]))
                    i += 2
                else:
                    topts.append((key, ""))
                    i += 1
            break
        if t == "-m" or t == "--match":
            module = value()
            if module not in _KNOWN_MODULES:
                conds.append(Cond("unknown", (f"-m {module}",), False))
        elif t == "--comment" and module == "comment":
            comment = value()
        elif t in ("-s", "--source", "-d", "--destination"):
            kind = "src" if t in ("-s", "--source") else "dst"
            conds.append(Cond(kind, (value(),), neg))
        elif t in ("-p", "--protocol"):
            proto = value().lower()
            conds.append(Cond("proto", (_PROTO_NAMES.get(proto, proto),), neg))
        elif t in ("-i", "--in-interface", "-o", "--out-interface"):
            conds.append(Cond("iface", ("in" if t.startswith("-i") else "out", value()), neg))
        elif t in ("-c", "--set-counters"):
            value()
            value()
        elif t in ("-4", "-6", "-f", "--fragment"):
            pass
        elif t in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            conds.append(Cond("dport", (value(),), neg))
        elif t in ("--sport", "--source-port", "--sports", "--source-ports"):
            conds.append(Cond("sport", (value(),), neg))
        elif t == "--ports":
            conds.append(Cond("port", (value(),), neg))
        elif t in ("--dst-type", "--src-type"):
            conds.append(Cond("addrtype", ("dst" if t == "--dst-type" else "src", value()), neg))
        elif module == "mark" and t == "--mark":
            conds.append(Cond("mark", (value(),), neg))
        elif module == "statistic" and t == "--probability":
            p = float(value())
            probability = 1.0 - p if neg else p
        elif module == "statistic" and t == "--every":
            every = int(value())
            probability = 1.0 / every if every > 0 else 1.0
        elif t in ("--ctstate", "--state"):
            conds.append(Cond("ctstate", tuple(value().split(",")), neg))
        elif module == "set" and t == "--match-set":
            name = value()
            conds.append(Cond("set", (name, value()), neg))
        elif module == "recent" and t in ("--set", "--rcheck", "--update", "--remove"):
            recent_fields["action"] = t[2:]
            recent_fields["negate"] = "1" if neg else ""
        elif module == "recent" and t in ("--name", "--seconds"):
            recent_fields[t[2:]] = value()
        elif module == "recent" and t == "--rdest":
            recent_fields["rdest"] = "1"
        elif t in _VALUE_OPTIONS:
            value()
        elif t.startswith("-"):
            pass  # a flag we do not need (--reap, --rsource, --mode random's mode is read above)
        neg = False
        i += 1

    if recent_fields.get("action"):
        secs = recent_fields.get("seconds")
        recent = Recent(
            name=recent_fields.get("name", "DEFAULT"),
            action=recent_fields["action"],
            seconds=int(secs) if secs else None,
            rdest=bool(recent_fields.get("rdest")),
            negate=bool(recent_fields.get("negate")),
        )
    pkts, nbytes = counters if counters else (None, None)
    return Rule(
        table=table,
        chain=chain,
        index=index,
        text=text,
        conditions=tuple(conds),
        comment=comment,
        probability=probability,
        recent=recent,
        target=target,
        goto=goto,
        target_options=tuple(topts),
        pkts=pkts,
        bytes=nbytes,
    )


def parse_save(text: str, into: Ruleset | None = None) -> Ruleset:
    """Read `iptables-save` output (any tables, with or without -c counters), or
    iptables-restore input. Several texts can be merged with `into`: a later one changes the
    rules an earlier one declared the way `iptables-restore --noflush` would."""
    rs = into if into is not None else Ruleset()
    collecting = gc.isenabled()
    gc.disable()  # a big listing makes many small objects: no cycles to look for among them
    try:
        _parse_into(rs, text)
    finally:
        if collecting:
            gc.enable()
    return rs


def _parse_into(rs: Ruleset, text: str) -> None:
    table: dict[str, Chain] | None = None
    table_name = ""
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if table is not None:
                raise ParseError(f"line {lineno}: *{line[1:]} before the COMMIT of *{table_name}")
            table_name = line[1:].strip()
            table = rs.tables.setdefault(table_name, {})
            continue
        if table is None:
            raise ParseError(f"line {lineno}: outside a table: {line!r}")
        if line == "COMMIT":
            table = None
            continue
        if line.startswith(":"):
            parts = line[1:].split()
            name = parts[0]
            policy = parts[1] if len(parts) > 1 else "-"
            chain = table.get(name)
            if chain is None:
                table[name] = Chain(name, policy, table_name)
            elif chain.builtin:
                chain.policy = policy
            else:  # iptables-restore --noflush: declaring a user chain again flushes it
                _set_lines(chain, [])
            continue
        counters: tuple[int, int] | None = None
        m = _COUNTERS.match(line)
        if m:
            counters = (int(m.group(1)), int(m.group(2)))
            line = line[m.end() :]
        op, _, rest = line.partition(" ")
        name, _, spec = rest.partition(" ")
        if op not in _EDITS or not name:
            raise ParseError(f"line {lineno}: not iptables-save or -restore text: {line!r}")
        chain = table.get(name)
        if op == "-X":
            table.pop(name, None)
            continue
        if chain is None:
            chain = table[name] = Chain(name, "-", table_name)
        if op == "-A":
            chain.lines.append((spec, counters))
            chain._rules = None
        elif op == "-I":
            pos, _, rule = spec.partition(" ")
            at, rule_text = (int(pos) - 1, rule) if pos.isdigit() else (0, spec)
            _set_lines(chain, [*chain.lines[:at], (rule_text, counters), *chain.lines[at:]])
        elif op == "-D":
            found = _find_rule(chain, spec)
            if found is None:
                raise ParseError(f"line {lineno}: -D {name}: no such rule: {spec!r}")
            _set_lines(chain, chain.lines[:found] + chain.lines[found + 1 :])
        elif op == "-F":
            _set_lines(chain, [])
        # -N: the chain exists now
    if table is not None:
        raise ParseError(f"*{table_name} has no COMMIT at the end")


# the lines iptables-restore (--noflush, as kproxy's partial syncs use it) may hold besides -A
_EDITS = frozenset({"-A", "-I", "-D", "-F", "-N", "-X"})


def _set_lines(chain: Chain, lines: list[tuple[str, tuple[int, int] | None]]) -> None:
    chain.lines = lines
    chain._rules = None


def _find_rule(chain: Chain, spec: str) -> int | None:
    """The position of the rule `-D CHAIN spec` deletes: a rule number, the same text, or a rule
    that means the same (iptables-save spells rules its own way: /32 masks, -m tcp, order)."""
    if spec.isdigit():
        at = int(spec) - 1
        return at if 0 <= at < len(chain.lines) else None
    for i, (text, _) in enumerate(chain.lines):
        if text == spec:
            return i
    want = _meaning(parse_rule(chain.table, chain.name, 0, spec))
    return next((i for i, r in enumerate(chain.rules) if _meaning(r) == want), None)


def _meaning(rule: Rule) -> tuple[object, ...]:
    conds = frozenset(
        (c.kind, (str(c.net),) if c.net is not None else c.args, c.negate) for c in rule.conditions
    )
    return (
        conds,
        rule.comment,
        rule.probability,
        rule.recent,
        rule.target,
        rule.goto,
        frozenset(rule.target_options),
    )


def parse_ipset_save(text: str) -> dict[str, frozenset[str]]:
    """`ipset save` (or `ipset list -o save`) -> {set name: entries}; empty sets included."""
    sets: dict[str, set[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "create":
            sets.setdefault(words[1], set())
        elif len(words) >= 3 and words[0] == "add":
            entries = sets.setdefault(words[1], set())
            if "nomatch" not in words[3:]:  # a nomatch entry carves out of a net: left out
                entries.add(words[2])
    return {name: frozenset(entries) for name, entries in sets.items()}


# -- packets and what they meet ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a connection. Protocol lower case; addresses in canonical form."""

    src: str
    dst: str
    dport: int
    proto: str = "tcp"
    sport: int = 40000
    mark: int = 0
    in_iface: str = ""
    out_iface: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", str(ipaddress.ip_address(self.src)))
        object.__setattr__(self, "dst", str(ipaddress.ip_address(self.dst)))
        object.__setattr__(self, "proto", self.proto.lower())

    @property
    def family(self) -> int:
        return 6 if ":" in self.dst else 4


@dataclass(frozen=True, slots=True)
class Environment:
    """What rules may depend on beyond the packet.

    local_addresses: the node's addresses (addrtype LOCAL; loopback is always local).
    sets: ipset contents by set name; None when unknown (then `-m set` never matches, noted).
    recent: for each `recent` list, the addresses it remembers (affinity already chosen).
    ctstate: the conntrack state of the packet (a new connection by default).
    """

    local_addresses: frozenset[str] = frozenset()
    sets: Mapping[str, frozenset[str]] | None = None
    recent: Mapping[str, frozenset[str]] = field(default_factory=dict)
    ctstate: str = "NEW"

    def __post_init__(self) -> None:
        canonical = frozenset(str(ipaddress.ip_address(a)) for a in self.local_addresses)
        object.__setattr__(self, "local_addresses", canonical)

    def is_local(self, address: str) -> bool:
        ip = _address(address)
        return ip.is_loopback or str(ip) in self.local_addresses


@dataclass(frozen=True, slots=True)
class Step:
    """One rule a packet met on its way. `taken` is False for a random rule the packet passed
    (its share went on to the next rule); `policy` marks a built-in chain's policy."""

    table: str
    chain: str
    rule: Rule | None
    taken: bool = True
    probability: float | None = None  # the rule's own probability, for random rules
    policy: str = ""

    @property
    def index(self) -> int:
        return self.rule.index if self.rule else 0


@dataclass(frozen=True, slots=True)
class Walk:
    """One way through a table. `verdict` is the terminal target met (DNAT, ACCEPT, ...), or ""
    when the walk came back out of the start chain (RETURN or the end of a user chain); for a
    built-in start chain the policy is the verdict."""

    probability: float
    steps: tuple[Step, ...]
    verdict: str
    verdict_rule: Rule | None
    mark: int
    mark_by: Step | None  # the jump that led to the last MARK (e.g. -> KUBE-MARK-MASQ)
    recent_set: tuple[str, ...] = ()  # recent lists that will remember this client
    pinned: tuple[str, ...] = ()  # recent lists that already remembered it (affinity hit)
    notes: tuple[str, ...] = ()

    @property
    def dnat(self) -> str:
        if self.verdict == "DNAT" and self.verdict_rule is not None:
            return self.verdict_rule.option("--to-destination")
        return ""


@dataclass(slots=True)
class _Branch:
    probability: float
    mark: int
    steps: tuple[Step, ...] = ()
    mark_by: Step | None = None
    recent_set: tuple[str, ...] = ()
    pinned: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def split(self, share: float) -> _Branch:
        """A copy carrying `share` of this branch's probability."""
        return _Branch(
            self.probability * share,
            self.mark,
            self.steps,
            self.mark_by,
            self.recent_set,
            self.pinned,
            self.notes,
        )

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes = (*self.notes, text)


def _port_range(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        out.append((int(lo), int(hi) if hi else int(lo)))
    return out


def _mark_value(spec: str) -> tuple[int, int]:
    value, _, mask = spec.partition("/")
    return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF


def _set_entry_matches(entry: str, dirs: list[str], pkt: Packet) -> bool:
    parts = entry.split(",")
    if len(dirs) < len(parts):
        return False
    for part, d in zip(parts, dirs, strict=False):
        addr = pkt.src if d == "src" else pkt.dst
        port = pkt.sport if d == "src" else pkt.dport
        m = _PORT_ENTRY.match(part)
        if m:
            proto = m.group(1)
            lo = int(m.group(2))
            hi = int(m.group(3) or lo)
            if proto != "tcpudp" and proto != pkt.proto:
                return False
            if not lo <= port <= hi:
                return False
            continue
        m = _BITMAP_PORT.match(part)
        if m:
            lo = int(m.group(1))
            hi = int(m.group(2) or lo)
            if not lo <= port <= hi:
                return False
            continue
        try:
            if "/" in part:
                if ipaddress.ip_address(addr) not in ipaddress.ip_network(part, strict=False):
                    return False
            elif ipaddress.ip_address(addr) != ipaddress.ip_address(part):
                return False
        except ValueError:
            return False
    return True


class _Tracer:
    def __init__(self, ruleset: Ruleset, env: Environment) -> None:
        self.rs = ruleset
        self.env = env
        self.is_local = env.is_local

    # -- matching ------------------------------------------------------------------------------
    def _cond(self, c: Cond, pkt: Packet, br: _Branch) -> bool | None:
        """True/False, or None when the condition cannot be evaluated (noted on the branch)."""
        k = c.kind
        if k in ("src", "dst"):
            ip = _address(pkt.src if k == "src" else pkt.dst)
            net = _network(c.args[0])
            return ip.version == net.version and ip in net
        if k == "proto":
            return c.args[0] in ("all", "0") or c.args[0] == pkt.proto
        if k in ("dport", "sport", "port"):
            ports = (
                (pkt.dport,)
                if k == "dport"
                else (pkt.sport,)
                if k == "sport"
                else (pkt.sport, pkt.dport)
            )
            return any(lo <= p <= hi for lo, hi in _port_range(c.args[0]) for p in ports)
        if k == "addrtype":
            which, types = c.args
            addr = pkt.src if which == "src" else pkt.dst
            ip = _address(addr)
            local = self.is_local(addr)
            found = False
            for t in types.split(","):
                if t == "LOCAL":
                    found = found or local
                elif t == "UNICAST":
                    found = found or (not local and not ip.is_multicast)
                elif t == "MULTICAST":
                    found = found or ip.is_multicast
                else:
                    br.note(f"addrtype {t} cannot be evaluated: assumed not to match")
            return found
        if k == "mark":
            value, mask = _mark_value(c.args[0])
            return (br.mark & mask) == value
        if k == "ctstate":
            return self.env.ctstate in c.args
        if k == "iface":
            which, name = c.args
            have = pkt.in_iface if which == "in" else pkt.out_iface
            if not have:
                br.note(f"-{which[0]} {name}: the interface is not known, assumed not to match")
                return None
            if name.endswith("+"):
                return have.startswith(name[:-1])
            return have == name
        if k == "set":
            name, dirs = c.args
            sets = self.env.sets
            if sets is None or name not in sets:
                br.note(f"ipset {name} is not known: assumed not to match")
                return None
            return any(_set_entry_matches(e, dirs.split(","), pkt) for e in sets[name])
        br.note(f"{c.args[0]} cannot be evaluated: assumed not to match")
        return None

    def _matches(self, rule: Rule, pkt: Packet, br: _Branch) -> bool:
        for c in rule.conditions:
            got = self._cond(c, pkt, br)
            if got is None:
                return False
            if got == c.negate:
                return False
        r = rule.recent
        if r is not None and r.action != "set":
            remembered = self.env.recent.get(r.name, frozenset())
            hit = (pkt.dst if r.rdest else pkt.src) in remembered
            if hit == r.negate:
                return False
            if hit:
                br.pinned = (*br.pinned, r.name)
        return True

    # -- walking -------------------------------------------------------------------------------
    def run(
        self, table: str, chain_name: str, br: _Branch, pkt: Packet, depth: int = 0
    ) -> list[tuple[_Branch, Rule | None, str]]:
        """Walk `chain_name` and what it jumps to. Returns (branch, verdict rule, verdict) with
        verdict "" for branches that come back out of the chain."""
        chain = self.rs.chain(table, chain_name)
        if chain is None:
            br.note(f"chain {table}/{chain_name} does not exist")
            return [(br, None, "")]
        rules = chain.rules
        results: list[tuple[_Branch, Rule | None, str]] = []
        work: list[tuple[int, _Branch]] = [(0, br)]
        while work:
            i, b = work.pop()
            finished = False
            while i < len(rules):
                rule = rules[i]
                i += 1
                if not self._matches(rule, pkt, b):
                    continue
                p = rule.probability
                if p is not None:
                    p = min(max(p, 0.0), 1.0)
                    if 1.0 - p > EPSILON:
                        rest = b.split(1.0 - p)
                        rest.steps = (*b.steps, Step(table, chain_name, rule, False, p))
                        work.append((i, rest))
                    if p <= EPSILON:
                        finished = True
                        break
                    b = b.split(p)
                step = Step(table, chain_name, rule, True, p)
                b.steps = (*b.steps, step)
                if rule.recent is not None and rule.recent.action == "set":
                    b.recent_set = (*b.recent_set, rule.recent.name)
                target = rule.target
                if not target:
                    continue
                if self.rs.chain(table, target) is not None and target not in TERMINAL:
                    if depth >= MAX_DEPTH:
                        b.note(f"jumps nest deeper than {MAX_DEPTH} chains: stopped (a loop?)")
                        results.append((b, rule, "DROP"))
                        finished = True
                        break
                    sub = self.run(table, target, b, pkt, depth + 1)
                    if rule.goto:
                        results.extend(sub)
                    else:
                        results.extend(s for s in sub if s[2])
                        back = [s[0] for s in sub if not s[2]]
                        work.extend((i, sb) for sb in reversed(back))
                    finished = True
                    break
                if target == "RETURN":
                    results.append((b, rule, ""))
                    finished = True
                    break
                if target == "MARK":
                    b.mark = self._apply_mark(rule, b.mark)
                    b.mark_by = self._caller(b, chain_name) or step
                    continue
                if target in TERMINAL:
                    results.append((b, rule, target))
                    finished = True
                    break
                if target not in NON_TERMINAL:
                    b.note(f"target {target} is not known: assumed to let the packet go on")
            if not finished:
                results.append((b, None, ""))
        return results

    @staticmethod
    def _caller(b: _Branch, chain_name: str) -> Step | None:
        for step in reversed(b.steps[:-1]):
            if step.taken and step.rule is not None and step.rule.target == chain_name:
                return step
        return None

    @staticmethod
    def _apply_mark(rule: Rule, mark: int) -> int:
        for key, val in rule.target_options:
            if key == "--set-xmark":
                v, m = _mark_value(val)
                mark = (mark & ~m & 0xFFFFFFFF) ^ v
            elif key == "--set-mark":
                v, m = _mark_value(val)
                mark = (mark & ~m & 0xFFFFFFFF) | v
            elif key == "--or-mark":
                mark |= int(val, 0)
            elif key == "--and-mark":
                mark &= int(val, 0)
            elif key == "--xor-mark":
                mark ^= int(val, 0)
        return mark & 0xFFFFFFFF

    def walk(self, table: str, chain: str, pkt: Packet, *, mark: int) -> list[Walk]:
        start = self.rs.chain(table, chain)
        out = []
        for b, rule, verdict in self.run(table, chain, _Branch(1.0, mark), pkt):
            if not verdict and start is not None and start.builtin:
                verdict = start.policy
                b.steps = (*b.steps, Step(table, chain, None, True, None, start.policy))
            out.append(
                Walk(
                    probability=b.probability,
                    steps=b.steps,
                    verdict=verdict,
                    verdict_rule=rule if verdict else None,
                    mark=b.mark,
                    mark_by=b.mark_by,
                    recent_set=b.recent_set,
                    pinned=b.pinned,
                    notes=b.notes,
                )
            )
        return out


def walk(
    ruleset: Ruleset,
    table: str,
    chain: str,
    packet: Packet,
    *,
    env: Environment | None = None,
    mark: int | None = None,
) -> list[Walk]:
    """Every way `packet` can go through `table` starting at `chain`, with its probability."""
    env = env or Environment()
    return _Tracer(ruleset, env).walk(
        table, chain, packet, mark=packet.mark if mark is None else mark
    )


# -- whole packets -----------------------------------------------------------------------------
def split_hostport(text: str) -> tuple[str, int | None]:
    """DNAT's --to-destination ("10.0.0.1:80", "[fd00::1]:80", "10.0.0.1", ranges) ->
    (first address, first port or None)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    host = host.split("-", 1)[0]
    port = port.split("-", 1)[0]
    return host, int(port) if port else None


@dataclass(frozen=True, slots=True)
class Outcome:
    """One way a packet goes at one hook: nat (PREROUTING or OUTPUT), then filter (INPUT,
    FORWARD or OUTPUT), then nat POSTROUTING when it leaves the node.

    verdict: "accept" (delivered or forwarded), "drop" or "reject"; verdict_rule is the rule
    that said so (None for a chain policy). dnat is the --to-destination, "" when none. mark is
    the packet's mark when it is routed (after nat and filter, before nat POSTROUTING).
    """

    probability: float
    hook: str
    steps: tuple[Step, ...]
    verdict: str
    verdict_rule: Rule | None
    dnat: str
    after: Packet
    filter_chain: str  # INPUT, FORWARD or OUTPUT
    local_delivery: bool  # the (translated) destination is this node
    marked: bool  # the nat stage left a mark (kproxy's masquerade mark when mark_by says so)
    mark: int
    mark_by: Step | None
    masquerade: bool
    masquerade_rule: Rule | None
    recent_set: tuple[str, ...] = ()
    pinned: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def chosen(self) -> bool:
        """True when the packet was translated (its endpoint is chosen)."""
        return bool(self.dnat)

    @property
    def label(self) -> str:
        """kube-proxy's packet-flow wording: the endpoint "ip:port" ("[ip]:port" for IPv6) it was
        translated to, "DROP", "REJECT", or "" when the rules left it alone."""
        if self.verdict in ("drop", "reject"):
            return self.verdict.upper()
        if not self.dnat:
            return ""
        host = f"[{self.after.dst}]" if self.after.family == 6 else self.after.dst
        return f"{host}:{self.after.dport}"


def flow_output(outcomes: Iterable[Outcome]) -> str:
    """The distinct labels of the outcomes in order, comma separated: the "output" column of
    kube-proxy's packet-flow tests ("10.0.0.1:80, 10.0.0.2:80", "REJECT", "DROP" or "")."""
    return ", ".join(label for label in dict.fromkeys(o.label for o in outcomes) if label)


def _rewrite(pkt: Packet, dnat: str) -> Packet:
    if not dnat:
        return pkt
    host, port = split_hostport(dnat)
    return replace(pkt, dst=host, dport=port if port is not None else pkt.dport)


def trace_packet(
    ruleset: Ruleset,
    packet: Packet,
    *,
    hook: str,
    env: Environment | None = None,
) -> tuple[Outcome, ...]:
    """Trace the first packet of a connection arriving at `hook`: PREROUTING for a packet from
    outside the node (another host, a pod), OUTPUT for one a local process sends.

    Stages: nat PREROUTING/OUTPUT (DNAT picks the endpoint), the routing decision (a local
    destination goes to filter INPUT, others to FORWARD; locally sent packets to filter OUTPUT),
    then nat POSTROUTING for packets that leave (MASQUERADE when marked). Tables missing from
    `ruleset` are skipped.
    """
    if hook not in HOOKS:
        raise ValueError(f"hook must be one of {HOOKS}, not {hook!r}")
    env = env or Environment()
    tr = _Tracer(ruleset, env)
    outcomes: list[Outcome] = []
    passed = Walk(1.0, (), "ACCEPT", None, packet.mark, None)
    nat_walks = tr.walk(NAT, hook, packet, mark=packet.mark) if ruleset.chain(NAT, hook) else []
    for nw in nat_walks or [passed]:
        after = _rewrite(packet, nw.dnat)
        local = tr.is_local(after.dst)
        fchain = OUTPUT if hook == OUTPUT else ("INPUT" if local else "FORWARD")

        # the fields the nat stage decides; the later stages fill in the rest
        base = Outcome(
            probability=nw.probability,
            hook=hook,
            steps=nw.steps,
            verdict=nw.verdict.lower(),
            verdict_rule=nw.verdict_rule,
            dnat=nw.dnat,
            after=after,
            filter_chain=fchain,
            local_delivery=local,
            marked=bool(nw.mark),
            mark=nw.mark,
            mark_by=nw.mark_by,
            masquerade=False,
            masquerade_rule=None,
            recent_set=nw.recent_set,
            pinned=nw.pinned,
            notes=nw.notes,
        )
        if nw.verdict in ("DROP", "REJECT"):
            outcomes.append(base)
            continue
        filter_walks = (
            tr.walk(FILTER, fchain, after, mark=nw.mark) if ruleset.chain(FILTER, fchain) else []
        )
        for fw in filter_walks or [replace(passed, mark=nw.mark)]:
            filtered = replace(
                base,
                probability=nw.probability * fw.probability,
                steps=nw.steps + fw.steps,
                verdict="accept" if fw.verdict == "ACCEPT" else fw.verdict.lower(),
                verdict_rule=fw.verdict_rule,
                mark=fw.mark,
                notes=tuple(dict.fromkeys(nw.notes + fw.notes)),
            )
            leaves = filtered.verdict == "accept" and fchain != "INPUT"
            if not leaves or not ruleset.chain(NAT, "POSTROUTING"):
                outcomes.append(filtered)
                continue
            for pw in tr.walk(NAT, "POSTROUTING", after, mark=fw.mark):
                masq = pw.verdict_rule if pw.verdict in ("MASQUERADE", "SNAT") else None
                outcomes.append(
                    replace(
                        filtered,
                        probability=filtered.probability * pw.probability,
                        steps=filtered.steps + pw.steps,
                        verdict="drop" if pw.verdict in ("DROP", "REJECT") else "accept",
                        masquerade=masq is not None,
                        masquerade_rule=masq,
                        notes=tuple(dict.fromkeys(filtered.notes + pw.notes)),
                    )
                )
    return tuple(o for o in outcomes if o.probability > EPSILON)


# -- describing rules for people ---------------------------------------------------------------
def _addr_text(c: Cond) -> str:
    assert c.net is not None
    if c.net.prefixlen == c.net.max_prefixlen:
        return str(c.net.network_address)
    return str(c.net)


def describe_condition(c: Cond) -> str:
    """A short phrase for one condition: "source not in 10.244.0.0/16", "tcp dport 30080"."""
    neg = c.negate
    k = c.kind
    if k in ("src", "dst"):
        who = "source" if k == "src" else "destination"
        a = _addr_text(c)
        if "/" in a:
            return f"{who} {'not in' if neg else 'in'} {a}"
        return f"{who} {'is not' if neg else 'is'} {a}"
    if k == "proto":
        return f"not {c.args[0]}" if neg else c.args[0]
    if k in ("dport", "sport", "port"):
        return f"{k} {'not ' if neg else ''}{c.args[0].replace(':', '-')}"
    if k == "addrtype":
        which, types = c.args
        who = "source" if which == "src" else "destination"
        kind = "a local address" if types == "LOCAL" else f"of type {types}"
        return f"{who} is {'not ' if neg else ''}{kind}"
    if k == "mark":
        return f"{'not ' if neg else ''}marked {c.args[0]}"
    if k == "ctstate":
        states = ",".join(c.args)
        return f"conntrack state {'not ' if neg else ''}{states}"
    if k == "set":
        return f"{c.args[1]} {'not ' if neg else ''}in ipset {c.args[0]}"
    if k == "iface":
        return f"{'in' if c.args[0] == 'in' else 'out'} interface {'!' if neg else ''}{c.args[1]}"
    return c.args[0]


def describe_target(rule: Rule) -> str:
    """What a rule does: "-> KUBE-SVC-...", "DNAT to 10.244.1.11:80", "MARK 0x4000/0x4000"."""
    t = rule.target
    if not t:
        return "(no target: counts and goes on)"
    if t == "DNAT":
        return f"DNAT to {rule.option('--to-destination')}"
    if t == "SNAT":
        return f"SNAT to {rule.option('--to-source')}"
    if t == "MARK":
        opts = " ".join(f"{k[2:]} {v}" for k, v in rule.target_options)
        return f"MARK {opts}"
    if t == "REJECT":
        how = rule.option("--reject-with")
        return f"REJECT{f' ({how})' if how else ''}"
    if t in TERMINAL or t in NON_TERMINAL or t == "RETURN":
        extra = " ".join(k for k, _ in rule.target_options)
        return f"{t}{f' {extra}' if extra else ''}"
    return f"{'goto' if rule.goto else '->'} {t}"


def describe_rule(rule: Rule, *, skip: Iterable[str] = ("ctstate",)) -> str:
    """The comment in quotes and the conditions that made the rule match."""
    parts = []
    if rule.comment:
        parts.append(f'"{rule.comment}"')
    skipped = set(skip)
    conds = [describe_condition(c) for c in rule.conditions if c.kind not in skipped]
    r = rule.recent
    if r is not None:
        if r.action == "set":
            conds.append(f"remember the client in recent list {r.name}")
        else:
            secs = f" within {r.seconds}s" if r.seconds else ""
            conds.append(f"client seen{secs} (recent list {r.name})")
    if conds:
        parts.append(f"[{', '.join(conds)}]")
    return " ".join(parts)
