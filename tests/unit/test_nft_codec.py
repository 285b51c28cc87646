"""The bytes of kproxy.backends.nft_netlink, decoded by this file's own parser (struct only, no
kproxy netlink helper) and printed the way libnftnl prints expressions and elements.

The expected lines are what `nft --debug=netlink` (nft 1.0.6, libnftnl 1.2.4) printed for the
same statements in `nft -f` input, captured once and pasted here: an oracle independent of the
codec. Set and chain messages are checked attribute by attribute against the uapi numbers
(linux/netfilter/nf_tables.h). No root, no socket."""

from __future__ import annotations

import struct

import pytest

from kproxy.backends import nft_netlink as N
from kproxy.backends.netlink import NLM_F_APPEND, NLM_F_CREATE
from kproxy.render.nftables import (
    Dnat,
    DnatMap,
    Element,
    FibSaddrLocal,
    Jump,
    NumgenVmap,
    Op,
    SaddrIn,
    SaddrInSet,
    SetDef,
    Stmt,
    UpdateSaddr,
    shared_sets,
)

Attrs = list[tuple[int, bytes]]


def attrs(buf: bytes) -> Attrs:
    out, off = [], 0
    while off + 4 <= len(buf):
        length, kind = struct.unpack_from("=HH", buf, off)
        out.append((kind & 0x3FFF, buf[off + 4 : off + length]))
        off += (length + 3) & ~3
    return out


def get(a: Attrs, kind: int) -> bytes | None:
    return next((p for k, p in a if k == kind), None)


def u32(a: Attrs, kind: int) -> int:
    raw = get(a, kind)
    assert raw is not None, kind
    return int(struct.unpack(">i", raw)[0])


def text(a: Attrs, kind: int) -> str:
    raw = get(a, kind)
    assert raw is not None and raw.endswith(b"\0"), kind
    return raw[:-1].decode()


def words(raw: bytes, *, prefix: str = "0x") -> str:
    raw += b"\0" * (-len(raw) & 3)
    return " ".join(f"{prefix}{w:08x}" for w in struct.unpack(f"<{len(raw) // 4}I", raw))


def verdict(nested: bytes) -> str:
    """NFTA_DATA_VERDICT {CODE, CHAIN} as libnftnl prints it."""
    v = attrs(nested)
    names = {0: "drop", 1: "accept", -3: "jump", -4: "goto", -5: "return"}
    name = names[u32(v, 1)]
    return f"{name} -> {text(v, 2)}" if get(v, 2) is not None else name


def data(nested: bytes, *, prefix: str = "0x") -> str:
    (kind, payload), *_ = attrs(nested)
    return verdict(payload) if kind == 2 else words(payload, prefix=prefix)


def expression(name: str, a: Attrs) -> str:
    """One expression in libnftnl's debug syntax (the subset nft_netlink emits)."""
    if name == "payload":
        base = {0: "link", 1: "network", 2: "transport"}[u32(a, 2)]
        return f"payload load {u32(a, 4)}b @ {base} header + {u32(a, 3)} => reg {u32(a, 1)}"
    if name == "cmp":
        op = {0: "eq", 1: "neq"}[u32(a, 2)]
        return f"cmp {op} reg {u32(a, 1)} {data(get(a, 3) or b'')}"
    if name == "bitwise":
        mask, xor = data(get(a, 4) or b""), data(get(a, 5) or b"")
        return f"bitwise reg {u32(a, 2)} = ( reg {u32(a, 1)} & {mask} ) ^ {xor}"
    if name == "meta":
        return f"meta load {({16: 'l4proto'})[u32(a, 2)]} => reg {u32(a, 1)}"
    if name == "immediate":
        return f"immediate reg {u32(a, 1)} {data(get(a, 2) or b'')}"
    if name == "lookup":
        dreg = f" dreg {u32(a, 3)}" if get(a, 3) is not None else ""
        return f"lookup reg {u32(a, 2)} set {text(a, 1)}{dreg}"
    if name == "numgen":
        assert u32(a, 3) == 1 and u32(a, 4) == 0  # random, offset 0
        return f"numgen reg {u32(a, 1)} = random mod {u32(a, 2)}"
    if name == "byteorder":
        op = {0: "ntoh", 1: "hton"}[u32(a, 3)]
        return f"byteorder reg {u32(a, 2)} = {op}(reg {u32(a, 1)}, {u32(a, 5)}, {u32(a, 4)})"
    if name == "nat":
        fam = {2: "ip", 10: "ip6"}[u32(a, 2)]
        out = f"nat {({1: 'dnat'})[u32(a, 1)]} {fam} addr_min reg {u32(a, 3)}"
        out += f" proto_min reg {u32(a, 5)}"
        return out + (f" flags 0x{u32(a, 7):x}" if get(a, 7) is not None else "")
    if name == "fib":
        flags = {1: "saddr", 2: "daddr"}[u32(a, 3)]
        return f"fib {flags} {({3: 'type'})[u32(a, 2)]} => reg {u32(a, 1)}"
    if name == "dynset":
        return f"dynset {({1: 'update'})[u32(a, 3)]} reg_key {u32(a, 4)} set {text(a, 1)}"
    raise AssertionError(f"unexpected expression {name}")


