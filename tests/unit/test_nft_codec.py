"""The bytes of kproxy.backends.nft_netlink, decoded by this file's own parser (struct only, no
kproxy netlink helper) and printed the way libnftnl prints expressions and elements.

The expected lines are what `nft --debug=netlink` (nft 1.0.6, libnftnl 1.2.4) printed for the
same statements in `nft -f` input, captured once and pasted here: an oracle independent of the
codec. Set and chain messages are checked attribute by attribute against the uapi numbers
(linux/netfilter/nf_tables.h). No root, no socket."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kproxy.backends import nft_netlink as N
from kproxy.backends.netlink import NLM_F_APPEND, NLM_F_CREATE
from kproxy.model.objects import EndpointPort
from kproxy.model.options import ProxyOptions
from kproxy.model.view import ServicePortView, service_views
from kproxy.render.nftables import (
    Dnat,
    DnatMap,
    Element,
    FibSaddrLocal,
    Jump,
    NumgenVmap,
    Op,
    Renderer,
    SaddrIn,
    SaddrInSet,
    SetDef,
    Stmt,
    UpdateSaddr,
    shared_sets,
)
from tests.support.builders import make_endpoint, make_port, make_service, make_slice
from tests.unit.test_render_nftables import V4, V6

GOLDEN = Path(__file__).parent / "golden"

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
        key = {16: "l4proto", 3: "mark"}[u32(a, 2)]
        if get(a, 3) is not None:
            return f"meta set {key} with reg {u32(a, 3)}"
        return f"meta load {key} => reg {u32(a, 1)}"
    if name == "ct":
        return f"ct load {({0: 'state', 2: 'status'})[u32(a, 2)]} => reg {u32(a, 1)}"
    if name == "masq":
        return f"masq flags 0x{u32(a, 1):x}"
    if name == "reject":
        code = get(a, 2) or b""
        assert len(code) == 1  # a u8
        return f"reject type {u32(a, 1)} code {code[0]}"
    if name == "immediate":
        return f"immediate reg {u32(a, 1)} {data(get(a, 2) or b'')}"
    if name == "lookup":
        dreg = f" dreg {u32(a, 3)}" if get(a, 3) is not None else ""
        flags = f" 0x{u32(a, 5):x}" if get(a, 5) is not None else ""
        return f"lookup reg {u32(a, 2)} set {text(a, 1)}{dreg}{flags}"
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


# -- full syncs (kproxy.backends.nft_netlink.FullSync) ------------------------------------------
def _printable(raw: bytes) -> str:
    """Userdata as nft prints it: printable characters as they are, others as \\xNN."""
    return "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in raw)


def debug_lines(msgs: list[tuple[int, int, bytes]], family: int) -> str:
    """The rules and anonymous sets of a batch as `nft --debug=netlink` prints them (the other
    messages print nothing here)."""
    fw = "ip6" if family == 6 else "ip"
    out: list[str] = []
    for kind, _, body in msgs:
        a = attrs(body)
        if kind == N.MSG_NEWRULE:
            out.append(f"{fw} {text(a, 1)} {text(a, 2)}")
            for _, elem in attrs(get(a, 4) or b""):
                e = attrs(elem)
                out.append(f"  [ {expression(text(e, 1), attrs(get(e, 2) or b''))} ]")
            udata = get(a, 7)
            if udata is not None:
                out.append(f"  userdata = {{ {_printable(udata)} }}")
            else:
                out.append("")
        elif kind == N.MSG_NEWSET and text(a, 2).startswith("__"):
            size = u32(attrs(get(a, 9) or b""), 1)
            out.append(f"{text(a, 2)} {text(a, 1)} {u32(a, 3):x} size {size}")
        elif kind == N.MSG_NEWSETELEM and text(a, 2).startswith("__"):
            out.append(f"{text(a, 2)} {text(a, 1)} 0")
            out.append("\t" + "\t".join(element_lines(body)))
    return "\n".join(out).rstrip() + "\n"


FIXED = {
    "ipv4": V4,
    "ipv6": V6,
    "masquerade-all-nodeport-ips": ProxyOptions(
        node_name="node1", masquerade_all=True, nodeport_ips=("192.168.0.2",)
    ),
    "two-cluster-cidrs": ProxyOptions(
        node_name="node1", cluster_cidrs=("10.0.0.0/16", "10.2.0.0/16")
    ),
}


@pytest.mark.parametrize("case", sorted(FIXED))
def test_full_sync_fixed_rules_are_what_nft_sends(case: str) -> None:
    """Every rule of the fixed chains (ct state/status, fib daddr, daddr prefixes and sets,
    concatenated vmaps, meta mark match/set, masquerade, reject with a comment, an anonymous
    interval set for several cluster CIDRs), against tests/unit/golden/nft-netlink-fixed-*.txt:
    what `nft --debug=netlink -f` printed for the text of the same full sync's head."""
    options = FIXED[case]
    enc = N.FullSync(Renderer(options))
    enc.begin()
    want = (GOLDEN / f"nft-netlink-fixed-{case}.txt").read_text()
    assert debug_lines(enc.messages, options.family) == want


