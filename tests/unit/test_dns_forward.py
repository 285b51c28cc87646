"""Upstream selection (resolv.conf, loop protection), the recursion policy, the upstream cache."""

from __future__ import annotations

import contextlib
import random
import struct
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dnslib
import pytest

from kproxy.dns.forward import Forwarder, RecursionPolicy, UpstreamError, to_upstreamed
from kproxy.dns.records import to_wire
from kproxy.dns.upstreams import default_upstreams, resolve_upstreams
from kproxy.dns.wire import WireError, opt_record, parse_query, render
from tests.support.dnsupstream import FixtureUpstream, render_reply


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_resolv_conf_nameservers_minus_our_own(tmp_path: Path) -> None:
    conf = write(
        tmp_path,
        "resolv.conf",
        "# comment\nsearch example.com\nnameserver 169.254.20.10\nnameserver 10.0.0.2\n"
        "nameserver fe80::1%eth0\nnameserver 10.0.0.2\noptions ndots:5\n",
    )
    ups = default_upstreams(conf, own=["169.254.20.10"])
    assert ups == (("10.0.0.2", 53), ("fe80::1", 53))


def test_systemd_resolved_stub_is_replaced_by_its_real_servers(tmp_path: Path) -> None:
    stub = write(tmp_path, "resolv.conf", "nameserver 127.0.0.53\noptions edns0\n")
    real = write(tmp_path, "real.conf", "nameserver 192.0.2.53\n")
    assert default_upstreams(stub, own=[], resolved_conf=real) == (("192.0.2.53", 53),)
    assert default_upstreams(stub, own=[], resolved_conf=str(tmp_path / "absent")) == (
        ("127.0.0.53", 53),
    )


def test_missing_resolv_conf_means_no_upstreams(tmp_path: Path) -> None:
    assert default_upstreams(str(tmp_path / "nope"), own=[]) == ()


def test_configured_upstreams_skip_our_own_listen_address(tmp_path: Path) -> None:
    own = (("127.0.0.9", 5353),)
    got = resolve_upstreams(
        ["127.0.0.9:5353", "127.0.0.9", "[fd00::53]:5300"], resolv_conf="", own=own
    )
    assert got == (("127.0.0.9", 53), ("fd00::53", 5300))
    conf = write(tmp_path, "resolv.conf", "nameserver 127.0.0.9\nnameserver 192.0.2.1\n")
    assert resolve_upstreams(None, resolv_conf=conf, own=own) == (("192.0.2.1", 53),)


@pytest.mark.parametrize(
    ("client", "allowed"),
    [
        ("10.244.3.4", True),
        ("10.245.0.1", False),
        ("127.0.0.1", True),
        ("::1", True),
        ("fd00::1", False),
    ],
)
def test_recursion_policy(client: str, allowed: bool) -> None:
    policy = RecursionPolicy(["10.244.0.0/16", "127.0.0.0/8", "::1/128"])
    assert policy.allowed(client) is allowed
    assert policy.allowed(client) is allowed  # memoised


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def upstream_reply(
    query: bytes, *, rcode: int = 0, ttl: int = 60, soa_min: int | None = None
) -> bytes:
    q = dnslib.DNSRecord.parse(query)
    reply = q.reply()
    reply.header.rcode = rcode
    reply.header.aa = 1
    if rcode == 0 and soa_min is None:
        reply.add_answer(dnslib.RR(q.q.qname, dnslib.QTYPE.A, rdata=dnslib.A("192.0.2.7"), ttl=ttl))
    if soa_min is not None:
        soa = dnslib.SOA("ns.example.com", "host.example.com", (1, 2, 3, 4, soa_min))
        reply.add_auth(dnslib.RR("example.com", dnslib.QTYPE.SOA, rdata=soa, ttl=ttl))
    reply.add_ar(dnslib.EDNS0(udp_len=4096))
    return reply.pack()


def client_query(name: str = "www.example.com", *, edns: bool = False) -> bytes:
    return dns.message.make_query(name, "A", use_edns=0 if edns else False).to_wire()


def test_upstream_answers_are_cached_with_counted_down_ttls() -> None:
    clock = Clock()
    fwd = Forwarder([], clock=clock)
    q = parse_query(client_query())
    assert not isinstance(q, bytes | None)
    up = to_upstreamed(
        upstream_reply(_with_header(q.qbytes), ttl=60), len(q.qbytes), now=clock(), max_ttl=300
    )
    assert up.expires == clock.now + 60
    assert not up.template.flags & 0x0400  # AA is dropped: we are not authoritative for it
    fwd._store(q.key, up)
    clock.now += 25
    hit = fwd.cached(q.key)
    assert hit is not None
    msg = dns.message.from_wire(render(hit.template, q, limit=None, body=hit.body_at(clock.now)))
    assert msg.answer[0].ttl == 35 and msg.edns == -1  # upstream OPT removed for a non-EDNS client
    clock.now += 40
    assert fwd.cached(q.key) is None