def rule_lines(msg_attrs: bytes) -> list[str]:
    a = attrs(msg_attrs)
    assert text(a, 1) == "kube-proxy" and text(a, 2) == "c"
    out = []
    for _, elem in attrs(get(a, 4) or b""):
        e = attrs(elem)
        out.append(f"[ {expression(text(e, 1), attrs(get(e, 2) or b''))} ]")
    return out


def element_lines(msg_attrs: bytes) -> list[str]:
    """Set elements as libnftnl prints them: key words : data flags [end] (+ userdata)."""
    a = attrs(msg_attrs)
    out = []
    for _, elem in attrs(get(a, 3) or b""):
        e = attrs(elem)
        line = f"element {data(get(e, 1) or b'', prefix='')}  : "
        if get(e, 2) is not None:
            line += data(get(e, 2) or b"", prefix="") + " "
        line += f"{u32(e, 3) if get(e, 3) is not None else 0} [end]"
        udata = get(e, 6)
        if udata is not None:
            line += f"  userdata = {udata!r}"
        out.append(line)
    return out


def encode_rule(stmts: tuple[Stmt, ...], family: int = 4) -> list[tuple[int, int, bytes]]:
    enc = N.Encoder(family)
    enc.rule("c", stmts)
    return enc.messages


# statement -> what `nft --debug=netlink` printed for the same rule (see the module docstring)
RULES: list[tuple[int, tuple[Stmt, ...], str]] = [
    (4, (Jump("goto", "d"),), "[ immediate reg 0 goto -> d ]"),
    (
        4,
        (SaddrIn(("10.0.0.0/8",)), Jump("jump", "d")),
        """[ payload load 1b @ network header + 12 => reg 1 ]
        [ cmp eq reg 1 0x0000000a ]
        [ immediate reg 0 jump -> d ]""",
    ),
    (
        4,
        (SaddrIn(("10.1.2.0/23",), negate=True), Jump("drop")),
        """[ payload load 4b @ network header + 12 => reg 1 ]
        [ bitwise reg 1 = ( reg 1 & 0x00feffff ) ^ 0x00000000 ]
        [ cmp neq reg 1 0x0002010a ]
        [ immediate reg 0 drop ]""",
    ),
    (
        4,
        (SaddrIn(("192.168.1.5",)), Jump("return")),
        """[ payload load 4b @ network header + 12 => reg 1 ]
        [ cmp eq reg 1 0x0501a8c0 ]
        [ immediate reg 0 return ]""",
    ),
    (
        4,
        (FibSaddrLocal(), Jump("accept")),
        """[ fib saddr type => reg 1 ]
        [ cmp eq reg 1 0x00000002 ]
        [ immediate reg 0 accept ]""",
    ),
    (
        4,
        (DnatMap("tcp", "endpoints-X"),),
        """[ meta load l4proto => reg 1 ]
        [ cmp eq reg 1 0x00000006 ]
        [ numgen reg 1 = random mod 65536 ]
        [ byteorder reg 1 = hton(reg 1, 4, 4) ]
        [ lookup reg 1 set endpoints-X dreg 1 ]
        [ nat dnat ip addr_min reg 1 proto_min reg 9 ]""",
    ),
    (
        4,
        (Dnat("udp", "10.1.0.1", 53),),
        """[ meta load l4proto => reg 1 ]
        [ cmp eq reg 1 0x00000011 ]
        [ immediate reg 1 0x0100010a ]
        [ immediate reg 2 0x00003500 ]
        [ nat dnat ip addr_min reg 1 proto_min reg 2 flags 0x2 ]""",
    ),
    (
        4,
        (SaddrInSet("aff"), Jump("goto", "d")),
        """[ payload load 4b @ network header + 12 => reg 1 ]
        [ lookup reg 1 set aff ]
        [ immediate reg 0 goto -> d ]""",
    ),
    (
        4,
        (UpdateSaddr("aff"),),
        """[ payload load 4b @ network header + 12 => reg 1 ]
        [ dynset update reg_key 1 set aff ]""",
    ),
    (
        6,
        (DnatMap("udp", "endpoints-X"),),
        """[ meta load l4proto => reg 1 ]
        [ cmp eq reg 1 0x00000011 ]
        [ numgen reg 1 = random mod 65536 ]
        [ byteorder reg 1 = hton(reg 1, 4, 4) ]
        [ lookup reg 1 set endpoints-X dreg 1 ]
        [ nat dnat ip6 addr_min reg 1 proto_min reg 2 ]""",
    ),
    (
        6,
        (Dnat("tcp", "fd00::1", 80),),
        """[ meta load l4proto => reg 1 ]
        [ cmp eq reg 1 0x00000006 ]
        [ immediate reg 1 0x000000fd 0x00000000 0x00000000 0x01000000 ]
        [ immediate reg 2 0x00005000 ]
        [ nat dnat ip6 addr_min reg 1 proto_min reg 2 flags 0x2 ]""",
    ),
    (
        6,
        (SaddrIn(("fd00::/64",)), Jump("accept")),
        """[ payload load 8b @ network header + 8 => reg 1 ]
        [ cmp eq reg 1 0x000000fd 0x00000000 ]
        [ immediate reg 0 accept ]""",
    ),
]