RULES_FIXED: list[tuple[int, tuple[Stmt, ...], str]] = [
    (
        4,
        (SaddrIn(("10.0.0.0/9", "10.128.0.0/9", "192.168.0.0/24")), Jump("accept")),
        """__set%d kube-proxy 7 size 5
        __set%d kube-proxy 0
        \telement 00000000  : 1 [end]\telement 0000000a  : 0 [end]\telement 0000000b  : 1 [end]"""
        """\telement 0000a8c0  : 0 [end]\telement 0001a8c0  : 1 [end]
        ip kube-proxy c
          [ payload load 4b @ network header + 12 => reg 1 ]
          [ lookup reg 1 set __set%d ]
          [ immediate reg 0 accept ]""",
    ),
    (
        4,
        (SaddrIn(("0.0.0.0/1", "240.0.0.0/4")), Jump("accept")),
        """__set%d kube-proxy 7 size 4
        __set%d kube-proxy 0
        \telement 00000000  : 0 [end]\telement 00000080  : 1 [end]\telement 000000f0  : 0 [end]"""
        """  userdata = b'\\\\x01\\\\x04\\\\x01\\\\x00\\\\x00\\\\x00'
        ip kube-proxy c
          [ payload load 4b @ network header + 12 => reg 1 ]
          [ lookup reg 1 set __set%d ]
          [ immediate reg 0 accept ]""",
    ),
    (
        6,
        (SaddrIn(("fd00::/64", "fd01::/64", "::/0"), negate=True), Jump("accept")),
        """__set%d kube-proxy 7 size 2
        __set%d kube-proxy 0
        \telement 00000000 00000000 00000000 00000000  : 0 [end]"""
        """  userdata = b'\\\\x01\\\\x04\\\\x01\\\\x00\\\\x00\\\\x00'
        ip6 kube-proxy c
          [ payload load 16b @ network header + 8 => reg 1 ]
          [ lookup reg 1 set __set%d 0x1 ]
          [ immediate reg 0 accept ]""",
    ),
    (
        6,
        (SaddrIn(("fd00:10::/64", "fd00:10:0:1::/64", "fd00::/8")), Jump("accept")),
        """__set%d kube-proxy 7 size 3
        __set%d kube-proxy 0
        \telement 00000000 00000000 00000000 00000000  : 1 [end]"""
        """\telement 000000fd 00000000 00000000 00000000  : 0 [end]"""
        """\telement 000000fe 00000000 00000000 00000000  : 1 [end]
        ip6 kube-proxy c
          [ payload load 16b @ network header + 8 => reg 1 ]
          [ lookup reg 1 set __set%d ]
          [ immediate reg 0 accept ]""",
    ),
]


@pytest.mark.parametrize(
    ("family", "stmts", "want"), RULES_FIXED, ids=[str(i) for i in range(len(RULES_FIXED))]
)
def test_several_cidrs_are_an_anonymous_interval_set(
    family: int, stmts: tuple[Stmt, ...], want: str
) -> None:
    """Merged (overlapping and adjacent prefixes), an end element at 0 unless a range starts
    there, a range open to the top flagged instead of ended: as nft 1.0.6 sends them."""
    udata = "  userdata = b'\\x01\\x04\\x01\\x00\\x00\\x00'"  # checked below
    got = debug_lines(encode_rule(stmts, family), family).replace(udata, "")
    want = want.replace(udata.replace("\\", "\\\\"), "")
    assert [ln.strip() for ln in got.splitlines()] == [ln.strip() for ln in want.splitlines()]


