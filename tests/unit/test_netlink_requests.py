"""kproxy's own rtnetlink and ctnetlink requests (backends/rtnetlink.py, backends/conntrack.py),
checked against pyroute2, which sent them before: the same request bytes, the same decoded
answers. The kernel side (deleting real conntrack entries, placing DNS addresses) is covered by
tests/integration/test_conntrack.py, test_dns_netns.py and test_dns_server.py."""

from __future__ import annotations

import errno
import socket

import pytest
from pyroute2.iproute import IPRoute
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from kproxy.backends.conntrack import CtTuple, _parse, delete_request, dump_request
from kproxy.backends.netlink import NetlinkRequestError, NetlinkSocket
from kproxy.backends.rtnetlink import (
    address_request,
    addresses,
    delete_link,
    link_index,
    link_request,
)

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def _pyroute2_body(family: int, **fields: object) -> bytes:
    """What pyroute2's NFCTSocket sent after the nlmsghdr for an nfct_msg of `fields`."""
    msg = nfct_msg.create_from(**fields)
    msg["nfgen_family"] = _AF[family]
    msg.encode()
    return bytes(msg.data[16:])


FILTERS = [
    CtTuple(4),
    CtTuple(4, daddr="10.96.0.10", dport=53),
    CtTuple(6, dport=53),
    CtTuple(6, saddr="fd00::1", daddr="fd00:96::a", sport=40000, dport=5353),
]


@pytest.mark.parametrize("tuple_filter", FILTERS, ids=str)
def test_a_filtered_dump_is_the_request_pyroute2_sent(tuple_filter: CtTuple) -> None:
    theirs = NFCTAttrTuple(
        family=_AF[tuple_filter.family],
        proto=tuple_filter.proto,
        saddr=tuple_filter.saddr,
        daddr=tuple_filter.daddr,
        sport=tuple_filter.sport,
        dport=tuple_filter.dport,
    )
    theirs.attrs()  # computes the filter flags, as NFCTSocket.dump does
    want = _pyroute2_body(
        tuple_filter.family,
        tuple_orig=theirs,
        cta_filter={"attrs": [["CTA_FILTER_ORIG_FLAGS", theirs.flags]]},
    )
    assert dump_request(tuple_filter.family, tuple_filter) == want


def test_an_unfiltered_dump_is_the_family_header_alone() -> None:
    assert dump_request(6, None) == _pyroute2_body(6)


@pytest.mark.parametrize("zone", [None, 7])
@pytest.mark.parametrize("family", [4, 6])
def test_a_delete_is_the_request_pyroute2_sent(family: int, zone: int | None) -> None:
    src, dst = ("10.244.1.5", "10.96.0.10") if family == 4 else ("fd00::5", "fd00:96::a")
    orig = CtTuple(family, saddr=src, daddr=dst, sport=41000, dport=53)
    theirs = NFCTAttrTuple(
        family=_AF[family], proto=17, saddr=src, daddr=dst, sport=41000, dport=53
    )
    extra = {} if zone is None else {"zone": zone}
    assert delete_request(orig, zone) == _pyroute2_body(family, tuple_orig=theirs, **extra)


@pytest.mark.parametrize("family", [4, 6])
def test_a_dumped_entry_decodes_as_pyroute2_encoded_it(family: int) -> None:
    client, vip, pod = (
        ("10.244.1.5", "10.96.0.10", "10.244.2.7")
        if family == 4
        else ("fd00::5", "fd00:96::a", "fd00:244::7")
    )
    af = _AF[family]
    orig = NFCTAttrTuple(family=af, proto=17, saddr=client, daddr=vip, sport=41000, dport=53)
    reply = NFCTAttrTuple(family=af, proto=17, saddr=pod, daddr=client, sport=5353, dport=41000)
    entry = _parse(family, memoryview(_pyroute2_body(family, tuple_orig=orig, tuple_reply=reply)))
    assert entry is not None
    assert (entry.orig_src, entry.orig_sport, entry.zone) == (client, 41000, None)
    flow = entry.flow
    assert (flow.family, flow.protocol) == (family, "UDP")
    assert (flow.orig_dst, flow.orig_dport, flow.reply_src, flow.reply_sport) == (
        vip,
        53,
        pod,
        5353,
    )
    zoned = _parse(
        family, memoryview(_pyroute2_body(family, tuple_orig=orig, tuple_reply=reply, zone=3))
    )
    assert zoned is not None and zoned.zone == 3
    # an entry without ports (ICMP) is not one the plan can judge
    icmp = NFCTAttrTuple(family=af, proto=1, saddr=client, daddr=vip)
    icmp_reply = NFCTAttrTuple(family=af, proto=1, saddr=vip, daddr=client)
    body = _pyroute2_body(family, tuple_orig=icmp, tuple_reply=icmp_reply)
    assert _parse(family, memoryview(body)) is None


def test_addresses_and_links_read_as_pyroute2_reads_them() -> None:
    with IPRoute() as ipr:
        want = {
            (m["index"], m.get_attr("IFA_ADDRESS") or m.get_attr("IFA_LOCAL"), m["prefixlen"])
            for m in ipr.get_addr()
        }
        lo = ipr.link_lookup(ifname="lo")[0]
    with NetlinkSocket() as nl:
        got = {(a.ifindex, a.address, a.prefixlen) for a in addresses(nl)}
        assert got == want
        assert ("127.0.0.1", 8) in {(a.address, a.prefixlen) for a in addresses(nl, lo)}
        assert link_index(nl, "lo") == lo
        assert link_index(nl, "kproxy-none0") is None
        with pytest.raises(NetlinkRequestError) as err:
            delete_link(nl, 0x7FFFFFF0)  # no such link (or no permission to delete one)
        assert err.value.code in (errno.ENODEV, errno.EPERM)
        assert link_index(nl, "lo") == lo  # the socket still answers after an error


def test_link_and_address_requests_are_the_ones_pyroute2_sent() -> None:
    link = ifinfmsg()
    link["attrs"] = [
        ["IFLA_IFNAME", "kproxy-dns"],
        ["IFLA_LINKINFO", {"attrs": [["IFLA_INFO_KIND", "dummy"]]}],
    ]
    link.encode()
    assert link_request("kproxy-dns", "dummy") == bytes(link.data[16:])
    addr = ifaddrmsg()
    addr["family"], addr["prefixlen"], addr["index"] = socket.AF_INET, 32, 5
    addr["attrs"] = [["IFA_ADDRESS", "169.254.20.10"], ["IFA_LOCAL", "169.254.20.10"]]
    addr.encode()
    assert address_request(5, "169.254.20.10", 32) == bytes(addr.data[16:])
