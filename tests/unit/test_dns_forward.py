"""Upstream selection (resolv.conf, loop protection), the recursion policy, the upstream cache."""

from __future__ import annotations

import struct
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dnslib
import pytest

from kproxy.dns.forward import (
    Forwarder,
    RecursionPolicy,
    default_upstreams,
    resolve_upstreams,
    to_upstreamed,
)
from kproxy.dns.wire import parse_query, render


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