def test_open_interval_element_carries_the_open_flag() -> None:
    ((_, _, _), (_, _, body), _) = encode_rule((SaddrIn(("0.0.0.0/1", "240.0.0.0/4")),))
    *_, last = element_lines(body)
    assert last == "element 000000f0  : 0 [end]  userdata = b'\\x01\\x04\\x01\\x00\\x00\\x00'"


def test_full_sync_table_chains_and_shared_sets() -> None:
    """Checked attribute by attribute against the uapi numbers and what `nft --debug=mnl` showed
    nft 1.0.6 sending for the same declarations."""
    for options in (V4, V6):
        enc = N.FullSync(Renderer(options))
        enc.begin()
        msgs = [(k, f, attrs(b)) for k, f, b in enc.messages]
        (table,) = [a for k, _, a in msgs if k == N.MSG_NEWTABLE]
        assert text(table, 1) == "kube-proxy" and u32(table, 2) == 0
        assert get(table, 6) == b"\x00\x15rules for kube-proxy\x00"
        chains = {text(a, 3): a for k, _, a in msgs if k == N.MSG_NEWCHAIN}
        assert len(chains) == 17
        nat = chains["nat-prerouting"]
        assert text(nat, 7) == "nat"
        hook = attrs(get(nat, 4) or b"")
        assert (u32(hook, 1), u32(hook, 2)) == (0, -100)
        post = attrs(get(chains["filter-output-post-dnat"], 4) or b"")
        assert text(chains["filter-output-post-dnat"], 7) == "filter"
        assert (u32(post, 1), u32(post, 2)) == (3, -90)
        assert get(chains["services"], 4) is None and get(chains["services"], 7) is None
        sets = {text(a, 2): a for k, _, a in msgs if k == N.MSG_NEWSET}
        addr, alen = (8, 16) if options.family == 6 else (7, 4)
        cip = sets["cluster-ips"]
        assert (u32(cip, 3), u32(cip, 4), u32(cip, 5)) == (0, addr, alen)
        assert get(cip, 13) == bytes.fromhex("000402000000")
        svc = sets["service-ips"]
        assert (u32(svc, 3), u32(svc, 4), u32(svc, 5)) == (8, addr << 12 | 12 << 6 | 13, alen + 8)
        assert (u32(svc, 6) & 0xFFFFFFFF, u32(svc, 7)) == (0xFFFFFF00, 0)
        assert get(svc, 13) == bytes.fromhex(
            "000400000000010400000000030800040d0000000100060400000000"
        )
        nodeports = sets["service-nodeports"]
        assert (u32(nodeports, 4), u32(nodeports, 5)) == (12 << 6 | 13, 8)
        pair = sets["hairpin-endpoints"]
        assert (u32(pair, 3), u32(pair, 4), u32(pair, 5)) == (0, addr << 6 | addr, 2 * alen)
        assert get(pair, 13) == bytes.fromhex("000400000000030800040d0000000100")
        # flushes: every chain (DELRULE with a chain name) and every shared set (DELSETELEM
        # without elements)
        flushed = [text(a, 2) for k, _, a in msgs if k == N.MSG_DELRULE]
        assert sorted(flushed) == sorted(chains)
        emptied = [text(a, 2) for k, _, a in msgs if k == N.MSG_DELSETELEM]
        assert sorted(emptied) == sorted(s.name for s in shared_sets(options.family))
        assert all(get(a, 3) is None for k, _, a in msgs if k == N.MSG_DELSETELEM)


def _fast(family: int) -> tuple[ServicePortView, ...]:
    """A fast-path service: what the captured lines below were printed for."""
    if family == 4:
        svc = make_service(
            cluster_ips=("172.30.0.45",), ports=(make_port(53, name="p53", protocol="UDP"),)
        )
        eps = [make_endpoint("10.180.0.7"), make_endpoint("10.180.0.8")]
        sl = make_slice(endpoints=eps, ports=[EndpointPort(name="p53", port=5353, protocol="UDP")])
    else:
        svc = make_service(
            cluster_ips=("fd00:30::42",), ports=(make_port(53, name="p53", protocol="SCTP"),)
        )
        sl = make_slice(
            address_type="IPv6",
            endpoints=[make_endpoint("fd00:10::3")],
            ports=[EndpointPort(name="p53", port=5353, protocol="SCTP")],
        )
    return service_views(svc, [sl], family=family, node_name="node1")


