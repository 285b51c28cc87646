"""Deleting stale UDP conntrack entries through ctnetlink, per a `StaleFlowPlan`.

Owns the kernel side of the cleanup planned by `kproxy.render.conntrack`: it lists the UDP
entries of the families the plan touches, asks the plan which ones are stale, and deletes those
one netlink request each (never a `conntrack` process). It works in whatever network namespace
the process runs in (`ip netns exec` included), because the netlink socket is opened there.

Listing is narrowed in the kernel where it can be (CTA_FILTER, Linux >= 5.8): with a few rules
(an incremental sync), one dump per rule filtered on protocol, destination port and (IPv4)
address, so a busy table is not copied to userspace; with more (a start-up reconcile), one dump
of every UDP entry. The plan still judges every returned entry, so a kernel that ignores the
filter only costs time, never correctness. An entry that vanished before its delete (ENOENT) is
not counted.

The ctnetlink messages are kproxy's own (the requests pyroute2's `NFCTSocket.dump(tuple_orig=)`
and `entry("del")` send, same attributes and filter flags), over `netlink.NetlinkSocket` and
the framing of `kproxy/backends/netlink.py`: importing pyroute2 cost the agent ~5 MB of RSS.
Costs measured with pyroute2 (Linux 6.18): ~12 ms of kernel time per dump (a walk of the whole
hash table), ~0.2 ms to decode each returned entry, ~2 ms per deleted entry (each request is
acknowledged separately). Fine for lab clusters (tens to hundreds of stale flows); thousands of
stale flows take seconds.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from kproxy.backends.netlink import (
    NFGEN,
    NLM_F_DUMP,
    NetlinkRequestError,
    NetlinkSocket,
    nest,
    nla,
    nla_be16,
    nla_u32,
    parse_attrs,
)
from kproxy.errors import DataplaneError
from kproxy.model.objects import IPV6, UDP
from kproxy.render.conntrack import Flow, FrontendRule, Rule, StaleFlowPlan

log = logging.getLogger("kproxy.conntrack")

# Above this many rules per family, one dump of every UDP entry beats one filtered dump per rule:
# every dump walks the whole conntrack hash table in the kernel (~12 ms here, even when nothing
# matches), while decoding a returned entry costs ~0.2 ms.
FILTERED_DUMP_LIMIT = 4

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_PROTO_NAMES = {socket.IPPROTO_UDP: "UDP", socket.IPPROTO_TCP: "TCP", 132: "SCTP"}

# include/uapi/linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = NFNL_SUBSYS_CTNETLINK << 8 | 1
IPCTNL_MSG_CT_DELETE = NFNL_SUBSYS_CTNETLINK << 8 | 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ZONE, CTA_FILTER = 1, 2, 18, 25
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_FILTER_ORIG_FLAGS = 1
_IP_ATTRS = {4: (1, 2), 6: (3, 4)}  # CTA_IP_V4_SRC/DST, CTA_IP_V6_SRC/DST
# CTA_FILTER_FLAG_*: which fields of the CTA_TUPLE_ORIG of a dump request filter the dump
FILTER_IP_SRC, FILTER_IP_DST = 1 << 0, 1 << 1
FILTER_PROTO_NUM, FILTER_PROTO_SRC_PORT, FILTER_PROTO_DST_PORT = 1 << 3, 1 << 4, 1 << 5


class CtTuple(NamedTuple):
    """A conntrack tuple, or the fields of one a dump is filtered on (None: any)."""

    family: int  # 4 or 6
    proto: int = socket.IPPROTO_UDP
    saddr: str | None = None
    daddr: str | None = None
    sport: int | None = None
    dport: int | None = None

    def attrs(self) -> tuple[bytes, int]:
        """The CTA_TUPLE_ORIG attribute of this tuple, and its CTA_FILTER_FLAG_* bits."""
        src, dst = _IP_ATTRS[self.family]
        ip, proto, flags = b"", nla(CTA_PROTO_NUM, bytes((self.proto,))), FILTER_PROTO_NUM
        if self.saddr is not None:
            ip += nla(src, ipaddress.ip_address(self.saddr).packed)
            flags |= FILTER_IP_SRC
        if self.daddr is not None:
            ip += nla(dst, ipaddress.ip_address(self.daddr).packed)
            flags |= FILTER_IP_DST
        if self.sport is not None:
            proto += nla_be16(CTA_PROTO_SRC_PORT, self.sport)
            flags |= FILTER_PROTO_SRC_PORT
        if self.dport is not None:
            proto += nla_be16(CTA_PROTO_DST_PORT, self.dport)
            flags |= FILTER_PROTO_DST_PORT
        # the tuple's nests without NLA_F_NESTED, CTA_FILTER with it: byte for byte what
        # pyroute2 sent (tests/unit/test_netlink_requests.py); the kernel accepts either
        tuple_ip = nla(CTA_TUPLE_IP, ip) if ip else b""
        return nla(CTA_TUPLE_ORIG, tuple_ip + nla(CTA_TUPLE_PROTO, proto)), flags


def dump_request(family: int, tuple_filter: CtTuple | None) -> bytes:
    """The body of an IPCTNL_MSG_CT_GET dump of `family`, filtered in the kernel on the fields
    `tuple_filter` sets (CTA_FILTER, Linux >= 5.8)."""
    body = NFGEN.pack(_AF[family], 0, 0)
    if tuple_filter is None:
        return body
    orig, flags = tuple_filter.attrs()
    return body + orig + nest(CTA_FILTER, nla_u32(CTA_FILTER_ORIG_FLAGS, flags))


def delete_request(orig: CtTuple, zone: int | None) -> bytes:
    """The body of an IPCTNL_MSG_CT_DELETE of the entry whose original tuple is `orig`."""
    body = NFGEN.pack(_AF[orig.family], 0, 0) + orig.attrs()[0]
    return body if zone is None else body + nla_be16(CTA_ZONE, zone)


class ConntrackError(DataplaneError):
    """The conntrack table could not be read or changed at all (no permission, no ctnetlink)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    """One listed entry: what the plan judges, and what identifies it for the delete."""

    flow: Flow
    orig_src: str
    orig_sport: int
    zone: int | None

    @property
    def key(self) -> tuple[object, ...]:
        f = self.flow
        return (f.family, self.orig_src, self.orig_sport, f.orig_dst, f.orig_dport, self.zone)


