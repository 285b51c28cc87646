"""nf_tables over a persistent netlink socket: the ops of kproxy.render.nftables encoded as one
NFNL batch, without the nft command's per-call cache fetch, and without nft at all for full
syncs.

Why: `nft -f` (and libnftables) first dumps the table's chains and sets to build its cache, on
every call; at 10k services that costs more than the kernel's commit. And for a full sync, nft
1.0.6 reads its whole input before it parses, evaluates and commits it: parsing and evaluating
8 MB of text at 10k services x 10 endpoints costs more than the kernel's commit of the same
table. This module encodes what kproxy writes itself, from the renderer's typed statements:

- partial syncs (`encode_ops`): add/flush/delete chain, add rule, add/delete set and set
  elements, one `sendmsg` whose duration is the kernel's commit;
- full syncs (`FullSync`): the transaction `kproxy.render.nftables.full_chunks` writes as
  text, message for message (table, chains, shared sets, flushes, the fixed chains' rules,
  every service, the fast-path maps, stale chains and sets deleted), the elements of the
  fast-path services encoded straight from their views. One batch, so one atomic transaction
  like the `nft -f` it replaces. The text is still what `kproxy render` prints, what the
  refusal search probes with `nft --check`, and the fallback when the kernel refuses a batch.

The expressions, sets and elements are those nft 1.0.6 generates for the same statements
(checked with `nft --debug=netlink` and `--debug=mnl`, tests/unit/test_nft_codec.py), and
integration tests apply every statement kind both ways and compare `nft list` output
(tests/integration/test_nftables_netlink.py, test_nftables_full_netlink.py). Several CIDRs in
one match become an anonymous interval set, merged as nft merges them. A statement this codec
cannot encode raises `Unencodable`; the caller then sends that batch through `nft -f`.

Netlink framing (attribute packing, message parsing, attribute scanning, namespace sockets)
is kproxy.backends.netlink, shared with the IPVS and ipset codecs. Errors: the kernel processes
a batch synchronously inside `sendmsg`, so every error is queued when it returns; `apply` reads
until the acknowledgement of the batch's last message and raises `NftError` with the first
error.
"""

from __future__ import annotations

