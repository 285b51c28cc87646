"""A packet's path through the live nftables `kube-proxy` table (`kproxy explain` in nftables
mode).

Pure: `parse_table` reads `nft -j list table ip kube-proxy` output, `trace` walks one new
connection's first packet through the base chains of its path (prerouting, or output for the
node's own traffic; then input or forward; then postrouting), following jumps, gotos and
verdict maps, and forks where the kernel picks at random (`numgen` maps), with the share of
each branch. Because it interprets the rules and elements the kernel holds (including dynamic
affinity entries), what it predicts is what traffic hits; an expression it does not know makes
the trace say so instead of guessing.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kproxy.errors import InputError

ACCEPT, DROP, REJECT, CONTINUE = "accept", "drop", "reject", "continue"


class Unknown(InputError):
    """An expression this tracer does not interpret."""


@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a new connection. `local` when this node sends it."""

    proto: str
    src: str
    dst: str
    dport: int
    local: bool = False


@dataclass(frozen=True, slots=True)
class Path:
    """One way the packet can go, with its share of such packets."""

    share: float
    verdict: str  # accept / drop / reject
    chains: tuple[str, ...]
    dnat: str = ""  # "ip:port" after DNAT, "" when not translated
    masquerade: bool = False


@dataclass
class Table:
    chains: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)
    hooks: dict[str, tuple[str, int]] = field(default_factory=dict)  # chain -> (hook, prio)
    sets: dict[str, list[Any]] = field(default_factory=dict)


def list_live_table(family: int) -> subprocess.CompletedProcess[str]:
    """`nft -j list table ip|ip6 kube-proxy` of this network namespace (the caller checks the
    return code: a missing table is a normal answer)."""
    fw = "ip6" if family == 6 else "ip"
    return subprocess.run(
        ["nft", "-j", "list", "table", fw, "kube-proxy"],
        capture_output=True,
        text=True,
        check=False,
    )


def parse_table(text: str) -> Table:
    t = Table()
    for item in json.loads(text).get("nftables", ()):
        if "chain" in item:
            c = item["chain"]
            t.chains.setdefault(c["name"], [])
            if "hook" in c:
                t.hooks[c["name"]] = (c["hook"], int(c.get("prio", 0)))
        elif "rule" in item:
            r = item["rule"]
            t.chains.setdefault(r["chain"], []).append(r["expr"])
        else:
            for kind in ("set", "map"):
                if kind in item:
                    t.sets[item[kind]["name"]] = item[kind].get("elem", [])
    return t


@dataclass(frozen=True, slots=True)
class _State:
    src: str
    dst: str
    dport: int
    proto: str
    mark: int = 0
    dnat: str = ""
    share: float = 1.0
    chains: tuple[str, ...] = ()


def _addr_in(addr: str, item: Any) -> bool:
    if isinstance(item, dict) and "prefix" in item:
        p = item["prefix"]
        return ipaddress.ip_address(addr) in ipaddress.ip_network(f"{p['addr']}/{p['len']}")
    if isinstance(item, dict) and "range" in item:
        lo, hi = (int(ipaddress.ip_address(x)) for x in item["range"])
        return lo <= int(ipaddress.ip_address(addr)) <= hi
    return str(item) == addr


def _elem_key(e: Any) -> Any:
    if isinstance(e, dict) and "elem" in e:
        return e["elem"]["val"]
    return e