class ConntrackCleaner:
    """Applies stale-flow plans to the conntrack table of the current network namespace."""

    def __init__(self) -> None:
        self.deleted_total = 0

    def apply(self, plan: StaleFlowPlan) -> int:
        """Delete every entry `plan` calls stale; returns how many were deleted.

        Raises ConntrackError when a family's table cannot be listed or entries cannot be
        deleted for lack of permission; other per-entry failures are logged and skipped.
        """
        if plan.empty:
            return 0
        deleted = 0
        for family in plan.families:
            deleted += self._apply_family(plan, family)
        self.deleted_total += deleted
        if deleted:
            log.info(
                "deleted %d stale UDP conntrack entries",
                deleted,
                extra={"conntrack_deleted": deleted, "rules": len(plan.rules())},
            )
        return deleted

    def _apply_family(self, plan: StaleFlowPlan, family: int) -> int:
        rules = plan.rules(family)
        try:
            with NetlinkSocket(NETLINK_NETFILTER) as ct:
                stale = [
                    (entry, rule)
                    for entry in self._list(ct, family, rules)
                    if (rule := plan.match(entry.flow)) is not None
                ]
                return sum(self._delete(ct, entry, rule) for entry, rule in stale)
        except NetlinkRequestError as err:
            raise ConntrackError(f"IPv{family} conntrack table: {err}") from err
        except OSError as err:
            raise ConntrackError(f"IPv{family} conntrack netlink socket: {err}") from err

    # -- listing -------------------------------------------------------------------------------
    def _list(self, ct: NetlinkSocket, family: int, rules: tuple[Rule, ...]) -> Iterator[_Entry]:
        """Entries of `family` that may match `rules`, each once."""
        filters: list[CtTuple | None]
        if len(rules) > FILTERED_DUMP_LIMIT:
            filters = [_filter(family)]
        else:
            filters = [_filter(family, rule) for rule in rules]
        try:
            # materialised first: a kernel that rejects CTA_FILTER fails before anything is used
            entries = list(self._dump(ct, family, filters))
        except NetlinkRequestError as err:
            if err.code in (errno.EPERM, errno.EACCES):
                raise
            log.debug("filtered conntrack dump refused (%s); listing every entry", err)
            yield from self._dump(ct, family, [None])
            return
        seen: set[tuple[object, ...]] = set()
        for entry in entries:
            if entry.key not in seen:
                seen.add(entry.key)
                yield entry

    def _dump(
        self, ct: NetlinkSocket, family: int, filters: Iterable[CtTuple | None]
    ) -> Iterator[_Entry]:
        for tuple_filter in filters:
            body = dump_request(family, tuple_filter)
            # decoded after the dump ended: the socket answers one request at a time
            for payload in list(ct.request(IPCTNL_MSG_CT_GET, NLM_F_DUMP, body, "dump")):
                entry = _parse(family, payload)
                if entry is not None:
                    yield entry

    # -- deleting ------------------------------------------------------------------------------
    def _delete(self, ct: NetlinkSocket, entry: _Entry, rule: Rule) -> int:
        flow = entry.flow
        orig = CtTuple(
            family=flow.family,
            saddr=entry.orig_src,
            daddr=flow.orig_dst,
            sport=entry.orig_sport,
            dport=flow.orig_dport,
        )
        try:
            ct.call(IPCTNL_MSG_CT_DELETE, 0, delete_request(orig, entry.zone), "delete")
        except NetlinkRequestError as err:
            if err.code == errno.ENOENT:
                return 0  # expired or deleted meanwhile
            if err.code in (errno.EPERM, errno.EACCES):
                raise
            log.warning("could not delete conntrack entry %s: %s", _describe(entry), err)
            return 0
        log.debug(
            "deleted stale conntrack entry %s (%s)",
            _describe(entry),
            _why(rule),
            extra={"services": list(rule.services)},
        )
        return 1