# `nft --debug=netlink` of `add element ... { 172.30.0.45 . udp . 53 . 0 : 10.180.0.7 . 5353,
# ... }` into the fast-path maps, cluster-ips and hairpin-endpoints (captured once)
FAST_ELEMENTS = {
    4: {
        "cluster-ips": ["element 2d001eac  : 0 [end]"],
        "cluster-endpoints-2": [
            "element 2d001eac 00000011 00003500 00000000  : 0700b40a 0000e914 0 [end]",
            "element 2d001eac 00000011 00003500 00000001  : 0800b40a 0000e914 0 [end]",
        ],
        "hairpin-endpoints": [
            "element 0700b40a 0700b40a  : 0 [end]",
            "element 0800b40a 0800b40a  : 0 [end]",
        ],
    },
    6: {
        "cluster-endpoints-1": [
            "element 300000fd 00000000 00000000 42000000 00000084 00003500 00000000  : "
            "100000fd 00000000 00000000 03000000 0000e914 0 [end]"
        ],
        "hairpin-endpoints": [
            "element 100000fd 00000000 00000000 03000000 100000fd 00000000 00000000 03000000  "
            ": 0 [end]"
        ],
    },
}


@pytest.mark.parametrize("family", [4, 6])
def test_fast_path_elements_from_views_are_what_nft_sends(family: int) -> None:
    """A fast-path service encoded straight from its views gives the bytes of its rendered
    block's elements (the per-Element encoder above), and those print as nft's."""
    options = V4 if family == 4 else V6
    renderer = Renderer(options)
    views = _fast(family)
    direct = N.FullSync(renderer)
    assert direct.service(views)
    direct.end([], [])
    via_block = N.FullSync(renderer)
    via_block.block(renderer.render_service(views), lambda s: False)
    via_block.end([], [])
    assert direct.messages == via_block.messages
    lines = {
        text(attrs(body), 2): element_lines(body)
        for kind, _, body in direct.messages
        if kind == N.MSG_NEWSETELEM
    }
    for name, want in FAST_ELEMENTS[family].items():
        assert lines[name] == want
    # the map is created afresh where first used (add, delete, add), its rule follows
    kinds = [(k, text(attrs(b), 2)) for k, _, b in direct.messages if k != N.MSG_NEWSETELEM]
    n = len(views[0].decision.internal)
    name = f"cluster-endpoints-{n}"
    assert kinds == [
        (N.MSG_NEWSET, name),
        (N.MSG_DELSET, name),
        (N.MSG_NEWSET, name),
        (N.MSG_NEWRULE, "cluster-endpoints"),
    ]


def test_a_service_off_the_fast_path_is_not_taken() -> None:
    nodeport = make_service(type="NodePort", ports=(make_port(80, node_port=30080),))
    views = service_views(nodeport, [make_slice()], family=4, node_name="node1")
    enc = N.FullSync(Renderer(V4))
    assert not enc.service(views)
    assert enc.messages == []


def test_elements_are_split_below_the_attribute_limit() -> None:
    enc = N.FullSync(Renderer(V4))
    for i in range(3000):
        svc = make_service("ns", f"s{i}", cluster_ips=(f"172.30.{i // 256}.{i % 256}",))
        sl = make_slice("ns", f"s{i}", endpoints=[make_endpoint(f"10.1.{i // 256}.{i % 256}")])
        assert enc.service(service_views(svc, [sl], family=4, node_name="node1"))
    enc.end([], [])
    sizes = [len(b) for k, _, b in enc.messages if k == N.MSG_NEWSETELEM]
    assert len(sizes) > 3 and max(sizes) < 65535
    total = sum(len(element_lines(b)) for k, _, b in enc.messages if k == N.MSG_NEWSETELEM)
    assert total == 3 * 3000  # cluster-ips, cluster-endpoints-1, hairpin-endpoints
