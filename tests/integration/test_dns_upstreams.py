"""Forwarding and ExternalName chasing against real upstream servers that kproxy did not write.

The upstreams (tests/support/dnsupstream.py) are UDP/TCP servers on loopback built with
dnspython: they echo EDNS and compress names as BIND, Unbound and CoreDNS do, truncate over
UDP, send garbage, lie in their counts, or never answer. kproxy runs in a worker process as in
production and is asked with dnspython and dig. Whatever the upstream does, the client gets an
answer: the upstream's records, or SERVFAIL with its question, within a bounded time.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from kproxy.dns import DNSOptions, DNSService
from tests.integration.test_dns_server import cluster, free_port, loopback, rdata
from tests.support.builders import make_service
from tests.support.dnsupstream import BIG, FixtureUpstream

FORWARD_TIMEOUT = 0.5
# One upstream's timeout (the TCP retry shares its deadline), plus generous slack for a loaded
# machine: the point is an answer long before the client gives up (CLIENT_TIMEOUT), not speed.
BOUND = FORWARD_TIMEOUT + 3.5
CLIENT_TIMEOUT = 10

Start = Callable[..., DNSService]


def snapshot():  # type: ignore[no-untyped-def]
    return cluster(
        make_service(
            "default",
            "extbig",
            type="ExternalName",
            cluster_ips=(),
            external_name="big.example.org",
        ),
        make_service(
            "default",
            "extwww",
            type="ExternalName",
            cluster_ips=(),
            external_name="www.example.org",
        ),
    )


@pytest.fixture
def start_dns() -> Iterator[Start]:
    services: list[DNSService] = []
    upstreams: list[FixtureUpstream] = []

    def start(
        behaviour: str = "answer", *, opt_first: bool = False, workers: int = 1
    ) -> DNSService:
        up = FixtureUpstream(behaviour, opt_first=opt_first)
        upstreams.append(up)
        host = loopback()
        svc = DNSService(
            options=DNSOptions(
                listen=(f"{host}:{free_port(host)}",),
                create_interface=False,
                upstreams=(up.address,),
                workers=workers,
                allow_cidrs=("127.0.0.0/8",),
                forward_timeout=FORWARD_TIMEOUT,
            )
        )
        svc.start()
        services.append(svc)
        svc.update(snapshot())
        assert svc.flush(10)
        svc.upstream = up  # type: ignore[attr-defined]
        return svc

    yield start
    for svc in services:
        svc.stop()
    for up in upstreams:
        up.close()


def ask(
    svc: DNSService, name: str, qtype: str = "A", *, transport: str = "udp", edns: bool = True
) -> dns.message.Message:
    host, port = svc.addresses[0]
    q = dns.message.make_query(name, qtype, use_edns=0 if edns else False)
    if transport == "tcp":
        return dns.query.tcp(q, host, port=port, timeout=5)
    return dns.query.udp(q, host, port=port, timeout=5, ignore_trailing=False)


def dig(svc: DNSService, *args: str) -> str:
    host, port = svc.addresses[0]
    out = subprocess.run(
        ["dig", f"@{host}", "-p", str(port), "+time=4", "+tries=1", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout


def answer_lines(text: str) -> list[tuple[str, str, str]]:
    """(owner, type, rdata) of dig's answer section, in order."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith(";"):
            continue
        f = line.split()
        out.append((f[0].lower(), f[3], " ".join(f[4:])))
    return out


def sequence(msg: dns.message.Message) -> list[tuple[str, str]]:
    """(owner, type) of each answer record in wire order."""
    return [
        (rrset.name.to_text().lower(), dns.rdatatype.to_text(rrset.rdtype))
        for rrset in msg.answer
        for _ in rrset
    ]


WAYS = [("udp", True), ("udp", False), ("tcp", True)]


@pytest.mark.parametrize("opt_first", [False, True], ids=["opt-last", "opt-before-glue"])
def test_forwarding_through_an_upstream_that_echoes_edns_and_compresses(
    start_dns: Start, opt_first: bool
) -> None:
    svc = start_dns(opt_first=opt_first)
    for transport, edns in WAYS:
        msg = ask(svc, "www.example.org", transport=transport, edns=edns)
        assert msg.rcode() == dns.rcode.NOERROR, (transport, edns)
        assert sequence(msg) == [
            ("www.example.org.", "CNAME"),
            ("web.example.org.", "A"),
            ("web.example.org.", "A"),
        ]
        assert rdata(msg, dns.rdatatype.A) == ["192.0.2.10", "192.0.2.11"]
        assert (msg.edns >= 0) == edns  # kproxy's own OPT, only for EDNS clients
        assert [r.rdtype for r in msg.authority] == [dns.rdatatype.NS]
    mx = ask(svc, "mail.example.org", "MX")
    assert rdata(mx) == ["10 mx1.example.org.", "20 mx2.example.org."]
    nx = ask(svc, "nx.example.org")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0].rdtype == dns.rdatatype.SOA
    out = dig(svc, "www.example.org", "+noall", "+answer")
    assert [(o, t) for o, t, _ in answer_lines(out)] == [
        ("www.example.org.", "CNAME"),
        ("web.example.org.", "A"),
        ("web.example.org.", "A"),
    ]