def _with_header(qbytes: bytes) -> bytes:
    return struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + qbytes


def test_negative_answers_cache_for_the_soa_minimum_and_failures_not_at_all() -> None:
    q = parse_query(client_query("nope.example.com"))
    assert not isinstance(q, bytes | None)
    neg = to_upstreamed(
        upstream_reply(_with_header(q.qbytes), rcode=3, ttl=900, soa_min=30),
        len(q.qbytes),
        now=0,
        max_ttl=300,
    )
    assert neg.expires == 30 and neg.template.rcode == 3
    fail = to_upstreamed(
        upstream_reply(_with_header(q.qbytes), rcode=2), len(q.qbytes), now=0, max_ttl=300
    )
    assert fail.expires == 0
    capped = to_upstreamed(
        upstream_reply(_with_header(q.qbytes), ttl=86400), len(q.qbytes), now=0, max_ttl=300
    )
    assert capped.expires == 300


def test_cache_is_bounded() -> None:
    clock = Clock()
    fwd = Forwarder([], cache_size=3, clock=clock)
    for i in range(10):
        q = parse_query(client_query(f"n{i}.example.com"))
        assert not isinstance(q, bytes | None)
        fwd._store(
            q.key,
            to_upstreamed(
                upstream_reply(_with_header(q.qbytes)), len(q.qbytes), now=clock(), max_ttl=300
            ),
        )
    assert len(fwd._cache) <= 3


def test_truncated_upstream_answer_is_served_truncated_over_udp() -> None:
    q = parse_query(client_query())
    assert not isinstance(q, bytes | None)
    reply = dnslib.DNSRecord.parse(_with_header(q.qbytes)).reply()
    for i in range(100):
        reply.add_answer(
            dnslib.RR(reply.q.qname, dnslib.QTYPE.A, rdata=dnslib.A(f"192.0.2.{i}"), ttl=60)
        )
    up = to_upstreamed(reply.pack(), len(q.qbytes), now=0, max_ttl=300)
    raw = render(up.template, q, limit=512, body=up.body_at(0))
    msg = dns.message.from_wire(raw)
    assert len(raw) <= 512 and msg.flags & dns.flags.TC and 0 < len(msg.answer[0]) < 100


# -- replies as real servers send them ----------------------------------------------------------


def _reply_for(name: str, *, edns: bool = True, opt_first: bool = False) -> tuple[bytes, bytes]:
    """(query question section, upstream reply) for `name`, the reply rendered by dnspython."""
    query = dns.message.make_query(name, "A", use_edns=0 if edns else False)
    wire = query.to_wire()
    qlen = len(dns.name.from_text(name).to_wire()) + 4
    return wire[12 : 12 + qlen], render_reply(query, opt_first=opt_first)


@pytest.mark.parametrize("opt_first", [False, True], ids=["opt-last", "opt-before-glue"])
@pytest.mark.parametrize("client_edns", [False, True], ids=["plain-client", "edns-client"])
def test_edns_echoing_compressing_replies_are_reencoded(opt_first: bool, client_edns: bool) -> None:
    qbytes, reply = _reply_for("www.example.org", opt_first=opt_first)
    assert dns.message.from_wire(reply).edns == 0  # the upstream echoed EDNS
    up = to_upstreamed(reply, len(qbytes), now=0, max_ttl=300)
    # served to a client that spells the name differently
    q = parse_query(client_query("WWW.Example.ORG", edns=client_edns))
    assert not isinstance(q, bytes | None)
    opt = opt_record(1232) if client_edns else b""
    msg = dns.message.from_wire(render(up.template, q, limit=None, opt=opt, body=up.body_at(0)))
    assert [(r.name.to_text(), r.rdtype) for r in msg.answer] == [
        ("WWW.Example.ORG.", dns.rdatatype.CNAME),
        ("web.example.org.", dns.rdatatype.A),
    ]
    assert sorted(rd.to_text() for rd in msg.answer[1]) == ["192.0.2.10", "192.0.2.11"]
    assert [r.rdtype for r in msg.authority] == [dns.rdatatype.NS]
    assert sorted(r.name.to_text() for r in msg.additional) == [
        "ns1.example.org.",
        "ns2.example.org.",
    ]
    assert msg.edns == (0 if client_edns else -1)
    # the answer section, decoded for CNAME chasing
    assert (up.answer[0].rtype, up.answer[0].rdata) == (5, to_wire("web.example.org"))
    # cut at every record boundary, the message still parses: pointers only point backwards
    for limit in range(60, 400, 7):
        cut = render(up.template, q, limit=limit, body=up.body_at(0))
        dns.message.from_wire(cut)