class _Tracer:
    def __init__(self, table: Table, local: frozenset[str]) -> None:
        self.t = table
        self.local = local

    # -- values --------------------------------------------------------------------------------
    def value(self, expr: Any, s: _State) -> Any:
        if isinstance(expr, dict):
            if "payload" in expr:
                field_ = expr["payload"]["field"]
                if field_ == "saddr":
                    return s.src
                if field_ == "daddr":
                    return s.dst
                if field_ == "dport":
                    return s.dport
            if "meta" in expr:
                key = expr["meta"]["key"]
                if key == "l4proto":
                    return s.proto
                if key == "mark":
                    return s.mark
            if "fib" in expr:
                addr = s.src if "saddr" in expr["fib"]["flags"] else s.dst
                return "local" if addr in self.local else "unicast"
            if "ct" in expr and expr["ct"]["key"] == "status":
                return ("dnat",) if s.dnat else ()
            if "ct" in expr and expr["ct"]["key"] == "state":
                return ("new",)  # the first packet of a connection
            if "concat" in expr:
                return tuple(self.value(x, s) for x in expr["concat"])
            if "&" in expr:
                a, b = expr["&"]
                return int(self.value(a, s)) & int(b)
        raise Unknown(json.dumps(expr))

    def member(self, value: Any, right: Any) -> bool:
        """`value` against a match's right side: a value, a prefix, an inline or named set."""
        if isinstance(right, str) and right.startswith("@"):
            items: Iterable[Any] = (_elem_key(e) for e in self.t.sets.get(right[1:], ()))
        elif isinstance(right, dict) and "set" in right:
            items = right["set"]
        else:
            items = (right,)
        for item in items:
            if isinstance(value, tuple):
                parts = item.get("concat") if isinstance(item, dict) else None
                if (
                    parts is not None
                    and len(parts) == len(value)
                    and all(_eq(v, p) for v, p in zip(value, parts, strict=True))
                ):
                    return True
            elif _eq(value, item):
                return True
        return False

    def lookup(self, key: Any, data: Any) -> list[tuple[Any, float]]:
        """The value(s) a map gives for `key`; a numgen key gives every element with its share."""
        elems = self.t.sets.get(data[1:], []) if isinstance(data, str) else data["set"]
        if isinstance(key, dict) and "numgen" in key:
            mod = int(key["numgen"]["mod"])
            out = []
            for k, v in elems:
                k = _elem_key(k)
                lo, hi = k["range"] if isinstance(k, dict) and "range" in k else (k, k)
                out.append((v, (int(hi) - int(lo) + 1) / mod))
            return out
        for k, v in elems:
            if self.member(key, _elem_key(k)):
                return [(v, 1.0)]
        return []

    def numgen_lookup(self, key: Any, data: Any, s: _State) -> list[tuple[Any, float]]:
        """`a . b . c . numgen random mod N` in a map: the elements whose leading parts match
        the packet, each with a 1/N share (an index with no element is a miss)."""
        *parts, gen = key["concat"]
        mod = int(gen["numgen"]["mod"])
        want = tuple(self.value(x, s) for x in parts)
        elems = self.t.sets.get(data[1:], []) if isinstance(data, str) else data["set"]
        out = []
        seen: set[int] = set()
        for k, v in elems:
            got = _elem_key(k)
            items = got.get("concat") if isinstance(got, dict) else None
            if items is None or len(items) != len(want) + 1:
                continue
            index = int(items[-1])
            if index in seen or not 0 <= index < mod:
                continue
            if all(_eq(w, i) for w, i in zip(want, items, strict=False)):
                seen.add(index)
                out.append((v, 1 / mod))
        return out

    # -- chains --------------------------------------------------------------------------------
    def chain(self, name: str, s: _State, depth: int = 0) -> list[tuple[_State, str]]:
        if depth > 64:
            raise Unknown(f"chain depth at {name}")
        s = replace(s, chains=(*s.chains, name))
        return self.rules(self.t.chains.get(name, []), 0, 0, s, depth)

    def rules(
        self, rules: Sequence[list[dict[str, Any]]], ri: int, si: int, s: _State, depth: int
    ) -> list[tuple[_State, str]]:
        while ri < len(rules):
            stmts = rules[ri]
            out, s = self.stmts(rules, ri, stmts, si, s, depth)
            if out is not None:
                return out
            ri, si = ri + 1, 0
        return [(s, CONTINUE)]

    def stmts(
        self,
        rules: Sequence[list[dict[str, Any]]],
        ri: int,
        stmts: list[dict[str, Any]],
        si: int,
        s: _State,
        depth: int,
    ) -> tuple[list[tuple[_State, str]] | None, _State]:
        """Evaluate one rule from statement `si`: (outcomes, _) when it decides, or (None,
        state) when the packet goes on to the next rule in `state` (a mark may have changed)."""
        for i in range(si, len(stmts)):
            st = stmts[i]
            if "match" in st:
                m = st["match"]
                if m["op"] == "in":
                    hit = m["right"] in self.value(m["left"], s)
                else:
                    hit = self.member(self.value(m["left"], s), m["right"])
                if hit == (m["op"] == "!="):
                    return None, s
            elif "jump" in st or "goto" in st:
                kind = "jump" if "jump" in st else "goto"
                return self.verdict(kind, st[kind]["target"], rules, ri, stmts, i, s, depth), s
            elif "vmap" in st:
                v = st["vmap"]
                found = self.lookup(
                    self.value(v["key"], s) if "numgen" not in v["key"] else v["key"], v["data"]
                )
                if not found:
                    return None, s
                out: list[tuple[_State, str]] = []
                for verdict, share in found:
                    branch = replace(s, share=s.share * share)
                    kind, target = _verdict(verdict)
                    got = self.verdict(kind, target, rules, ri, stmts, i, branch, depth)
                    out.extend(
                        got if got is not None else self.rules(rules, ri + 1, 0, branch, depth)
                    )
                return out, s
            elif "dnat" in st:
                d = st["dnat"]
                addr = d["addr"]
                if isinstance(addr, dict) and "map" in addr:
                    key = addr["map"]["key"]
                    if _numgen_concat(key):  # the fast path's shared maps
                        found = self.numgen_lookup(key, addr["map"]["data"], s)
                    else:
                        found = self.lookup(key, addr["map"]["data"])
                    outs = []
                    for target, share in found:
                        ip, port = target["concat"]
                        outs.append(
                            (
                                replace(
                                    s,
                                    dnat=_hostport(ip, port),
                                    dst=ip,
                                    dport=int(port),
                                    share=s.share * share,
                                ),
                                ACCEPT,
                            )
                        )
                    missed = 1.0 - sum(share for _, share in found)
                    if missed > 1e-9:  # a lookup that misses: no translation, next rule
                        rest = replace(s, share=s.share * missed)
                        outs.extend(self.rules(rules, ri + 1, 0, rest, depth))
                    return outs, s
                ip, port = str(addr), int(d.get("port", s.dport))
                return [(replace(s, dnat=_hostport(ip, port), dst=ip, dport=port), ACCEPT)], s
            elif "mangle" in st:
                m = st["mangle"]
                if m["key"] != {"meta": {"key": "mark"}}:
                    raise Unknown(json.dumps(st))
                op, (_, n) = next(iter(m["value"].items()))
                mark = s.mark | int(n) if op == "|" else s.mark ^ int(n)
                s = replace(s, mark=mark)
            elif "masquerade" in st:
                return [(s, "masquerade")], s
            elif "drop" in st:
                return [(s, DROP)], s
            elif "reject" in st:
                return [(s, REJECT)], s
            elif "accept" in st:
                return [(s, ACCEPT)], s
            elif "return" in st:
                return [(s, CONTINUE)], s
            elif "set" in st or "update" in st or "counter" in st or "log" in st:
                continue
            else:
                raise Unknown(json.dumps(st))
        return None, s

    def verdict(
        self,
        kind: str,
        target: str,
        rules: Sequence[list[dict[str, Any]]],
        ri: int,
        stmts: list[dict[str, Any]],
        i: int,
        s: _State,
        depth: int,
    ) -> list[tuple[_State, str]] | None:
        if kind in (DROP, ACCEPT, REJECT):
            return [(s, kind)]
        sub = self.chain(target, s, depth + 1)
        if kind == "goto":
            return sub
        out: list[tuple[_State, str]] = []
        for st, v in sub:  # a jump that falls through resumes after the jumping statement
            if v == CONTINUE:
                rest, st = self.stmts(rules, ri, stmts, i + 1, st, depth)
                out.extend(rest if rest is not None else self.rules(rules, ri + 1, 0, st, depth))
            else:
                out.append((st, v))
        return out