@pytest.mark.parametrize(
    ("family", "stmts", "want"),
    RULES,
    ids=[f"ipv{f}-{type(s[0]).__name__}-{i}" for i, (f, s, _) in enumerate(RULES)],
)
def test_rule_expressions_are_what_nft_sends(
    family: int, stmts: tuple[Stmt, ...], want: str
) -> None:
    ((kind, flags, body),) = encode_rule(stmts, family)
    assert kind == N.MSG_NEWRULE and flags == NLM_F_CREATE | NLM_F_APPEND
    assert rule_lines(body) == [line.strip() for line in want.splitlines()]


def test_numgen_vmap_is_an_anonymous_map_and_a_lookup() -> None:
    (s_kind, _, s_body), (e_kind, _, e_body), (r_kind, _, r_body) = encode_rule(
        (NumgenVmap(("c", "d")),)
    )
    assert (s_kind, e_kind, r_kind) == (N.MSG_NEWSET, N.MSG_NEWSETELEM, N.MSG_NEWRULE)
    s = attrs(s_body)
    # anonymous|constant|map; integer key of 4 bytes; verdict data; 2 elements; batch set id
    assert text(s, 2) == "__map%d" and u32(s, 3) == 0x1 | 0x2 | 0x8
    assert (u32(s, 5), u32(s, 6) & 0xFFFFFFFF) == (4, 0xFFFFFF00)
    assert u32(attrs(get(s, 9) or b""), 1) == 2
    # nft: element 00000000  : goto -> c 0 [end]	element 00000001  : goto -> d 0 [end]
    assert u32(attrs(e_body), 4) == u32(s, 10)
    assert element_lines(e_body) == [
        "element 00000000  : goto -> c 0 [end]",
        "element 00000001  : goto -> d 0 [end]",
    ]
    assert rule_lines(r_body) == [
        "[ numgen reg 1 = random mod 2 ]",
        "[ lookup reg 1 set __map%d dreg 0 ]",
    ]


