"""The resolver's verdicts: answers, NXDOMAIN vs NODATA, refusals, forwarding, CNAME chasing."""

from __future__ import annotations

import pytest

from kproxy.dns.index import build_index
from kproxy.dns.records import (
    AAAA,
    ANY,
    AXFR,
    CNAME,
    IXFR,
    MX,
    NOERROR,
    NS,
    NXDOMAIN,
    PTR,
    REFUSED,
    SERVFAIL,
    SOA,
    SRV,
    TXT,
    A,
    to_wire,
)
from kproxy.dns.resolver import Answer, Question, resolve
from kproxy.model.objects import EndpointPort
from tests.support.builders import make_endpoint, make_port, make_service, make_slice
from tests.unit.test_dns_index import snapshot

SERVICES = [
    make_service("default", "web", cluster_ips=("10.96.0.5",), ports=(make_port(80, name="http"),)),
    make_service(
        "default", "db", headless=True, cluster_ips=(), ports=(make_port(5432, name="pg"),)
    ),
    make_service(
        "default", "ext", type="ExternalName", cluster_ips=(), external_name="example.com"
    ),
    make_service(
        "default",
        "alias",
        type="ExternalName",
        cluster_ips=(),
        external_name="web.default.svc.cluster.local",
    ),
    make_service(
        "default",
        "dangling",
        type="ExternalName",
        cluster_ips=(),
        external_name="nope.default.svc.cluster.local",
    ),
    make_service(
        "default",
        "loop1",
        type="ExternalName",
        cluster_ips=(),
        external_name="loop2.default.svc.cluster.local",
    ),
    make_service(
        "default",
        "loop2",
        type="ExternalName",
        cluster_ips=(),
        external_name="loop1.default.svc.cluster.local",
    ),
]
SLICES = [
    make_slice(
        "default",
        "db",
        endpoints=[make_endpoint("10.1.0.1", hostname="db-0")],
        ports=[EndpointPort("pg", "TCP", 5432)],
    )
]
INDEX = build_index(snapshot(SERVICES, SLICES), ns_addresses=("169.254.20.10",))


def ask(name: str, qtype: int = A, qclass: int = 1, *, index: object = INDEX) -> Answer:
    return resolve(Question(to_wire(name), qtype, qclass), index)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "qtype", "count"),
    [
        ("web.default.svc.cluster.local", A, 1),
        ("_http._tcp.web.default.svc.cluster.local", SRV, 1),
        ("db.default.svc.cluster.local", A, 1),
        ("db-0.db.default.svc.cluster.local", A, 1),
        ("_pg._tcp.db.default.svc.cluster.local", SRV, 1),
        ("5.0.96.10.in-addr.arpa", PTR, 1),
        ("1.0.1.10.in-addr.arpa", PTR, 1),
        ("cluster.local", SOA, 1),
        ("cluster.local", NS, 1),
        ("dns-version.cluster.local", TXT, 1),
        ("ns.dns.cluster.local", A, 1),
        ("10-2-3-4.anyns.pod.cluster.local", A, 1),
        ("fd00--1.anyns.pod.cluster.local", AAAA, 1),
    ],
)
def test_positive_answers(name: str, qtype: int, count: int) -> None:
    ans = ask(name, qtype)
    assert ans.rcode == NOERROR and ans.authoritative and not ans.forward
    assert len([rr for rr in ans.answer if rr.rtype == qtype]) == count


@pytest.mark.parametrize(
    ("name", "qtype"),
    [
        ("web.default.svc.cluster.local", AAAA),  # exists, no IPv6
        ("web.default.svc.cluster.local", MX),
        ("default.svc.cluster.local", A),  # namespace: empty non-terminal
        ("svc.cluster.local", A),
        ("pod.cluster.local", A),
        ("anyns.pod.cluster.local", A),
        ("_tcp.web.default.svc.cluster.local", SRV),
        ("_http._tcp.web.default.svc.cluster.local", A),
        ("dns-version.cluster.local", A),
        ("cluster.local", A),
        ("10-2-3-4.anyns.pod.cluster.local", AAAA),
    ],
)
def test_nodata_has_soa_and_no_answer(name: str, qtype: int) -> None:
    ans = ask(name, qtype)
    assert ans.rcode == NOERROR and not ans.answer
    assert [rr.rtype for rr in ans.authority] == [SOA]