def _numgen_concat(key: Any) -> bool:
    parts = key.get("concat") if isinstance(key, dict) else None
    if not isinstance(parts, list) or not parts:
        return False
    return isinstance(parts[-1], dict) and "numgen" in parts[-1]


def _verdict(v: Any) -> tuple[str, str]:
    if isinstance(v, dict):
        for kind in ("goto", "jump"):
            if kind in v:
                return kind, v[kind]["target"]
        for kind in (DROP, ACCEPT, REJECT):
            if kind in v:
                return kind, ""
    raise Unknown(json.dumps(v))


def _eq(value: Any, item: Any) -> bool:
    if isinstance(value, str) and ("." in value or ":" in value):
        try:
            return _addr_in(value, item)
        except ValueError:
            return False
    return str(value) == str(item)


def _hostport(ip: str, port: Any) -> str:
    return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"


def _base(table: Table, hook: str) -> list[str]:
    return [
        c
        for c, _ in sorted(
            ((c, p) for c, (h, p) in table.hooks.items() if h == hook), key=lambda x: x[1]
        )
    ]


def trace(table: Table, packet: Packet, *, local: Iterable[str]) -> list[Path]:
    """Every path of `packet` through `table`'s hooks, merged by outcome."""
    tr = _Tracer(table, frozenset(local))
    start = _State(src=packet.src, dst=packet.dst, dport=packet.dport, proto=packet.proto)
    first = ("output",) if packet.local else ("prerouting",)
    states = [(start, ACCEPT)]
    for hook in first:
        states = _run_hook(tr, table, hook, states)
    done: list[tuple[_State, str]] = [x for x in states if x[1] != ACCEPT]
    live = [x for x in states if x[1] == ACCEPT]
    after = []
    for st, v in live:
        second = "output" if packet.local else ("input" if st.dst in tr.local else "forward")
        after.extend(_run_hook(tr, table, second, [(st, v)]) if not packet.local else [(st, v)])
    done.extend(x for x in after if x[1] != ACCEPT)
    paths: dict[tuple[str, str, bool, tuple[str, ...]], float] = {}
    for st, v in after:
        if v != ACCEPT:
            continue
        post = tr.chain  # postrouting: masquerade or not
        masq = False
        for name in _base(table, "postrouting"):
            for _st2, v2 in post(name, st):
                masq = masq or v2 == "masquerade"
        key = (ACCEPT, st.dnat, masq, st.chains)
        paths[key] = paths.get(key, 0.0) + st.share
    for st, v in done:
        key = (v, st.dnat, False, st.chains)
        paths[key] = paths.get(key, 0.0) + st.share
    return [
        Path(share=share, verdict=v, chains=chains, dnat=dnat, masquerade=masq)
        for (v, dnat, masq, chains), share in sorted(paths.items(), key=lambda kv: -kv[1])
    ]