def _ops(*ops: Op, family: int = 4) -> list[tuple[int, int, bytes]]:
    types = {s.name: s.key for s in shared_sets(family)}
    return N.encode_ops(list(ops), family, types).messages


def test_elements_are_what_nft_sends() -> None:
    svc = Element("service-ips", ("10.96.0.1", "tcp", "80"), "goto c", "ns/svc:http")
    eps = [
        Element("endpoints-Y", ("0-32767",), "10.1.0.1 . 80"),
        Element("endpoints-Y", ("32768-65535",), "10.1.0.2 . 8080"),
    ]
    msgs = _ops(
        Op("add-element", element=svc),
        Op("add-element", element=Element("cluster-ips", ("10.96.0.1",))),
        *(Op("add-element", element=e) for e in eps),
        Op("delete-element", element=svc),
    )
    kinds = [(k, f) for k, f, _ in msgs]
    new, delete = (N.MSG_NEWSETELEM, NLM_F_CREATE), (N.MSG_DELSETELEM, 0)
    assert kinds == [new, new, new, delete]  # one message per run of one set
    names = [text(attrs(body), 2) for _, _, body in msgs]
    assert names == ["service-ips", "cluster-ips", "endpoints-Y", "service-ips"]
    lines = [element_lines(body) for _, _, body in msgs]
    assert lines == [
        [
            "element 0100600a 00000006 00005000  : goto -> c 0 [end]"
            "  userdata = b'\\x00\\x0cns/svc:http\\x00'"
        ],
        ["element 0100600a  : 0 [end]"],
        [
            "element 00000000  : 0100010a 00005000 0 [end]",
            "element 00800000  : 1 [end]",
            "element 00800000  : 0200010a 0000901f 0 [end]",
            "element 00000100  : 1 [end]",
        ],
        ["element 0100600a 00000006 00005000  : 0 [end]"],
    ]


def test_sets_and_chains() -> None:
    aff = SetDef("aff", ("ipv4_addr",), flags=("dynamic", "timeout"), timeout=30)
    ep = SetDef(
        "endpoints-Y",
        ("integer",),
        "endpoint",
        flags=("interval",),
        typeof="numgen random mod 65536 : ip daddr . tcp dport",
    )
    msgs = _ops(
        Op("add-chain", "c"),
        Op("add-set", setdef=aff),
        Op("add-set", setdef=ep),
        Op("flush-chain", "c"),
        Op("delete-chain", "c"),
        Op("delete-set", "aff"),
    )
    kinds = [k for k, _, _ in msgs]
    assert kinds == [
        N.MSG_NEWCHAIN,
        N.MSG_NEWSET,
        N.MSG_NEWSET,
        N.MSG_DELRULE,
        N.MSG_DELCHAIN,
        N.MSG_DELSET,
    ]
    a = [attrs(body) for _, _, body in msgs]
    assert all(text(x, 1) == "kube-proxy" for x in a)
    assert text(a[0], 3) == "c" and text(a[3], 2) == "c" and text(a[4], 3) == "c"
    assert text(a[5], 2) == "aff"
    # nft: flags 0x30 (timeout|eval), ipv4_addr (7) of 4 bytes, timeout 30000 ms (be64)
    s = a[1]
    assert (text(s, 2), u32(s, 3), u32(s, 4), u32(s, 5)) == ("aff", 0x30, 7, 4)
    assert struct.unpack(">Q", get(s, 11) or b"") == (30000,)
    # the endpoint map: interval|map, 4-byte key, data ipv4_addr . inet_service (7 << 6 | 13)
    # of 8 bytes (two registers); a set id of its own
    m = a[2]
    assert (text(m, 2), u32(m, 3), u32(m, 5)) == ("endpoints-Y", 0x4 | 0x8, 4)
    assert (u32(m, 6), u32(m, 7)) == (7 << 6 | 13, 8)
    assert u32(m, 10) != u32(s, 10)