@pytest.mark.parametrize("opt_first", [False, True], ids=["opt-last", "opt-before-glue"])
def test_external_name_is_chased_through_an_edns_upstream_like_coredns(
    start_dns: Start, opt_first: bool
) -> None:
    # CoreDNS answers an ExternalName service: the CNAME, then the target's records
    svc = start_dns(opt_first=opt_first)
    name = "ext.default.svc.cluster.local"
    for transport, edns in WAYS:
        for qtype, rdtype, addr in [("A", "A", "192.0.2.1"), ("AAAA", "AAAA", "2001:db8::1")]:
            msg = ask(svc, name, qtype, transport=transport, edns=edns)
            assert msg.rcode() == dns.rcode.NOERROR, (transport, edns, qtype)
            assert sequence(msg) == [(name + ".", "CNAME"), ("outside.example.org.", rdtype)]
            assert rdata(msg, dns.rdatatype.CNAME) == ["outside.example.org."]
            assert rdata(msg, dns.rdatatype.from_text(rdtype)) == [addr]
            assert msg.flags & dns.flags.AA  # authoritative for the question's name
    out = dig(svc, name, "+noall", "+answer")
    assert answer_lines(out) == [
        (name + ".", "CNAME", "outside.example.org."),
        ("outside.example.org.", "A", "192.0.2.1"),
    ]
    # the target is itself a CNAME upstream: the whole chain, in order
    msg = ask(svc, "extwww.default.svc.cluster.local")
    assert sequence(msg) == [
        ("extwww.default.svc.cluster.local.", "CNAME"),
        ("www.example.org.", "CNAME"),
        ("web.example.org.", "A"),
        ("web.example.org.", "A"),
    ]


def test_truncated_upstream_answers_are_fetched_over_tcp(start_dns: Start) -> None:
    svc = start_dns("truncate")
    up: FixtureUpstream = svc.upstream  # type: ignore[attr-defined]
    full = ask(svc, "big.example.org", transport="tcp")
    assert len(rdata(full)) == BIG and not full.flags & dns.flags.TC
    assert ("udp", "big.example.org") in up.seen and ("tcp", "big.example.org") in up.seen
    # a plain UDP client gets what fits and TC; dig then retries over TCP by itself
    small = ask(svc, "big.example.org", edns=False)
    assert small.flags & dns.flags.TC and 0 < len(rdata(small)) < BIG
    assert len(dig(svc, "big.example.org", "+noedns", "+short").split()) == BIG
    # small answers come through the TCP retry too, EDNS-echoing as above
    assert rdata(ask(svc, "www.example.org"), dns.rdatatype.A) == ["192.0.2.10", "192.0.2.11"]
    # an ExternalName whose target needs TCP
    chased = ask(svc, "extbig.default.svc.cluster.local", transport="tcp")
    assert sequence(chased)[0] == ("extbig.default.svc.cluster.local.", "CNAME")
    assert len(rdata(chased, dns.rdatatype.A)) == BIG


@pytest.mark.parametrize("behaviour", ["garbage", "lying", "silent"])
@pytest.mark.parametrize(
    "name", ["www.example.org", "ext.default.svc.cluster.local"], ids=["forwarded", "chased"]
)
def test_a_failing_upstream_gives_servfail_in_bounded_time(
    start_dns: Start, behaviour: str, name: str
) -> None:
    svc = start_dns(behaviour)
    for transport, edns in WAYS:
        host, port = svc.addresses[0]
        q = dns.message.make_query(name, "A", use_edns=0 if edns else False)
        t0 = time.monotonic()
        if transport == "tcp":
            msg = dns.query.tcp(q, host, port=port, timeout=CLIENT_TIMEOUT)
        else:
            msg = dns.query.udp(q, host, port=port, timeout=CLIENT_TIMEOUT, ignore_trailing=False)
        took = time.monotonic() - t0
        assert msg.rcode() == dns.rcode.SERVFAIL, (transport, edns)
        assert q.is_response(msg)  # same id, same question
        assert msg.question[0].name == q.question[0].name
        assert (msg.edns >= 0) == edns
        assert not msg.answer
        assert took < BOUND, f"SERVFAIL after {took:.2f} s"
    out = dig(svc, name)
    assert "status: SERVFAIL" in out and "QUERY: 1," in out, out


@pytest.mark.parametrize("behaviour", ["answer", "silent"])
def test_the_in_process_engine_answers_alike(start_dns: Start, behaviour: str) -> None:
    # workers=0: the engine on threads of the daemon process, the other serving path
    svc = start_dns(behaviour, workers=0)
    for transport, edns in WAYS:
        msg = ask(svc, "ext.default.svc.cluster.local", transport=transport, edns=edns)
        if behaviour == "answer":
            assert sequence(msg) == [
                ("ext.default.svc.cluster.local.", "CNAME"),
                ("outside.example.org.", "A"),
            ]
        else:
            assert msg.rcode() == dns.rcode.SERVFAIL and (msg.edns >= 0) == edns