def _hand(*parts: bytes, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x8180) -> bytes:
    return struct.pack("!HHHHHH", 7, flags, 1, an, ns, ar) + b"".join(parts)


_Q = to_wire("www.example.org") + b"\x00\x01\x00\x01"  # at offset 12
_CNAME_HEAD = b"\x00\x05\x00\x01\x00\x00\x00\x3c"
_A_HEAD = b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04"


def test_forward_pointers_and_pointer_chains_are_followed() -> None:
    # answer: www CNAME -> pointer *forward* to the additional record's owner name
    glue_owner_at = 12 + len(_Q) + 2 + 8 + 2 + 2
    cname = b"\xc0\x0c" + _CNAME_HEAD + b"\x00\x02" + struct.pack("!H", 0xC000 | glue_owner_at)
    glue = b"\x03web\xc0\x10" + _A_HEAD + bytes([192, 0, 2, 9])  # web + pointer into the question
    reply = _hand(_Q, cname, glue, an=1, ar=1)
    with pytest.raises(dns.name.BadPointer):  # dnspython refuses forward pointers; kproxy copes
        dns.message.from_wire(reply)
    up = to_upstreamed(reply, len(_Q), now=0, max_ttl=300)
    assert up.answer[0].rdata == to_wire("web.example.org")
    q = parse_query(client_query())
    assert not isinstance(q, bytes | None)
    for limit in (len(reply) - 1, len(reply) + 100):
        msg = dns.message.from_wire(render(up.template, q, limit=limit, body=up.body_at(0)))
        assert msg.answer[0][0].target.to_text() == "web.example.org."


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(_hand(_Q, b"\xc0\x1f" + _A_HEAD, an=1) + b"\xc0\x1f", id="pointer-loop"),
        pytest.param(
            _hand(_Q, b"\xc0\x0c" + _A_HEAD + b"\x01\x02\x03\x04", an=3), id="lying-count"
        ),
        pytest.param(_hand(_Q, b"\x3fabc", an=1), id="label-past-end"),
        pytest.param(
            _hand(_Q, b"\xc0\x0c" + _A_HEAD[:-2] + b"\x00\x05" + b"\x01" * 5, an=1),
            id="a-rdata-of-5-bytes",
        ),
        pytest.param(
            _hand(_Q, b"\xc0\x0c\x00\x06\x00\x01\x00\x00\x00\x3c\x00\x03\xc0\x0c\x00", ns=1),
            id="short-soa",
        ),
        pytest.param(
            _hand(_Q, b"\x00\x00\x29\x04\xd0\x01\x00\x00\x00\x00\x00", ar=1), id="badvers-in-opt"
        ),
        pytest.param(_hand(b"\x03www"), id="question-cut"),
        pytest.param(b"\x00" * 5, id="short"),
    ],
)
def test_malformed_replies_are_wire_errors(reply: bytes) -> None:
    with pytest.raises(WireError):
        to_upstreamed(reply, len(_Q), now=0, max_ttl=300)


def test_random_replies_raise_only_wire_errors() -> None:
    rnd = random.Random(3)
    _, good = _reply_for("www.example.org")
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rnd.randrange(1, 6)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        with contextlib.suppress(WireError):
            to_upstreamed(
                bytes(data[: rnd.randrange(12, len(data) + 1)]), len(_Q), now=0, max_ttl=300
            )


def test_forwarder_against_a_real_edns_upstream() -> None:
    upstream = FixtureUpstream("answer")
    try:
        fwd = Forwarder([(upstream.host, upstream.port)], timeout=2)
        qbytes = to_wire("outside.example.org") + b"\x00\x01\x00\x01"
        rcode, rrs = fwd.lookup(qbytes, qbytes)
        assert rcode == 0 and [(rr.owner, rr.rdata) for rr in rrs] == [
            (to_wire("outside.example.org"), bytes([192, 0, 2, 1]))
        ]
    finally:
        upstream.close()


@pytest.mark.parametrize("behaviour", ["garbage", "lying", "silent"])
def test_forwarder_gives_up_in_time_with_an_upstream_error(behaviour: str) -> None:
    upstream = FixtureUpstream(behaviour)
    try:
        fwd = Forwarder([(upstream.host, upstream.port)], timeout=0.3)
        qbytes = to_wire("outside.example.org") + b"\x00\x01\x00\x01"
        t0 = time.monotonic()
        with pytest.raises(UpstreamError):
            fwd.lookup(qbytes, qbytes)
        assert time.monotonic() - t0 < 3.0  # the 0.3 s timeout, with slack for a loaded machine
    finally:
        upstream.close()