import errno as errnos
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from kproxy.backends.netlink import HDR as _HDR
from kproxy.backends.netlink import NFGEN as _NFGEN
from kproxy.backends.netlink import (
    NLA,
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    error_code,
    nest,
    netns_socket,
    parse_messages,
    scan_attrs,
)
from kproxy.backends.netlink import nla as attr
from kproxy.backends.netlink import nla_be32 as be32
from kproxy.backends.netlink import nla_be64 as be64
from kproxy.backends.netlink import nla_string as string
from kproxy.errors import DataplaneError
from kproxy.model.objects import IPV6
from kproxy.model.view import ServicePortView
from kproxy.render.nftables import (
    BASE_CHAINS,
    CLUSTER_ENDPOINTS,
    CLUSTER_IPS,
    COUNT_MAP_PREFIX,
    FIXED_CHAINS,
    HAIRPIN,
    SLOTS,
    TABLE,
    Comment,
    CtState,
    DaddrIn,
    DaddrInSet,
    Dnat,
    DnatMap,
    DnatShared,
    Element,
    FibDaddrLocal,
    FibSaddrLocal,
    Jump,
    MarkSet,
    MarkZero,
    Masquerade,
    NumgenVmap,
    Op,
    PairInSet,
    PortVmap,
    Reject,
    Renderer,
    Rule,
    SaddrIn,
    SaddrInSet,
    ServiceBlock,
    SetDef,
    Stmt,
    UpdateSaddr,
    addr_type,
    count_map,
    count_map_name,
    count_of,
    count_rule,
    is_endpoint_map,
    shared_sets,
    takes_fast_path,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11

MSG_NEWTABLE, MSG_GETTABLE = 0, 1
MSG_GETGEN = 16
MSG_NEWCHAIN, MSG_DELCHAIN = 3, 5
MSG_NEWRULE, MSG_DELRULE = 6, 8
MSG_NEWSET, MSG_DELSET = 9, 11
MSG_NEWSETELEM, MSG_DELSETELEM = 12, 14

NFPROTO = {4: 2, 6: 10}

# verdicts
NF_DROP, NF_ACCEPT = 0, 1
NFT_JUMP, NFT_GOTO, NFT_RETURN = -3, -4, -5
VERDICTS = {"drop": NF_DROP, "accept": NF_ACCEPT, "jump": NFT_JUMP, "goto": NFT_GOTO}
VERDICTS["return"] = NFT_RETURN
NFT_DATA_VERDICT = 0xFFFFFF00

# registers
REG_VERDICT, REG_1, REG_2 = 0, 1, 2
REG32_01 = 9

# set flags
SET_ANONYMOUS, SET_CONSTANT, SET_INTERVAL, SET_MAP = 0x1, 0x2, 0x4, 0x8
SET_TIMEOUT, SET_EVAL = 0x10, 0x20

# nft's datatype ids (for `nft list` to print keys and values; the kernel reads lengths only)
TYPE_INTEGER, TYPE_IPADDR, TYPE_IP6ADDR = 4, 7, 8
TYPE_INET_PROTOCOL, TYPE_INET_SERVICE = 12, 13
TYPE_BITS = 6
TYPE_IDS = {
    "ipv4_addr": (TYPE_IPADDR, 4),
    "ipv6_addr": (TYPE_IP6ADDR, 16),
    "inet_proto": (TYPE_INET_PROTOCOL, 1),
    "inet_service": (TYPE_INET_SERVICE, 2),
}
# the set userdata nft writes for an anonymous numgen map (key byte order: host)
ANON_MAP_UDATA = bytes.fromhex("000401000000010400000000060400000000")
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
# the set userdata nft 1.0.6 writes for `typeof numgen random mod 65536 : ip daddr . tcp dport`
# (and ip6 / udp): nft prints the map's declaration from it; the kernel ignores it
_UDATA_HEAD = (
    "000401000000010400000000031a0004170000000112000401000000010400000100020400000000043400040d"
    "000000012c0014000407000000010c0004"
)
ENDPOINT_MAP_UDATA = {
    (fam, proto): bytes.fromhex(
        _UDATA_HEAD + mid + "0000000114000407000000010c0004" + p + "000000010402000000060400000000"
    )
    for fam, mid in ((4, "0c00000001040c"), (6, "0d000000010409"))
    for proto, p in (("tcp", "08"), ("udp", "06"))
}
# the set userdata nft 1.0.6 writes for the fast path's `typeof ip daddr . meta l4proto .
# th dport . numgen random mod N : ip daddr . th dport` (ip6 likewise), read back from the
# kernel; N (host byte order) goes at `_COUNT_MOD`
_COUNT_UDATA = (
    "000400000000010400000000036000040d00000001580014000407000000010c0004{a}00000001"
    "04{b}000000010e00040900000001060004100000000214000407000000010c00040b00000001040200"
    "0000031a00041700000001120004010000000104{mod}020400000000043400040d000000012c001400"
    "0407000000010c0004{a}0000000104{b}0000000114000407000000010c00040b000000010402000000"
    "060400000000"
)
_COUNT_FIELDS = {4: ("0c", "0c"), 6: ("0d", "09")}


def count_map_udata(family: int, n: int) -> bytes:
    a, b = _COUNT_FIELDS[family]
    return bytes.fromhex(_COUNT_UDATA.format(a=a, b=b, mod=struct.pack("=I", n).hex()))


RTN_LOCAL = 2


class NftError(DataplaneError):
    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class Unencodable(NftError):
    """A statement this codec does not encode (the caller falls back to `nft -f`)."""


# -- attributes --------------------------------------------------------------------------------
def data_value(kind: int, raw: bytes) -> bytes:
    return nest(kind, attr(1, raw))  # NFTA_DATA_VALUE


def data_verdict(kind: int, verdict: str, chain: str = "") -> bytes:
    inner = be32(1, VERDICTS[verdict])  # NFTA_VERDICT_CODE
    if chain:
        inner += string(2, chain)  # NFTA_VERDICT_CHAIN
    return nest(kind, nest(2, inner))  # NFTA_DATA_VERDICT


# -- expressions -------------------------------------------------------------------------------
def expr(name: str, *attrs: bytes) -> bytes:
    return nest(1, string(1, name), nest(2, *attrs))  # NFTA_LIST_ELEM{NAME, DATA}


def payload(dreg: int, base: int, offset: int, length: int) -> bytes:
    return expr("payload", be32(1, dreg), be32(2, base), be32(3, offset), be32(4, length))


def cmp(sreg: int, op: int, raw: bytes) -> bytes:
    return expr("cmp", be32(1, sreg), be32(2, op), data_value(3, raw))


def bitwise(reg: int, mask: bytes) -> bytes:
    """`reg &= mask` (a mask-and-xor with a zero xor)."""
    return bitwise_xor(reg, mask, b"\0" * len(mask))


def meta_load(dreg: int, key: int) -> bytes:
    return expr("meta", be32(2, key), be32(1, dreg))


def immediate_verdict(verdict: str, chain: str = "") -> bytes:
    return expr("immediate", be32(1, REG_VERDICT), data_verdict(2, verdict, chain))


def immediate_data(dreg: int, raw: bytes) -> bytes:
    return expr("immediate", be32(1, dreg), data_value(2, raw))


def lookup(
    sreg: int, set_name: str, *, set_id: int = 0, dreg: int | None = None, invert: bool = False
) -> bytes:
    parts = [string(1, set_name), be32(2, sreg)]
    if dreg is not None:
        parts.append(be32(3, dreg))
    if set_id:
        parts.append(be32(4, set_id))
    if invert:
        parts.append(be32(5, 1))  # NFTA_LOOKUP_FLAGS: NFT_LOOKUP_F_INV
    return expr("lookup", *parts)


def bitwise_xor(reg: int, mask: bytes, xor: bytes) -> bytes:
    """`reg = (reg & mask) ^ xor` (nft's bitwise mask-and-xor)."""
    return expr(
        "bitwise",
        be32(1, reg),
        be32(2, reg),
        be32(3, len(mask)),
        data_value(4, mask),
        data_value(5, xor),
    )


def ct_load(dreg: int, key: int) -> bytes:
    return expr("ct", be32(2, key), be32(1, dreg))


def meta_set(key: int, sreg: int) -> bytes:
    return expr("meta", be32(2, key), be32(3, sreg))


def numgen(dreg: int, modulus: int) -> bytes:
    return expr("numgen", be32(1, dreg), be32(2, modulus), be32(3, 1), be32(4, 0))


META_L4PROTO = 16
META_MARK = 3
CT_STATE, CT_STATUS = 0, 2
CT_STATE_NEW = 1 << 3  # NF_CT_STATE_BIT(IP_CT_NEW)
IPS_DST_NAT = 1 << 5
NAT_RANDOM_FULLY = 0x10  # NF_NAT_RANGE_PROTO_RANDOM_FULLY
FIB_SADDR, FIB_DADDR, FIB_ADDRTYPE = 1, 2, 3
REJECT_ICMP_UNREACH = 0
PORT_UNREACH = {4: 3, 6: 4}  # ICMP_PORT_UNREACH, ICMPV6_PORT_UNREACH
RULE_USERDATA = 7
INTERVAL_OPEN_UDATA = bytes.fromhex("010401000000")  # NFTNL_UDATA_SET_ELEM_FLAGS: open
# the userdata nft 1.0.6 writes for the anonymous interval set of `ip saddr { ... }` (key byte
# order big endian, auto-merge, typeof ip saddr / ip6 saddr)
INTERVAL_SET_UDATA = {
    4: bytes.fromhex("0004020000000204010000000314000407000000010c00040c00000001040b000000"),
    6: bytes.fromhex("0004020000000204010000000314000407000000010c00040d000000010408000000"),
}
PAYLOAD_NETWORK, PAYLOAD_TRANSPORT = 1, 2
REG32_02, REG32_05, REG32_06, REG32_03 = 10, 13, 14, 11
CMP_EQ, CMP_NEQ = 0, 1


def _l4proto(protocol: str) -> bytes:
    return meta_load(REG_1, META_L4PROTO) + cmp(REG_1, CMP_EQ, bytes([PROTOCOLS[protocol]]))


def _saddr(family: int) -> tuple[int, int]:
    return (8, 16) if family == IPV6 else (12, 4)


def _daddr(family: int) -> tuple[int, int]:
    return (24, 16) if family == IPV6 else (16, 4)


def _prefix_match(family: int, offset: int, cidr: str, negate: bool) -> bytes:
    """`ip saddr|daddr [!=] CIDR` as nft encodes it: a whole-byte prefix compares only its
    bytes, another is masked first."""
    net = ipaddress.ip_network(cidr, strict=False)
    length = 16 if family == IPV6 else 4
    op = CMP_NEQ if negate else CMP_EQ
    bits = net.prefixlen
    if bits % 8 == 0:
        n = bits // 8
        return payload(REG_1, PAYLOAD_NETWORK, offset, n) + cmp(
            REG_1, op, net.network_address.packed[:n]
        )
    return (
        payload(REG_1, PAYLOAD_NETWORK, offset, length)
        + bitwise(REG_1, net.netmask.packed)
        + cmp(REG_1, op, net.network_address.packed)
    )


def _merged_ranges(cidrs: Sequence[str]) -> list[tuple[int, int]]:
    """The address ranges of `cidrs`, sorted, overlapping and adjacent ones merged (as nft's
    auto-merge of an anonymous interval set does)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(
        (int(n.network_address), int(n.broadcast_address))
        for n in (ipaddress.ip_network(c, strict=False) for c in cidrs)
    ):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _port(port: int) -> bytes:
    return port.to_bytes(2, "big")


def _addr(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


class Encoder:
    """Encodes ops of one family; owns the batch's set ids for anonymous sets."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.nfproto = NFPROTO[family]
        self._set_id = 0
        self.messages: list[tuple[int, int, bytes]] = []  # (msg type, flags, attrs)

    def _msg(self, kind: int, flags: int, *attrs: bytes) -> None:
        self.messages.append((kind, flags, b"".join(attrs)))

    # -- statements ----------------------------------------------------------------------------
    def _anon_map(self, key_len: int, data_type: int, data_len: int, n: int) -> tuple[str, int]:
        self._set_id += 1
        sid = self._set_id
        flags = SET_ANONYMOUS | SET_CONSTANT | SET_MAP
        self._msg(
            MSG_NEWSET,
            NLM_F_CREATE,
            string(1, TABLE),
            string(2, "__map%d"),
            be32(3, flags),
            be32(4, TYPE_INTEGER),
            be32(5, key_len),
            be32(6, data_type),
            be32(7, data_len),
            be32(10, sid),
            nest(9, be32(1, n)),
            attr(13, ANON_MAP_UDATA),
        )
        return "__map%d", sid

    def _anon_elements(self, sid: int, items: Sequence[bytes]) -> None:
        elems = b"".join(
            nest(1, data_value(1, struct.pack("=I", i)), item) for i, item in enumerate(items)
        )
        self._msg(
            MSG_NEWSETELEM,
            NLM_F_CREATE,
            string(1, TABLE),
            string(2, "__map%d"),
            be32(4, sid),
            nest(3, elems),
        )

    def stmt(self, s: Stmt) -> bytes:
        fam = self.family
        if isinstance(s, Jump):
            return immediate_verdict(s.kind, s.chain)
        if isinstance(s, SaddrIn):
            off, length = _saddr(fam)
            if len(s.cidrs) == 1:
                return _prefix_match(fam, off, s.cidrs[0], s.negate)
            name, sid = self._interval_set(s.cidrs)
            return payload(REG_1, PAYLOAD_NETWORK, off, length) + lookup(
                REG_1, name, set_id=sid, invert=s.negate
            )
        if isinstance(s, DaddrIn):
            return _prefix_match(fam, _daddr(fam)[0], s.cidr, s.negate)
        if isinstance(s, CtState):
            key, bit = (CT_STATUS, IPS_DST_NAT) if s.status else (CT_STATE, CT_STATE_NEW)
            return (
                ct_load(REG_1, key)
                + bitwise(REG_1, struct.pack("=I", bit))
                + cmp(REG_1, CMP_NEQ, b"\0\0\0\0")
            )
        if isinstance(s, FibDaddrLocal):
            fib = expr("fib", be32(1, REG_1), be32(2, FIB_ADDRTYPE), be32(3, FIB_DADDR))
            return fib + cmp(REG_1, CMP_EQ, struct.pack("=I", RTN_LOCAL))
        if isinstance(s, DaddrInSet):
            off, length = _daddr(fam)
            return payload(REG_1, PAYLOAD_NETWORK, off, length) + lookup(REG_1, s.set)
        if isinstance(s, PairInSet):
            soff, length = _saddr(fam)
            doff, _ = _daddr(fam)
            second = REG_2 if fam == IPV6 else REG32_01
            return (
                payload(REG_1, PAYLOAD_NETWORK, soff, length)
                + payload(second, PAYLOAD_NETWORK, doff, length)
                + lookup(REG_1, s.set)
            )
        if isinstance(s, PortVmap):
            if s.daddr:
                off, length = _daddr(fam)
                proto_reg, port_reg = (REG_2, REG32_05) if fam == IPV6 else (REG32_01, REG32_02)
                head = payload(REG_1, PAYLOAD_NETWORK, off, length) + meta_load(
                    proto_reg, META_L4PROTO
                )
            else:
                port_reg = REG32_01
                head = meta_load(REG_1, META_L4PROTO)
            return (
                head
                + payload(port_reg, PAYLOAD_TRANSPORT, 2, 2)
                + lookup(REG_1, s.set, dreg=REG_VERDICT)
            )
        if isinstance(s, MarkZero):
            return (
                meta_load(REG_1, META_MARK)
                + bitwise(REG_1, struct.pack("=I", s.mask))
                + cmp(REG_1, CMP_EQ, b"\0\0\0\0")
            )
        if isinstance(s, MarkSet):
            if s.op == "|":
                mask = ~s.mask & 0xFFFFFFFF
            elif s.op == "^":
                mask = 0xFFFFFFFF
            else:
                raise Unencodable(f"meta mark operator {s.op}")
            return (
                meta_load(REG_1, META_MARK)
                + bitwise_xor(REG_1, struct.pack("=I", mask), struct.pack("=I", s.mask))
                + meta_set(META_MARK, REG_1)
            )
        if isinstance(s, Masquerade):
            return expr("masq", be32(1, NAT_RANDOM_FULLY))
        if isinstance(s, Reject):
            code = attr(2, bytes([PORT_UNREACH[fam]]))  # NFTA_REJECT_ICMP_CODE (u8)
            return expr("reject", be32(1, REJECT_ICMP_UNREACH), code)
        if isinstance(s, FibSaddrLocal):
            fib = expr("fib", be32(1, REG_1), be32(2, 3), be32(3, 1))  # ADDRTYPE of saddr
            return fib + cmp(REG_1, CMP_EQ, struct.pack("=I", RTN_LOCAL))
        if isinstance(s, DnatMap):
            if fam == IPV6:
                nat = expr("nat", be32(1, 1), be32(2, self.nfproto), be32(3, REG_1), be32(5, REG_2))
            else:
                nat = expr(
                    "nat", be32(1, 1), be32(2, self.nfproto), be32(3, REG_1), be32(5, REG32_01)
                )
            byteorder = expr(
                "byteorder", be32(1, REG_1), be32(2, REG_1), be32(3, 1), be32(4, 4), be32(5, 4)
            )
            return (
                _l4proto(s.protocol)
                + numgen(REG_1, SLOTS)
                + byteorder
                + lookup(REG_1, s.map, dreg=REG_1)
                + nat
            )
        if isinstance(s, DnatShared):
            # nft's registers: ip daddr . l4proto . dport . numgen packed from reg 1
            if fam == IPV6:
                regs = (2, REG32_05, REG32_06)
                daddr = payload(REG_1, PAYLOAD_NETWORK, 24, 16)
            else:
                regs = (REG32_01, REG32_02, REG32_03)
                daddr = payload(REG_1, PAYLOAD_NETWORK, 16, 4)
            return (
                daddr
                + meta_load(regs[0], META_L4PROTO)
                + payload(regs[1], PAYLOAD_TRANSPORT, 2, 2)
                + numgen(regs[2], s.n)
                + lookup(REG_1, count_map_name(s.n), dreg=REG_1)
                + expr("nat", be32(1, 1), be32(2, self.nfproto), be32(3, REG_1), be32(5, regs[0]))
            )
        if isinstance(s, Dnat):
            return (
                _l4proto(s.protocol)
                + immediate_data(REG_1, _addr(s.ip))
                + immediate_data(REG_2, _port(s.port))
                + expr(
                    "nat",
                    be32(1, 1),
                    be32(2, self.nfproto),
                    be32(3, REG_1),
                    be32(5, REG_2),
                    be32(7, 2),
                )
            )
        if isinstance(s, NumgenVmap):
            name, sid = self._anon_map(4, NFT_DATA_VERDICT, 0, len(s.chains))
            self._anon_elements(sid, [data_verdict(2, "goto", c) for c in s.chains])
            return numgen(REG_1, len(s.chains)) + lookup(REG_1, name, set_id=sid, dreg=0)
        if isinstance(s, SaddrInSet):
            off, length = _saddr(fam)
            return payload(REG_1, PAYLOAD_NETWORK, off, length) + lookup(REG_1, s.set)
        if isinstance(s, UpdateSaddr):
            off, length = _saddr(fam)
            dynset = expr("dynset", string(1, s.set), be32(3, 1), be32(4, REG_1))
            return payload(REG_1, PAYLOAD_NETWORK, off, length) + dynset
        raise Unencodable(f"unknown statement {s!r}")

    def rule(self, chain: str, rule: Rule) -> None:
        body = b"".join(self.stmt(s) for s in rule if not isinstance(s, Comment))
        parts = [string(1, TABLE), string(2, chain), nest(4, body)]
        for s in rule:
            if isinstance(s, Comment):
                text = s.text.encode() + b"\0"
                if len(text) > 255:
                    raise Unencodable("a rule comment past 255 bytes")
                parts.append(attr(RULE_USERDATA, bytes([0, len(text)]) + text))
        self._msg(MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, *parts)

    def _interval_set(self, cidrs: Sequence[str]) -> tuple[str, int]:
        """An anonymous interval set of `cidrs` (what nft makes of `ip saddr { A, B }`): the
        merged ranges as start elements and the address after each as an end element, with an
        end element at 0 first unless a range starts there."""
        alen = 16 if self.family == IPV6 else 4
        top = (1 << (8 * alen)) - 1
        elems: list[bytes] = []
        ranges = _merged_ranges(cidrs)

        def end(value: int) -> bytes:
            return nest(1, be32(3, 1), data_value(1, value.to_bytes(alen, "big")))

        if ranges[0][0] != 0:
            elems.append(end(0))
        for lo, hi in ranges:
            start = data_value(1, lo.to_bytes(alen, "big"))
            if hi < top:
                elems += [nest(1, start), end(hi + 1)]
            else:  # open to the top: no end element, flagged (NFTNL_SET_ELEM_F_INTERVAL_OPEN)
                elems.append(nest(1, start, attr(6, INTERVAL_OPEN_UDATA)))
        size = 2 * len(ranges) + (ranges[0][0] != 0)  # what nft declares (the open end too)
        sid = self._next_id()
        self._msg(
            MSG_NEWSET,
            NLM_F_CREATE,
            string(1, TABLE),
            string(2, "__set%d"),
            be32(3, SET_ANONYMOUS | SET_CONSTANT | SET_INTERVAL),
            be32(4, TYPE_IP6ADDR if self.family == IPV6 else TYPE_IPADDR),
            be32(5, alen),
            be32(10, sid),
            nest(9, be32(1, size)),
            attr(13, INTERVAL_SET_UDATA[self.family]),
        )
        self._msg(
            MSG_NEWSETELEM,
            NLM_F_CREATE,
            string(1, TABLE),
            string(2, "__set%d"),
            be32(4, sid),
            nest(3, *elems),
        )
        return "__set%d", sid

    # -- elements and sets ---------------------------------------------------------------------
    def key(self, types: Sequence[str], parts: Sequence[str]) -> bytes:
        out = b""
        for typ, text in zip(types, parts, strict=True):
            if typ in ("ipv4_addr", "ipv6_addr"):
                raw = _addr(text)
            elif typ == "inet_proto":
                raw = bytes([PROTOCOLS[text]])
            elif typ == "inet_service":
                raw = _port(int(text))
            elif typ == "integer":  # numgen's output: host byte order
                raw = struct.pack("=I", int(text))
            else:
                raise Unencodable(f"key type {typ}")
            out += raw + b"\0" * (-len(raw) & 3)
        return out

    def element(self, e: Element, types: Sequence[str], *, with_data: bool) -> bytes:
        parts = [data_value(1, self.key(types, e.key))]
        if with_data and e.value:
            verdict, _, chain = e.value.partition(" ")
            parts.append(data_verdict(2, verdict, chain))
        if with_data and e.comment:
            text = e.comment.encode() + b"\0"
            if len(text) > 255:  # nft refuses it too; its error names the service
                raise Unencodable("an element comment past 255 bytes")
            parts.append(attr(6, bytes([0, len(text)]) + text))  # NFTNL_UDATA_SET_ELEM_COMMENT
        return nest(1, *parts)

    def elements(self, kind: int, set_name: str, items: Sequence[bytes]) -> None:
        self._msg(
            kind,
            NLM_F_CREATE if kind == MSG_NEWSETELEM else 0,
            string(1, TABLE),
            string(2, set_name),
            nest(3, *items),
        )

    def new_set(self, s: SetDef) -> None:
        if count_of(s.name):
            self._count_map(s)
            return
        if s.typeof:
            self._endpoint_map(s)
            return
        if s.value:
            raise Unencodable("named maps are created by full syncs")
        ((typ, length),) = (TYPE_IDS[k] for k in s.key)
        flags = SET_TIMEOUT | SET_EVAL if s.timeout else 0
        parts = [
            string(1, TABLE),
            string(2, s.name),
            be32(3, flags),
            be32(4, typ),
            be32(5, length),
            be32(10, self._next_id()),
        ]
        if s.timeout:
            parts.append(be64(11, s.timeout * 1000))
            parts.append(nest(9, be32(1, 65535)))
        self._msg(MSG_NEWSET, NLM_F_CREATE, *parts)

    def _endpoint_map(self, s: SetDef) -> None:
        """A service port's interval map: numgen slot (big endian u32) -> ip . port."""
        proto = s.typeof.rsplit(" ", 2)[-2]
        udata = ENDPOINT_MAP_UDATA.get((self.family, proto))
        if udata is None:
            raise Unencodable(f"endpoint map for {proto}")
        alen = 16 if self.family == IPV6 else 4
        addr_type = TYPE_IP6ADDR if self.family == IPV6 else TYPE_IPADDR
        self._msg(
            MSG_NEWSET,
            NLM_F_CREATE,
            string(1, TABLE),
            string(2, s.name),
            be32(3, SET_INTERVAL | SET_MAP),
            be32(4, TYPE_INTEGER),
            be32(5, 4),
            be32(6, (addr_type << TYPE_BITS) | TYPE_INET_SERVICE),
            be32(7, alen + 4),
            be32(10, self._next_id()),
            attr(13, udata),
        )

    def _count_map(self, s: SetDef) -> None:
        """A fast-path map: ip . l4proto . port . numgen index -> ip . port (a hash map)."""
        alen = 16 if self.family == IPV6 else 4
        addr_type = TYPE_IP6ADDR if self.family == IPV6 else TYPE_IPADDR
        key_type = 0
        for t in (addr_type, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, TYPE_INTEGER):
            key_type = (key_type << TYPE_BITS) | t
        self._msg(
            MSG_NEWSET,
            NLM_F_CREATE,
            string(1, TABLE),
            string(2, s.name),
            be32(3, SET_MAP),
            be32(4, key_type),
            be32(5, alen + 12),
            be32(6, (addr_type << TYPE_BITS) | TYPE_INET_SERVICE),
            be32(7, alen + 4),
            be32(10, self._next_id()),
            attr(13, count_map_udata(self.family, count_of(s.name))),
        )

    def count_element(self, e: Element, types: Sequence[str], *, with_data: bool) -> bytes:
        parts = [data_value(1, self.key(types, e.key))]
        if with_data:
            ip, _, port = e.value.partition(" . ")
            parts.append(data_value(2, _addr(ip) + _port(int(port)) + b"\0\0"))
        return nest(1, *parts)

    def endpoint_elements(self, e: Element, *, with_data: bool) -> list[bytes]:
        """The two rbtree elements of one slot range: its start (with the endpoint) and the
        key after its end, flagged INTERVAL_END."""
        lo, _, hi = e.key[0].partition("-")
        start = [data_value(1, int(lo).to_bytes(4, "big"))]
        if with_data:
            ip, _, port = e.value.partition(" . ")
            start.append(data_value(2, _addr(ip) + _port(int(port)) + b"\0\0"))
        end = [data_value(1, (int(hi) + 1).to_bytes(4, "big")), be32(3, 1)]
        return [nest(1, *start), nest(1, *end)]

    def _next_id(self) -> int:
        self._set_id += 1
        return self._set_id


def encode_ops(ops: Sequence[Op], family: int, set_types: dict[str, tuple[str, ...]]) -> Encoder:
    """The messages of one transaction. `set_types` gives each shared set's key types.
    Consecutive element ops on one set share a message."""
    enc = Encoder(family)
    addr = "ipv6_addr" if family == IPV6 else "ipv4_addr"
    count_types = (addr, "inet_proto", "inet_service", "integer")
    pending: list[bytes] = []
    pending_key: tuple[int, str] | None = None

    def flush() -> None:
        nonlocal pending, pending_key
        if pending_key is not None and pending:
            enc.elements(pending_key[0], pending_key[1], pending)
        pending, pending_key = [], None

    for op in ops:
        k = op.kind
        if k in ("add-element", "delete-element"):
            e = op.element
            assert e is not None
            kind = MSG_NEWSETELEM if k == "add-element" else MSG_DELSETELEM
            if (kind, e.set) != pending_key:
                flush()
                pending_key = (kind, e.set)
            types = set_types.get(e.set)
            if count_of(e.set):
                pending.append(enc.count_element(e, count_types, with_data=kind == MSG_NEWSETELEM))
            elif types is not None:
                pending.append(enc.element(e, types, with_data=kind == MSG_NEWSETELEM))
            elif is_endpoint_map(e.set):
                pending.extend(enc.endpoint_elements(e, with_data=kind == MSG_NEWSETELEM))
            else:
                raise Unencodable(f"unknown set {e.set}")
            continue
        flush()
        if k == "add-chain":
            enc._msg(MSG_NEWCHAIN, NLM_F_CREATE, string(1, TABLE), string(3, op.name))
        elif k == "flush-chain":
            enc._msg(MSG_DELRULE, 0, string(1, TABLE), string(2, op.name))
        elif k == "delete-chain":
            enc._msg(MSG_DELCHAIN, 0, string(1, TABLE), string(3, op.name))
        elif k == "add-rule":
            enc.rule(op.name, op.rule)
        elif k == "add-set":
            assert op.setdef is not None
            enc.new_set(op.setdef)
        elif k == "delete-set":
            enc._msg(MSG_DELSET, 0, string(1, TABLE), string(2, op.name))
        else:
            raise Unencodable(f"op {k}")
    flush()
    return enc


# -- full syncs --------------------------------------------------------------------------------
HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
TABLE_COMMENT = "rules for kube-proxy"
# the set userdata nft 1.0.6 writes for the shared sets' `type` declarations (byte order of the
# key and data): a single address, a concatenation, a concatenation mapping to verdicts
SHARED_SET_UDATA = {
    "addr": bytes.fromhex("000402000000"),
    "concat": bytes.fromhex("000400000000030800040d0000000100"),
    "concat-map": bytes.fromhex("000400000000010400000000030800040d0000000100060400000000"),
}
TYPE_LENGTHS = {"ipv4_addr": 4, "ipv6_addr": 16, "inet_proto": 1, "inet_service": 2}
ELEMENTS_BYTES = 60000  # the elements of one message (their attribute's length is 16 bits)
_NESTED = 0x8000
_PROTO_KEY = {"TCP": b"\x06\0\0\0", "UDP": b"\x11\0\0\0", "SCTP": b"\x84\0\0\0"}


class FullSync(Encoder):
    """The netlink batch of a full sync: the transaction `kproxy.render.nftables.full_chunks`
    writes as `nft -f` input, message for message (declare the table, its chains and shared sets;
    flush what kproxy owns and refill it; each service's sets and chains; the elements; the
    fast path's maps and rules; the stale chains and sets deleted), so the kernel ends with the
    same table. Used in this order: `begin`, then `service` (fast-path services, straight from
    their views) or `block` for each service in name order, then `end`.

    Elements are gathered per set (the first of each key wins, as in the text) and sent at the
    end, in messages of up to ELEMENTS_BYTES."""

    def __init__(self, renderer: Renderer) -> None:
        super().__init__(renderer.family)
        self.renderer = renderer
        fam = self.family
        self._alen = alen = 16 if fam == IPV6 else 4
        self._pack = (
            (lambda ip: socket.inet_pton(socket.AF_INET6, ip))
            if fam == IPV6
            else (socket.inet_aton)
        )
        self._types = {s.name: s.key for s in shared_sets(fam)}
        addr = addr_type(fam)
        self._count_types = (addr, "inet_proto", "inet_service", "integer")
        self._elems: dict[str, list[bytes]] = {}
        self._seen: dict[str, set[bytes]] = {}
        self.count_maps: dict[int, None] = {}  # declared, in order of first use
        klen, dlen = alen + 12, alen + 4
        self._h_count = (
            NLA.pack(4 + 8 + klen + 8 + dlen, 1 | _NESTED)
            + NLA.pack(8 + klen, 1 | _NESTED)
            + NLA.pack(4 + klen, 1)
        )
        self._h_data = NLA.pack(8 + dlen, 2 | _NESTED) + NLA.pack(4 + dlen, 1)
        self._h_ip = NLA.pack(12 + alen, 1 | _NESTED) + NLA.pack(8 + alen, 1 | _NESTED)
        self._h_ip += NLA.pack(4 + alen, 1)
        self._h_pair = NLA.pack(12 + 2 * alen, 1 | _NESTED) + NLA.pack(8 + 2 * alen, 1 | _NESTED)
        self._h_pair += NLA.pack(4 + 2 * alen, 1)
        self._ports: dict[int, bytes] = {}
        self._idx: list[bytes] = []

    # -- the fixed part ------------------------------------------------------------------------
    def begin(self) -> None:
        fam = self.family
        comment = TABLE_COMMENT.encode() + b"\0"
        self._msg(
            MSG_NEWTABLE,
            NLM_F_CREATE,
            string(1, TABLE),
            be32(2, 0),
            attr(6, bytes([0, len(comment)]) + comment),  # NFTNL_UDATA_TABLE_COMMENT
        )
        for name, typ, hook, prio in BASE_CHAINS:
            self._msg(
                MSG_NEWCHAIN,
                NLM_F_CREATE,
                string(1, TABLE),
                string(3, name),
                string(7, typ),
                nest(4, be32(1, HOOKS[hook]), be32(2, prio)),
            )
        for name in FIXED_CHAINS:
            self._msg(MSG_NEWCHAIN, NLM_F_CREATE, string(1, TABLE), string(3, name))
        for s in shared_sets(fam):
            self._shared_set(s)
        for name, *_ in BASE_CHAINS:
            self._flush_chain(name)
        for name in FIXED_CHAINS:
            self._flush_chain(name)
        for s in shared_sets(fam):
            self._flush_set(s.name)
        for chain, rules in self.renderer.fixed_chains().items():
            for r in rules:
                self.rule(chain, r)
        for e in self.renderer.nodeport_elements():
            self._element(e)

    def _shared_set(self, s: SetDef) -> None:
        key_type = key_len = 0
        for k in s.key:
            key_type = (key_type << TYPE_BITS) | TYPE_IDS[k][0]
            key_len += (TYPE_LENGTHS[k] + 3) & ~3
        parts = [
            string(1, TABLE),
            string(2, s.name),
            be32(3, SET_MAP if s.value else 0),
            be32(4, key_type),
            be32(5, key_len),
        ]
        if s.value:
            if s.value != "verdict":
                raise Unencodable(f"shared map of {s.value}")
            parts += [be32(6, NFT_DATA_VERDICT), be32(7, 0)]
        udata = "concat-map" if s.value else "concat" if len(s.key) > 1 else "addr"
        parts += [be32(10, self._next_id()), attr(13, SHARED_SET_UDATA[udata])]
        self._msg(MSG_NEWSET, NLM_F_CREATE, *parts)

    def _flush_chain(self, name: str) -> None:
        self._msg(MSG_DELRULE, 0, string(1, TABLE), string(2, name))

    def _flush_set(self, name: str) -> None:
        self._msg(MSG_DELSETELEM, 0, string(1, TABLE), string(2, name))

    # -- services ------------------------------------------------------------------------------
    def _add(self, name: str, key: bytes, elem: bytes) -> None:
        seen = self._seen.get(name)
        if seen is None:
            seen = self._open(name)
        if key not in seen:  # two services claiming one key: the first wins
            seen.add(key)
            self._elems[name].append(elem)

    def _open(self, name: str) -> set[bytes]:
        """The first element of set `name`: its lists (and a fast-path map declared)."""
        seen = self._seen[name] = set()
        self._elems[name] = []
        n = count_of(name)
        if n:
            self._declare_count_map(n)
        return seen

    def _declare_count_map(self, n: int) -> None:
        """Created afresh where first used, as the text does (add, delete, add)."""
        self.count_maps[n] = None
        s = count_map(n, self.family)
        self._count_map(s)
        self._msg(MSG_DELSET, 0, string(1, TABLE), string(2, s.name))
        self._count_map(s)

    def _element(self, e: Element) -> None:
        n = count_of(e.set)
        if n:
            key = self.key(self._count_types, e.key)
            self._add(e.set, key, self.count_element(e, self._count_types, with_data=True))
            return
        types = self._types.get(e.set)
        if types is None:
            raise Unencodable(f"unknown set {e.set}")
        self._add(e.set, self.key(types, e.key), self.element(e, types, with_data=True))

    def block(self, b: ServiceBlock, redefined: Callable[[SetDef], bool]) -> None:
        """A service's block (what `block_text` writes), its elements gathered; the fast-path
        maps its elements are the first to use declared after it."""
        redo = [s for s in b.sets if redefined(s)]
        for s in b.sets:
            if s not in redo:
                self.new_set(s)
        for s in b.sets:
            if s.typeof:
                self._flush_set(s.name)
        for name, _ in b.chains:
            self._msg(MSG_NEWCHAIN, NLM_F_CREATE, string(1, TABLE), string(3, name))
        for name, _ in b.chains:
            self._flush_chain(name)
        for s in redo:
            self._msg(MSG_DELSET, 0, string(1, TABLE), string(2, s.name))
            self.new_set(s)
        for chain, chain_rules in b.chains:
            for r in chain_rules:
                self.rule(chain, r)
        endpoint_maps: dict[str, list[bytes]] = {}
        for e in b.elements:
            if is_endpoint_map(e.set):  # the service's own map: no other owner
                endpoint_maps.setdefault(e.set, []).extend(
                    self.endpoint_elements(e, with_data=True)
                )
            else:
                self._element(e)
        for name, elems in endpoint_maps.items():
            self._elems.setdefault(name, []).extend(elems)

    def service(self, views: Sequence[ServicePortView]) -> bool:
        """A service whose ports all take the chainless fast path, its elements encoded straight
        from its views (the elements `Renderer.render_service` makes for it, without its block);
        False (nothing done) for any other service."""
        for v in views:
            if not takes_fast_path(v):
                return False
        if not views:
            return False
        pack = self._pack
        ports = self._ports
        idx = self._idx
        h_count, h_data, h_ip, h_pair = self._h_count, self._h_data, self._h_ip, self._h_pair
        elems, seen = self._elems, self._seen
        for v in views:
            d = v.decision
            cip = pack(v.cluster_ip)
            self._add(CLUSTER_IPS, cip, h_ip + cip)
            eps = d.internal
            n = len(eps)
            while len(idx) < n:
                idx.append(struct.pack("=I", len(idx)))
            port = v.port.port
            pb = ports.get(port)
            if pb is None:
                pb = ports[port] = port.to_bytes(2, "big") + b"\0\0"
            proto = _PROTO_KEY.get(v.port.protocol)
            if proto is None:
                raise Unencodable(f"protocol {v.port.protocol}")
            name = f"{COUNT_MAP_PREFIX}{n}"
            keys = seen.get(name)
            if keys is None:
                keys = self._open(name)
            out = elems[name]
            head = cip + proto + pb
            addrs = [pack(ep.ip) for ep in eps]
            for i, ep in enumerate(eps):
                key = head + idx[i]
                if key in keys:  # two services claiming one key: the first wins
                    continue
                keys.add(key)
                epb = ports.get(ep.port)
                if epb is None:
                    epb = ports[ep.port] = ep.port.to_bytes(2, "big") + b"\0\0"
                out.append(h_count + key + h_data + addrs[i] + epb)
            pairs_seen = seen.get(HAIRPIN)
            if pairs_seen is None:
                pairs_seen = self._open(HAIRPIN)
            pairs = elems[HAIRPIN]
            reachable = d.all_reachable
            for a in addrs if reachable is eps else [pack(ep.ip) for ep in reachable]:
                pair = a + a
                if pair not in pairs_seen:
                    pairs_seen.add(pair)
                    pairs.append(h_pair + pair)
        return True

    def end(self, stale_chains: Sequence[str], stale_sets: Sequence[str]) -> None:
        """The fast path's rules, every element, then the stale chains and sets deleted."""
        for n in self.count_maps:
            self.rule(CLUSTER_ENDPOINTS, count_rule(n))
        for name, elems in self._elems.items():
            if not elems:
                continue
            step = max(1, ELEMENTS_BYTES // max(map(len, elems)))
            for i in range(0, len(elems), step):
                self.elements(MSG_NEWSETELEM, name, elems[i : i + step])
        self._elems.clear()
        self._seen.clear()
        for name in stale_chains:
            self._flush_chain(name)
        for name in stale_chains:
            self._msg(MSG_DELCHAIN, 0, string(1, TABLE), string(3, name))
        for name in stale_sets:
            self._msg(MSG_DELSET, 0, string(1, TABLE), string(2, name))


# -- the socket --------------------------------------------------------------------------------
RECV_SIZE = 1 << 20
SNDBUF = 8 << 20


class NftSocket:
    """One nf_tables netlink socket (of the current or the named network namespace)."""

    def __init__(self, *, netns: str | None = None) -> None:
        self._sock = netns_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, 32, SNDBUF)  # SO_SNDBUFFORCE
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            self._sock.settimeout(10.0)
        except BaseException:
            self._sock.close()
            raise
        self._buf = bytearray(RECV_SIZE)
        self._sndbuf = SNDBUF
        self._seq = int(time.time()) & 0xFFFFFF
        self.last_send_seconds = 0.0

    def close(self) -> None:
        self._sock.close()

    def _grow_sndbuf(self, size: int) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, 32, size)  # SO_SNDBUFFORCE
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        self._sndbuf = size

    def _next(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _header(
        self, kind: int, flags: int, seq: int, nfproto: int, res_id: int, size: int
    ) -> bytes:
        return _HDR.pack(16 + 4 + size, kind, flags, seq, 0) + _NFGEN.pack(nfproto, 0, res_id)

    def _drain(self) -> None:
        """Drop replies left over from an earlier batch (e.g. after a commit error)."""
        self._sock.setblocking(False)
        try:
            while True:
                self._sock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self._sock.settimeout(10.0)

    def send_batch(self, enc: Encoder) -> None:
        """Send `enc`'s messages as one transaction and raise NftError on any failure."""
        if not enc.messages:
            return
        self._drain()
        out = []
        res = socket.htons(NFNL_SUBSYS_NFTABLES)
        out.append(self._header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, self._next(), 0, res, 0))
        last = len(enc.messages) - 1
        seqs: dict[int, int] = {}
        final = 0
        for i, (kind, flags, attrs) in enumerate(enc.messages):
            seq = self._next()
            seqs[seq] = i
            f = NLM_F_REQUEST | flags | (NLM_F_ACK if i == last else 0)
            typ = (NFNL_SUBSYS_NFTABLES << 8) | kind
            out.append(self._header(typ, f, seq, enc.nfproto, 0, len(attrs)) + attrs)
            final = seq
        out.append(self._header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, self._next(), 0, res, 0))
        data = b"".join(out)
        if len(data) + 4096 > self._sndbuf:  # a full sync's batch (the kernel takes it whole)
            self._grow_sndbuf(len(data) + 4096)
        start = time.perf_counter()
        try:
            self._sock.sendall(data)
        except OSError as err:
            raise NftError(f"netlink send: {err}", err.errno or 0) from err
        self.last_send_seconds = time.perf_counter() - start
        self._collect(final, seqs, enc)

    def _collect(self, final: int, seqs: dict[int, int], enc: Encoder) -> None:
        errors: list[tuple[int, int]] = []
        done = False
        while not done:
            try:
                n = self._sock.recv_into(self._buf)
            except TimeoutError as err:
                raise NftError("no nf_tables reply within 10 s") from err
            for msg in parse_messages(memoryview(self._buf)[:n]):
                if msg.type != NLMSG_ERROR:
                    continue
                code = error_code(msg.payload)
                if code:
                    errors.append((msg.seq, code))
                if msg.seq == final or (code and msg.seq not in seqs):
                    done = True
        if errors:
            seq, code = errors[0]
            i = seqs.get(seq)
            what = f"message {i} (type {enc.messages[i][0]})" if i is not None else "commit"
            raise NftError(f"nf_tables {what}: {errnos.errorcode.get(code, code)}", code)

    def _request(self, kind: int, family: int, attrs: bytes) -> list[memoryview]:
        """One GET request; the payloads of its replies (after the nfgenmsg header). Raises
        NftError(ENOENT) when the object does not exist."""
        self._drain()
        seq = self._next()
        typ = (NFNL_SUBSYS_NFTABLES << 8) | kind
        nfproto = NFPROTO.get(family, 0)
        hdr = self._header(typ, NLM_F_REQUEST | NLM_F_ACK, seq, nfproto, 0, len(attrs))
        self._sock.sendall(hdr + attrs)
        out: list[memoryview] = []
        while True:
            n = self._sock.recv_into(self._buf)
            for msg in parse_messages(bytes(memoryview(self._buf)[:n])):
                if msg.seq != seq:
                    continue
                if msg.type == NLMSG_ERROR:
                    code = error_code(msg.payload)
                    if code:
                        raise NftError(f"nf_tables get: {errnos.errorcode.get(code)}", code)
                    return out
                out.append(msg.payload[4:])

    def generation(self) -> int:
        """The ruleset generation: it changes with every commit, by anyone."""
        for reply in self._request(MSG_GETGEN, 0, b""):
            span = scan_attrs(reply).get(1)  # NFTA_GEN_ID
            if span is not None:
                return int.from_bytes(reply[span[0] : span[0] + 4], "big")
        raise NftError("no generation in the GETGEN reply")

    def table_use(self, family: int) -> int | None:
        """How many objects (chains, sets) the kube-proxy table holds; None without it."""
        try:
            replies = self._request(MSG_GETTABLE, family, string(1, TABLE))
        except NftError as err:
            if err.errno == errnos.ENOENT:
                return None
            raise
        for reply in replies:
            span = scan_attrs(reply).get(3)  # NFTA_TABLE_USE
            if span is not None:
                return int.from_bytes(reply[span[0] : span[0] + 4], "big")
        return None

    def table_exists(self, family: int) -> bool:
        return self.table_use(family) is not None