def _filter(family: int, rule: Rule | None = None) -> CtTuple:
    """The kernel-side dump filter for `rule` (every UDP entry of `family` for None)."""
    if rule is None:
        return CtTuple(family=family)
    # An IPv6 address in the filter matches nothing (seen on Linux 6.18), so IPv6 dumps are
    # narrowed by protocol and port only; the plan checks the address.
    daddr = rule.ip if isinstance(rule, FrontendRule) and family != IPV6 else None
    return CtTuple(family=family, daddr=daddr, dport=rule.port)


def _parse(family: int, payload: memoryview) -> _Entry | None:
    """An `_Entry` from a ctnetlink message (after its nlmsghdr); None for entries without
    ports or addresses."""
    attrs = parse_attrs(payload[NFGEN.size :])
    orig, reply = attrs.get(CTA_TUPLE_ORIG), attrs.get(CTA_TUPLE_REPLY)
    if orig is None or reply is None:
        return None
    o, r = parse_attrs(orig), parse_attrs(reply)
    o_ip, o_proto = o.get(CTA_TUPLE_IP), o.get(CTA_TUPLE_PROTO)
    r_ip, r_proto = r.get(CTA_TUPLE_IP), r.get(CTA_TUPLE_PROTO)
    if o_ip is None or o_proto is None or r_ip is None or r_proto is None:
        return None
    src, dst = _IP_ATTRS[family]
    oi, op, ri, rp = (
        parse_attrs(o_ip),
        parse_attrs(o_proto),
        parse_attrs(r_ip),
        parse_attrs(r_proto),
    )
    values = (
        oi.get(src),
        oi.get(dst),
        ri.get(src),
        op.get(CTA_PROTO_SRC_PORT),
        op.get(CTA_PROTO_DST_PORT),
        rp.get(CTA_PROTO_SRC_PORT),
    )
    o_src, o_dst, r_src, o_sport, o_dport, r_sport = values
    if o_src is None or o_dst is None or r_src is None:
        return None
    if o_sport is None or o_dport is None or r_sport is None:
        return None
    num = op.get(CTA_PROTO_NUM)
    proto = num[0] if num else None
    flow = Flow(
        family=family,
        protocol=_PROTO_NAMES.get(proto, str(proto)) if proto is not None else "None",
        orig_dst=_address(family, o_dst),
        orig_dport=_be16(o_dport),
        reply_src=_address(family, r_src),
        reply_sport=_be16(r_sport),
    )
    zone = attrs.get(CTA_ZONE)
    return _Entry(
        flow=flow,
        orig_src=_address(family, o_src),
        orig_sport=_be16(o_sport),
        zone=(_be16(zone) or None) if zone is not None else None,  # zone 0: the default
    )


def _be16(raw: memoryview) -> int:
    return int.from_bytes(raw[:2], "big")


def _address(family: int, raw: memoryview) -> str:
    # the model spells IPv6 addresses the way `ipaddress` does (inet_ntop's form)
    return socket.inet_ntop(_AF[family], bytes(raw))


def _describe(entry: _Entry) -> str:
    f = entry.flow
    return (
        f"{UDP.lower()} {entry.orig_src}:{entry.orig_sport} -> {f.orig_dst}:{f.orig_dport}"
        f" (reply from {f.reply_src}:{f.reply_sport})"
    )


def _why(rule: Rule) -> str:
    where = f"{rule.ip}:{rule.port}" if isinstance(rule, FrontendRule) else f"nodePort {rule.port}"
    services = ",".join(rule.services) or "?"
    if rule.keep is None:
        return f"{where} of {services} is gone"
    return f"{where} of {services}: reply source is not a serving endpoint"