def _run_hook(
    tr: _Tracer, table: Table, hook: str, states: list[tuple[_State, str]]
) -> list[tuple[_State, str]]:
    for name in _base(table, hook):
        nxt: list[tuple[_State, str]] = []
        for st, v in states:
            if v != ACCEPT:
                nxt.append((st, v))
                continue
            for st2, v2 in tr.chain(name, st):
                nxt.append((st2, ACCEPT if v2 in (CONTINUE, "masquerade") else v2))
        states = nxt
    return states


def render_paths(packet: Packet, paths: Sequence[Path]) -> str:
    out = [f"{packet.proto} {packet.src} -> {packet.dst}:{packet.dport}"]
    for p in paths:
        what = {ACCEPT: "accepted", DROP: "DROPPED", REJECT: "REJECTED"}.get(p.verdict, p.verdict)
        line = f"  {p.share * 100:5.1f}%  {what}"
        if p.dnat:
            line += f", DNAT to {p.dnat}"
        if p.masquerade:
            line += ", masqueraded"
        out.append(line)
        out.append("          via " + " -> ".join(p.chains))
    return "\n".join(out) + "\n"


def endpoint_shares(paths: Sequence[Path]) -> Mapping[str, float]:
    out: dict[str, float] = {}
    for p in paths:
        if p.dnat:
            out[p.dnat] = out.get(p.dnat, 0.0) + p.share
    return out