class Writer(Protocol):
    def apply(self, ops: Sequence[Op]) -> None: ...


class NetlinkWriter:
    """The partial-sync writer of the nftables proxier: ops -> one netlink batch; a batch with a
    statement this codec does not encode goes through `fallback` (`nft -f`) instead."""

    def __init__(self, family: int, *, fallback: Writer, netns: str | None = None) -> None:
        self.family = family
        self._fallback = fallback
        self._sock = NftSocket(netns=netns)
        self._types = {s.name: s.key for s in shared_sets(family)}
        self.fallbacks = 0

    def apply(self, ops: Sequence[Op]) -> None:
        try:
            enc = encode_ops(ops, self.family, self._types)
        except Unencodable:
            self.fallbacks += 1
            self._fallback.apply(ops)
            return
        self._sock.send_batch(enc)

    def table_exists(self) -> bool:
        return self._sock.table_exists(self.family)

    def send(self, enc: Encoder) -> None:
        """One transaction of `enc`'s messages (a full sync's `FullSync`); NftError when the
        kernel refuses any of it (then nothing of it is applied)."""
        self._sock.send_batch(enc)

    def state(self) -> tuple[int, int | None]:
        """(ruleset generation, objects in the table): what `drift` compares."""
        return self._sock.generation(), self._sock.table_use(self.family)

    @property
    def last_send_seconds(self) -> float:
        return self._sock.last_send_seconds