@pytest.mark.parametrize(
    "name",
    [
        "missing.default.svc.cluster.local",
        "web.otherns.svc.cluster.local",
        "otherns.svc.cluster.local",
        "x.web.default.svc.cluster.local",
        "_tcp.db.default.svc.cluster.local.extra.cluster.local",
        "foo.cluster.local",
        "not-an-ip.ns.pod.cluster.local",
        "1-2-3-4.a.b.pod.cluster.local",
        "999-1-1-1.ns.pod.cluster.local",
        "*.default.svc.cluster.local",  # no wildcards
    ],
)
def test_nxdomain_has_soa(name: str) -> None:
    ans = ask(name)
    assert ans.rcode == NXDOMAIN and not ans.answer
    assert [rr.rtype for rr in ans.authority] == [SOA]


def test_negative_ttl_comes_from_soa_minimum() -> None:
    index = build_index(snapshot(SERVICES), ttl=17)
    soa = ask("missing.default.svc.cluster.local", index=index).authority[0]
    assert soa.ttl == 17 and int.from_bytes(soa.rdata[-4:], "big") == 17


def test_pods_disabled() -> None:
    index = build_index(snapshot(SERVICES), pods_mode="disabled")
    assert ask("10-2-3-4.ns.pod.cluster.local", index=index).rcode == NXDOMAIN
    assert ask("ns.pod.cluster.local", index=index).rcode == NXDOMAIN
    nodata = ask("pod.cluster.local", index=index)
    assert nodata.rcode == NOERROR and not nodata.answer


def test_headless_without_ready_endpoints_is_nxdomain() -> None:
    svc = make_service("default", "db", headless=True, cluster_ips=())
    index = build_index(snapshot([svc]))
    assert ask("db.default.svc.cluster.local", index=index).rcode == NXDOMAIN


@pytest.mark.parametrize("qtype", [AXFR, IXFR])
def test_zone_transfers_refused(qtype: int) -> None:
    assert ask("cluster.local", qtype).rcode == REFUSED
    assert ask("example.com", qtype).rcode == REFUSED


@pytest.mark.parametrize("qclass", [3, 4, 255])
def test_non_in_classes_refused(qclass: int) -> None:
    assert ask("web.default.svc.cluster.local", A, qclass).rcode == REFUSED


def test_servfail_before_first_sync_but_forwarding_works() -> None:
    index = build_index(snapshot(SERVICES, synced=False))
    ans = ask("web.default.svc.cluster.local", index=index)
    assert ans.rcode == SERVFAIL and not ans.cacheable
    # as CoreDNS: authoritative, the zone SOA in the authority section
    assert ans.authoritative and [rr.rtype for rr in ans.authority] == [SOA]
    assert ask("example.com", index=index).forward


@pytest.mark.parametrize(
    "name",
    ["example.com", "cluster.local.example.com", "local", "9.9.9.10.in-addr.arpa"],
)
def test_outside_names_and_unknown_reverse_names_forward(name: str) -> None:
    ans = ask(name, PTR if name.endswith("arpa") else A)
    assert ans.forward and not ans.cacheable


def test_known_reverse_name_with_other_type_forwards() -> None:
    assert ask("5.0.96.10.in-addr.arpa", A).forward


def test_case_insensitive_match() -> None:
    upper = resolve(Question(to_wire("WEB.Default.SVC.cluster.LOCAL"), A), INDEX)
    assert upper.rcode == NOERROR and upper.answer


def test_external_name_leaves_the_chase_to_the_server() -> None:
    ans = ask("ext.default.svc.cluster.local", A)
    assert [rr.rtype for rr in ans.answer] == [CNAME]
    assert ans.chase == to_wire("example.com") and ans.cacheable


def test_cname_query_for_external_name_needs_no_chase() -> None:
    ans = ask("ext.default.svc.cluster.local", CNAME)
    assert [rr.rtype for rr in ans.answer] == [CNAME] and ans.chase is None


def test_in_zone_cname_is_followed_and_not_cached_per_name() -> None:
    ans = ask("alias.default.svc.cluster.local", A)
    assert [rr.rtype for rr in ans.answer] == [CNAME, A] and not ans.cacheable
    dangling = ask("dangling.default.svc.cluster.local", A)
    assert dangling.rcode == NXDOMAIN and [rr.rtype for rr in dangling.answer] == [CNAME]


def test_cname_loop_is_servfail() -> None:
    loop = ask("loop1.default.svc.cluster.local", A)
    assert loop.rcode == SERVFAIL and [rr.rtype for rr in loop.authority] == [SOA]


def test_any_returns_every_record_of_the_name() -> None:
    ans = ask("cluster.local", ANY)
    assert {rr.rtype for rr in ans.answer} == {SOA, NS}
